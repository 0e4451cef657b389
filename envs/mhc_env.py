"""The RL environment over the mHC gates of a frozen model (phase 3 of the plan, docs/design.md).

    env = gymnasium.make("nanochat/GSM8KMHC-v0", checkpoint=PATH, action_space="per_layer", reward="dense")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

One episode = one GSM8K-format problem (as in the plan): the observation describes the question, the action is the
gate vector, the reward scores the model's answer under those gates, and the episode ends.

- Action: Box(0, 1, float32) of size 1 (`global`: every sub-layer), L (`per_layer`: both sub-layers of a layer)
  or 2L (`per_sublayer`: attention, MLP, attention, ...). Out-of-range actions are clipped to [0, 1] (an
  unsquashed Gaussian policy proposes them; SB3 clips before the env sees them) and reported in
  `info["clipped"]`; a NaN or infinite action, or one of the wrong size, is an error.
- Observation: the question's final hidden state mean-pooled over its prompt, under the model's learned (default)
  gates: a float32 vector of n_embd.
- Reward: `exact`, `dense` or `mix` (envs/gsm8k_env.py); with reward_baseline="default", relative to the
  learned gates' reward on the same problem (GateScorer).
- The model is frozen: eval mode, no gradients, no gate noise or gate sampling; its weights never change.

`GSM8KMHCVecEnv` is the batched version for PPO: every step scores all its sub-environments' problems, each under
its own gates, in one batched forward (dense) or one batched generation with the KV cache (exact).
`GateScorer` is what both use, and what the black-box baselines and the evaluation use (envs/gate_search.py).
"""
from __future__ import annotations

from contextlib import contextmanager

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from envs.bandit import LOGIT_BOUND, ObsWhitener, logit_gates
from envs.gsm8k_env import dense_rewards, exact_rewards, fit_problems, load_problems, question_features
from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import UserError, autocast_ctx, compile_model
from nanochat.gate_rewards import ACTION_SPACES, REWARD_BASELINES, REWARDS, check_reward_settings
from nanochat.gate_rewards import action_space as get_action_space
from nanochat.tokenizer import get_tokenizer

ENV_ID = "nanochat/GSM8KMHC-v0"
__all__ = ["ACTION_SPACES", "REWARDS", "REWARD_BASELINES"]  # the registries (nanochat/gate_rewards.py)


def num_gates(action_space: str, n_layer: int) -> int:
    return get_action_space(action_space).size(n_layer)


def set_gates(model, action_space: str, gates) -> None:
    """gates: [B, k] (one gate vector per example) or [k]; k as num_gates(action_space)."""
    model.set_mhc_gates_per_sublayer(get_action_space(action_space).gates_per_sublayer(gates, model.config.n_layer))


@contextmanager
def gates_applied(model, action_space: str, gates):
    """Set gates (None: the learned defaults) for the duration of a block; the previous overrides come back."""
    modules = model.mhc_modules()
    saved = [m.gate_override for m in modules]
    try:
        if gates is None:
            model.clear_mhc_gates()
        else:
            set_gates(model, action_space, gates)
        yield
    finally:
        for m, g in zip(modules, saved):
            m.gate_override = g


def check_action(action, size: int) -> tuple[np.ndarray, bool]:
    """An action as float32 [size] in [0, 1]: NaN/inf or a wrong size is an error, out-of-range is clipped.
    Returns (action, whether it was clipped)."""
    a = np.asarray(action, dtype=np.float32).reshape(-1) if np.ndim(action) else np.full(1, action, np.float32)
    if a.size != size:
        raise UserError(f"action of {a.size} gate values for an action space of {size}")
    if not np.isfinite(a).all():
        raise UserError(f"action has non-finite gate values at {np.flatnonzero(~np.isfinite(a)).tolist()}: {a}")
    clipped = np.clip(a, 0.0, 1.0)
    return clipped, bool((clipped != a).any())


def observation_space(n_embd: int) -> gym.spaces.Box:
    """The question features: a mean of final-norm hidden states, whose RMS is 1, so |x_i| <= sqrt(n_embd)."""
    bound = float(np.sqrt(n_embd))
    return gym.spaces.Box(-bound, bound, shape=(n_embd,), dtype=np.float32)


# how a policy's actions become gates: (the policy's action box, the map). "sigmoid" (the default) is the
# logit-normal policy of envs/bandit.py: no action is ever clipped, so PPO's log-probability is that of the action
# taken; "linear" maps [-1, 1] onto [0, 1] and clips (an unsquashed Gaussian: ~32% of initial actions sit on a bound,
# kept for old runs); "clip" takes the action as the gate and clips it.
ACTION_MAPS = {"sigmoid": (-LOGIT_BOUND, LOGIT_BOUND), "linear": (-1.0, 1.0), "clip": (0.0, 1.0)}


def actions_to_gates(actions: np.ndarray, action_map: str) -> np.ndarray:
    """Policy actions -> gates in [0, 1] under an action map (ACTION_MAPS)."""
    a = np.asarray(actions, dtype=np.float32)
    if action_map == "sigmoid":
        return logit_gates(np.clip(a, -LOGIT_BOUND, LOGIT_BOUND))
    if action_map not in ACTION_MAPS:
        raise UserError(f"action map must be one of {', '.join(ACTION_MAPS)} (got {action_map!r})")
    return np.clip((a + 1.0) / 2.0 if action_map == "linear" else a, 0.0, 1.0)


def freeze(model):
    """Eval mode (no training-time gate noise or gate sampling: they act in training mode only), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_frozen_model(checkpoint: str = "", model_tag: str = "", step: int = -1, device="cpu"):
    """(model, tokenizer, checkpoint path, meta) of an mHC checkpoint, frozen for the controller."""
    if not checkpoint and not model_tag:
        raise UserError("pass a checkpoint path or a model tag of the mHC model to control")
    path = checkpoint or resolve_checkpoint(model_tag, step)
    model, meta = load_model(path, device)
    if not model.config.mhc.enabled:
        raise UserError(f"checkpoint {path} is a model without mHC (mhc_enabled is false): there are no gates "
                        f"for the controller to set")
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, path)
    return freeze(model), tokenizer, path, meta


class GateScorer:
    """Rewards of (problem, gate vector) pairs from the frozen model, in batches of `batch_size` problems (each
    batch is one forward or one generation, with one gate vector per row).

    reward_baseline="default" subtracts, per problem, the reward the learned gates get on that problem (computed
    once and cached; `raw_reward` keeps the plain value). A per-problem control variate: it does not depend on the
    action, so it changes no optimum (nor any comparison of gate vectors on the same problems), but it removes the
    problem-to-problem spread (easy vs hard questions) that otherwise swamps the gates' effect on the reward."""

    def __init__(self, model, tokenizer, *, action_space: str = "global", reward: str = "dense",
                 max_new_tokens: int = 256, mix_weight: float = 0.5, batch_size: int = 32, dtype: str = "float32",
                 reward_baseline: str = "none", compile: bool = False, compile_backend="inductor"):
        check_reward_settings(reward, reward_baseline, mix_weight)
        if batch_size <= 0 or max_new_tokens <= 0:
            raise UserError(f"batch size and max new tokens must be > 0 (got {batch_size}, {max_new_tokens})")
        self.model, self.tokenizer = model, tokenizer
        # the forward of the dense reward (compiled with --compile; every batch has its own length) and the exact
        # reward's decode step (the engine's compiled path); the observations (once per problem, cached) run eager
        self.scoring_model = compile_model(model, compile, dynamic=True, backend=compile_backend)
        self.compile, self.compile_backend = compile, compile_backend
        self.action_space, self.reward = action_space, reward
        self.num_gates = num_gates(action_space, model.config.n_layer)
        self.max_new_tokens, self.mix_weight, self.batch_size = max_new_tokens, mix_weight, batch_size
        self.ctx = autocast_ctx(model.cos.device.type, dtype)
        self.reward_baseline = reward_baseline
        self._features: dict[str, np.ndarray] = {}
        self._default_reward: dict[str, float] = {}
        self.problems_scored = 0  # the budget spent: problems scored by score(), any gates (the one-off
        # reward-baseline pass of prepare() is not counted: PPO and the black-box baselines share it)

    @property
    def obs_dim(self) -> int:
        return self.model.config.n_embd

    def default_gates(self, action_space: str | None = None) -> np.ndarray:
        """The learned gates in an action space (per layer: the mean of its two sub-layers; global: the mean)."""
        space = action_space or self.action_space
        with gates_applied(self.model, space, None):
            g = np.asarray(self.model.get_mhc_gates(), dtype=np.float32)
        if space == "global":
            return g.mean(keepdims=True)
        return g.reshape(-1, 2).mean(1) if space == "per_layer" else g

    def fit(self, problems):
        """The problems this scorer can score with both rewards (envs.gsm8k_env.fit_problems)."""
        return fit_problems(problems, self.tokenizer, self.model.config.sequence_len, self.max_new_tokens)

    def observations(self, problems) -> np.ndarray:
        """[B, n_embd] question features under the learned gates (cached per problem id)."""
        todo = [p for p in problems if p.id not in self._features]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            with gates_applied(self.model, self.action_space, None):
                feats = question_features(self.model, self.tokenizer, chunk, self.ctx)
            self._features.update({p.id: f for p, f in zip(chunk, feats)})
        return np.stack([self._features[p.id] for p in problems])

    def prepare(self, problems):
        """Compute (and cache) every problem's observation and, with a reward baseline, its reward under the
        learned gates, in a fixed batching: cached values then never depend on which problems happened to be
        scored together (fp rounding differs with a batch's padding), so a resumed run is exact."""
        self.observations(problems)
        if self.reward_baseline == "default":
            todo = [p for p in problems if p.id not in self._default_reward]
            for r in self._raw_score(todo, None, None, self.action_space):
                self._default_reward[r["id"]] = r["reward"]

    def score(self, problems, gates, metrics=None, action_space: str | None = None,
              relative: bool = True) -> list[dict]:
        """Score problem b under gates[b] ([B, k] in `action_space`, default the scorer's; None = the learned
        gates). `metrics` (exact, dense) defaults to what the reward needs. Returns per problem
        {id, reward, raw_reward, dense?, correct?, completion?}; reward = raw_reward - the learned gates' reward on
        the same problem with reward_baseline="default" (relative=False skips that: evaluation reads the metrics
        and needs no baseline pass over its problems)."""
        out = self._raw_score(problems, gates, metrics, action_space or self.action_space)
        self.problems_scored += len(problems)
        if self.reward_baseline == "default" and relative:
            self.prepare(problems)  # no-op for problems prepared up front
            for r in out:
                if "raw_reward" in r:
                    r["reward"] = r["raw_reward"] - self._default_reward[r["id"]]
        return out

    def _raw_score(self, problems, gates, metrics, space: str) -> list[dict]:
        reward = REWARDS[self.reward]
        metrics = set(metrics or reward.metrics)
        if gates is not None:
            gates = np.asarray(gates, dtype=np.float32).reshape(len(problems), num_gates(space,
                                                                                         self.model.config.n_layer))
        out = []
        for i in range(0, len(problems), self.batch_size):
            chunk = problems[i:i + self.batch_size]
            g = None if gates is None else gates[i:i + self.batch_size]
            recs = [dict(id=p.id) for p in chunk]
            with gates_applied(self.model, space, g):
                if "dense" in metrics:
                    for r, d in zip(recs, dense_rewards(self.scoring_model, self.tokenizer, chunk, self.ctx)):
                        r["dense"] = d
                if "exact" in metrics:
                    for r, e in zip(recs, exact_rewards(self.model, self.tokenizer, chunk, self.max_new_tokens,
                                                        self.ctx, compile=self.compile,
                                                        compile_backend=self.compile_backend)):
                        r.update(correct=e["correct"], completion=e["completion"], cut=e["cut"])
            for r in recs:
                if all(("correct" if m == "exact" else m) in r for m in reward.metrics):  # what the reward needs
                    r["reward"] = r["raw_reward"] = reward.value(r, self.mix_weight)
            out += recs
        return out

    def rewards(self, problems, gates, action_space: str | None = None) -> np.ndarray:
        return np.array([r["reward"] for r in self.score(problems, gates, action_space=action_space)],
                        dtype=np.float64)


def build_scorer(checkpoint: str = "", model_tag: str = "", step: int = -1, device="cpu", **scorer_kwargs):
    model, tokenizer, path, meta = load_frozen_model(checkpoint, model_tag, step, device)
    return GateScorer(model, tokenizer, **scorer_kwargs), path


def build_problem_pool(scorer: GateScorer, source: str, **load_kwargs):
    """Problems from envs.gsm8k_env.load_problems, without those whose answer does not fit the model's context."""
    problems, where = load_problems(source, **load_kwargs)
    problems, dropped = scorer.fit(problems)
    if not problems:
        raise UserError(f"no problem from {where} fits the model's context of {scorer.model.config.sequence_len}")
    return problems, dict(source=where, count=len(problems), dropped_too_long=dropped)


class GSM8KMHCEnv(gym.Env):
    """One problem per episode; see the module docstring. Build it from a checkpoint (path or model tag) and a
    problem source, or hand it a ready GateScorer and problem list (to share one loaded model between envs)."""

    metadata = {"render_modes": []}

    def __init__(self, checkpoint: str = "", model_tag: str = "", action_space: str = "global",
                 reward: str = "dense", problems="synthetic", num_problems: int = 256, problem_seed: int = 1,
                 split: str = "train", device: str = "cpu", max_new_tokens: int = 256, mix_weight: float = 0.5,
                 reward_baseline: str = "none", scorer: GateScorer | None = None, task_data: str = "auto"):
        super().__init__()
        if scorer is None:
            scorer, _ = build_scorer(checkpoint, model_tag, device=device, action_space=action_space,
                                     reward=reward, max_new_tokens=max_new_tokens, mix_weight=mix_weight,
                                     reward_baseline=reward_baseline)
        elif scorer.action_space != action_space or scorer.reward != reward:
            raise UserError(f"the scorer was built for action space {scorer.action_space!r} and reward "
                            f"{scorer.reward!r}, the env asks for {action_space!r} and {reward!r}")
        self.scorer = scorer
        if isinstance(problems, str):
            problems, _ = build_problem_pool(scorer, problems, split=split, count=num_problems, seed=problem_seed,
                                             task_data=task_data)
        if not problems:
            raise UserError("the env needs at least one problem")
        self.problems = list(problems)
        k = scorer.num_gates
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(k,), dtype=np.float32)
        self.observation_space = observation_space(scorer.obs_dim)
        self._problem = None
        self._obs = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._problem = self.problems[int(self.np_random.integers(len(self.problems)))]
        self._obs = self.scorer.observations([self._problem])[0]
        return self._obs.copy(), {"problem_id": self._problem.id}

    def step(self, action):
        if self._problem is None:
            raise UserError("call reset() before step(): each episode is one problem")
        gates, clipped = check_action(action, self.scorer.num_gates)
        rec = self.scorer.score([self._problem], gates[None])[0]
        info = {"problem_id": self._problem.id, "gates": gates, "clipped": clipped,
                **{k: rec[k] for k in ("dense", "correct") if k in rec}}
        self._problem = None  # one problem per episode: the next step needs a reset
        return self._obs.copy(), float(rec["reward"]), True, False, info


class GSM8KMHCVecEnv(VecEnv):
    """`num_envs` problem slots scored together: one batched forward (dense) or generation (exact) per step, row b
    under sub-environment b's gates. Every episode is one step, so every step ends every episode and the next
    problems are drawn at once (SB3's auto-reset; the old observation is in info["terminal_observation"]).

    `action_map` (ACTION_MAPS) says how the policy's actions become gates; "sigmoid" and "linear" both put SB3's
    initial Gaussian (mean 0) in the middle of the gate range. `whitener` (envs/bandit.py: fixed statistics of the
    training pool) whitens every observation the policy sees."""

    def __init__(self, scorer: GateScorer, problems, num_envs: int, seed: int = 0, action_map: str = "clip",
                 whitener: ObsWhitener | None = None):
        if num_envs <= 0:
            raise UserError(f"--num-envs must be > 0 (got {num_envs})")
        if not problems:
            raise UserError("the env needs at least one problem")
        self.scorer, self.problems = scorer, list(problems)
        if action_map not in ACTION_MAPS:
            raise UserError(f"action map must be one of {', '.join(ACTION_MAPS)} (got {action_map!r})")
        self.action_map, self.whitener = action_map, whitener
        k, C = scorer.num_gates, scorer.obs_dim
        low, high = ACTION_MAPS[action_map]
        obs_space = observation_space(C) if whitener is None else gym.spaces.Box(-np.inf, np.inf, shape=(C,),
                                                                                  dtype=np.float32)
        self.render_mode = None
        super().__init__(num_envs, obs_space, gym.spaces.Box(low, high, shape=(k,), dtype=np.float32))
        self.rng = np.random.default_rng(seed)
        scorer.prepare(self.problems)  # observations (and baseline rewards) up front: exact resume
        self._current: np.ndarray | None = None       # problem index of each slot
        self._actions: np.ndarray | None = None

    # -- state (for exact resume) ------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return dict(rng=self.rng.bit_generator.state,
                    current=None if self._current is None else self._current.tolist())

    def set_state(self, state: dict):
        """Restore get_state(); it supersedes a pending seed (SB3's PPO seeds its env when it is built)."""
        self._reset_seeds()
        self.rng.bit_generator.state = state["rng"]
        self._current = None if state["current"] is None else np.asarray(state["current"], dtype=np.int64)

    def to_gates(self, actions) -> np.ndarray:
        """Policy actions [B, k] -> gate vectors in [0, 1] (clipped; NaN/inf is an error)."""
        a = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)
        if a.shape[1] != self.scorer.num_gates:
            raise UserError(f"actions of {a.shape[1]} gate values for an action space of {self.scorer.num_gates}")
        if not np.isfinite(a).all():
            raise UserError(f"actions hold non-finite gate values: {a[~np.isfinite(a).all(1)][:2]}")
        return actions_to_gates(a, self.action_map)

    def _draw(self):
        self._current = self.rng.integers(len(self.problems), size=self.num_envs)

    def _obs(self) -> np.ndarray:
        obs = self.scorer.observations([self.problems[i] for i in self._current])
        return obs if self.whitener is None else self.whitener(obs)

    # -- VecEnv API --------------------------------------------------------------------------------------------
    def reset(self):
        if self._seeds[0] is not None:  # VecEnv.seed(s) applies at the next reset, as SB3's own VecEnvs do
            self.rng = np.random.default_rng(self._seeds[0])
            self._current = None
        self._reset_seeds()
        if self._current is None:  # a restored state keeps the problems it was drawn with
            self._draw()
        return self._obs()

    def step_async(self, actions):
        self._actions = actions

    def step_wait(self):
        if self._current is None:
            raise UserError("reset() the vec env before stepping it")
        gates = self.to_gates(self._actions)
        problems = [self.problems[i] for i in self._current]
        recs = self.scorer.score(problems, gates)
        old_obs = self._obs()
        rewards = np.array([r["reward"] for r in recs], dtype=np.float32)
        infos = [{"terminal_observation": old_obs[b], "problem_id": recs[b]["id"], "gates": gates[b],
                  "TimeLimit.truncated": False, **{k: recs[b][k] for k in ("dense", "correct") if k in recs[b]}}
                 for b in range(self.num_envs)]
        self._draw()
        return self._obs(), rewards, np.ones(self.num_envs, dtype=bool), infos

    def close(self):
        pass

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name, value, indices=None):
        setattr(self, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._indices(indices)]

    def _indices(self, indices):
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else indices


def register():
    """Register ENV_ID with gymnasium (done on `import envs`)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="envs.mhc_env:GSM8KMHCEnv")
