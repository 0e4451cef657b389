"""What the RL controller acts with and is rewarded by: the registries of action spaces and rewards. The config
(RLConfig's choices and help), the environments (envs/mhc_env.py) and the scorer import them from here, so a new
action space or reward is one register_* call.

- An action space says how many gate values an action has for a model of L layers, and how those values expand to
  the 2L per-sub-layer gates (layer 0 attention, layer 0 MLP, layer 1 attention, ...).
- A reward says which GSM8K metrics of an answer it needs ("exact": the greedy 0-shot answer is right, 1/0;
  "dense": the mean per-token log-probability of the gold answer under teacher forcing, one forward and no
  generation; envs/gsm8k_env.py computes both) and how they combine into one number.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nanochat.common import UserError


@dataclass(frozen=True)
class ActionSpace:
    name: str
    size: Callable[[int], int]                  # n_layer -> gate values per action
    expand: Callable[[np.ndarray, int], np.ndarray]  # ([..., size], n_layer) -> [..., 2 * n_layer]
    help: str = ""

    def gates_per_sublayer(self, values, n_layer: int) -> np.ndarray:
        """[k] or [B, k] action values -> [2L] or [B, 2L] gates; a wrong k is an error naming both."""
        g = np.asarray(values, dtype=np.float32)
        k = self.size(n_layer)
        if g.ndim not in (1, 2) or g.shape[-1] != k:
            raise UserError(f"action space {self.name!r} takes {k} gate value(s) for {n_layer} layers (shape [{k}] "
                            f"or [B, {k}]), got shape {tuple(g.shape)}")
        return self.expand(g, n_layer)


ACTION_SPACES: dict[str, ActionSpace] = {}


def register_action_space(name: str, size, expand, help: str = ""):
    ACTION_SPACES[name] = ActionSpace(name, size, expand, help)


def action_space(name: str) -> ActionSpace:
    if name not in ACTION_SPACES:
        raise UserError(f"action space must be one of {', '.join(ACTION_SPACES)} (got {name!r})")
    return ACTION_SPACES[name]


register_action_space("global", lambda L: 1, lambda g, L: np.repeat(g, 2 * L, axis=-1), "one gate for every sub-layer")
register_action_space("per_layer", lambda L: L, lambda g, L: np.repeat(g, 2, axis=-1),
                      "one gate per layer (both its sub-layers)")
register_action_space("per_sublayer", lambda L: 2 * L, lambda g, L: g, "one gate per sub-layer")


@dataclass(frozen=True)
class Reward:
    name: str
    metrics: tuple[str, ...]             # what it needs of an answer: "exact" and/or "dense"
    value: Callable[[dict, float], float]  # ({"correct": bool, "dense": float}, mix weight) -> reward
    help: str = ""


REWARDS: dict[str, Reward] = {}


def register_reward(name: str, metrics: tuple[str, ...], value, help: str = ""):
    REWARDS[name] = Reward(name, tuple(metrics), value, help)


register_reward("exact", ("exact",), lambda r, w: float(r["correct"]), "1 if the greedy answer is right, else 0")
register_reward("dense", ("dense",), lambda r, w: r["dense"], "mean log-prob of the gold answer, no generation")
register_reward("mix", ("exact", "dense"), lambda r, w: (1 - w) * float(r["correct"]) + w * math.exp(r["dense"]),
                "(1 - w) exact + w exp(dense), both in [0, 1]")

# reward baselines: "default" subtracts, per problem, the learned gates' reward on it (a control variate)
REWARD_BASELINES = ("default", "none")


def reward(name: str) -> Reward:
    if name not in REWARDS:
        raise UserError(f"reward must be one of {', '.join(REWARDS)} (got {name!r})")
    return REWARDS[name]


def check_reward_settings(name: str, baseline: str, mix_weight: float):
    """The one check of a reward's settings (RLConfig and the environments' own constructors call it)."""
    reward(name)
    if baseline not in REWARD_BASELINES:
        raise UserError(f"reward baseline must be one of {', '.join(REWARD_BASELINES)} (got {baseline!r})")
    if not 0 <= mix_weight <= 1:
        raise UserError(f"mix weight must be in [0, 1] (got {mix_weight})")


def check_ppo_sizes(n_steps: int, num_envs: int, batch_size: int):
    """PPO's rollout arithmetic, checked once for RLConfig and build_ppo: the rollout is whole env steps of
    num_envs problems, and a minibatch fits in it."""
    if n_steps % num_envs:
        raise UserError(f"--n-steps {n_steps} (the rollout size) must be a multiple of --num-envs {num_envs}")
    if not 1 < batch_size <= n_steps:
        raise UserError(f"--batch-size must be in (1, --n-steps = {n_steps}] (got {batch_size})")
