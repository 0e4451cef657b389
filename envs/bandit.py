"""A learner made for the gate controller's problem, a one-step contextual bandit, and the pieces every learner
shares: fixed observation whitening, the logit-normal gate policy, and a scorer over planted rewards for tests.

Every episode of the gate env is one step: a problem's observation, one gate vector, one reward. There is no state
to carry, so a critic only adds noise on top of the per-problem baseline the reward already subtracts. RLOO (REINFORCE
leave-one-out, Kool et al. 2019; Ahmadian et al. 2024) fits that: per step it draws `problems_per_step` problems,
samples K gate vectors for each from the policy, scores all B*K rows in one batched call, and uses the mean reward of
the other K-1 samples of the same problem as the baseline. No critic, no value loss.

The policy (GatePolicy): an MLP on whitened observations gives the mean of a Gaussian in logit space with a
state-independent log std; the gate is sigmoid(z). Gates stay inside (0, 1) without clipping, so the log-probability
is that of the action taken (the sigmoid is a fixed bijection: its Jacobian does not depend on the policy's
parameters and cancels in the gradient). PPO uses the same squashing (envs/mhc_env.py, action map "sigmoid").

Whitening (ObsWhitener): the mean and std of the training pool's observations, fixed before learning and saved with
the policy, so training, validation and evaluation see the same transform (a running normaliser would drift).

PlantedScorer: rewards from a function of (problem index, gate vector) over given observations, with GateScorer's
interface: the planted-signal tests check that each learner recovers a known context-dependent optimum.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from nanochat.common import UserError

LOGIT_BOUND = 10.0   # actions live in [-10, 10] logits: sigmoid(10) = 1 - 4.5e-5, so no learner is ever clipped
STD_FLOOR = 1e-6     # whitening: features with no spread are centred, not divided by zero


def logit_gates(actions) -> np.ndarray:
    """Logit-space actions -> gates in (0, 1)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(actions, dtype=np.float64)))).astype(np.float32)


class ObsWhitener:
    """(obs - mean) / std with the statistics of one pool, fixed."""

    def __init__(self, mean, std):
        self.mean, self.std = np.asarray(mean, np.float32), np.maximum(np.asarray(std, np.float32), STD_FLOOR)

    @classmethod
    def fit(cls, obs: np.ndarray) -> "ObsWhitener":
        obs = np.asarray(obs, np.float64)
        if obs.ndim != 2 or len(obs) < 2:
            raise UserError(f"observation whitening needs at least 2 observations of shape [N, C] (got "
                            f"{obs.shape})")
        return cls(obs.mean(0), obs.std(0))

    def __call__(self, obs) -> np.ndarray:
        return ((np.asarray(obs, np.float32) - self.mean) / self.std).astype(np.float32)

    def state_dict(self) -> dict:
        return dict(mean=self.mean.tolist(), std=self.std.tolist())

    @classmethod
    def from_state(cls, state: dict) -> "ObsWhitener":
        return cls(state["mean"], state["std"])


class GatePolicy(nn.Module):
    """whitened obs [B, C] -> Normal over logits [B, k]; gates = sigmoid(logits)."""

    def __init__(self, obs_dim: int, num_gates: int, hidden=(64, 64), log_std_init: float = 0.0):
        super().__init__()
        layers, d = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.Tanh()]
            d = h
        self.body = nn.Sequential(*layers)
        self.mean = nn.Linear(d, num_gates)
        nn.init.zeros_(self.mean.weight)   # the initial policy ignores the context: logit 0 = gate 0.5 everywhere
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.full((num_gates,), float(log_std_init)))

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(self.body(obs)), self.log_std.exp())

    @torch.no_grad()
    def gates(self, obs_w: np.ndarray, deterministic: bool = True, generator: torch.Generator | None = None):
        d = self.dist(torch.as_tensor(obs_w, dtype=torch.float32))
        z = d.mean if deterministic else d.mean + d.stddev * torch.randn(d.mean.shape, generator=generator)
        return logit_gates(z.clamp(-LOGIT_BOUND, LOGIT_BOUND).numpy())


class RLOOLearner:
    """REINFORCE with a leave-one-out baseline over K samples per problem (see the module docstring). The budget
    is counted in problems scored (rows), as for PPO and the black-box baselines."""

    def __init__(self, scorer, problems, whitener: ObsWhitener, *, samples_per_problem: int = 4,
                 problems_per_step: int = 16, learning_rate: float = 3e-3, ent_coef: float = 0.0,
                 hidden=(64, 64), log_std_init: float = 0.0, seed: int = 0):
        if samples_per_problem < 2:
            raise UserError(f"RLOO needs at least 2 samples per problem for a leave-one-out baseline (got "
                            f"{samples_per_problem})")
        if problems_per_step < 1 or not learning_rate > 0 or ent_coef < 0:
            raise UserError(f"RLOO settings out of range: problems per step {problems_per_step} (>= 1), learning "
                            f"rate {learning_rate} (> 0), entropy coefficient {ent_coef} (>= 0)")
        if not problems:
            raise UserError("RLOO needs at least one training problem")
        self.scorer, self.problems, self.whitener = scorer, list(problems), whitener
        self.K, self.B, self.ent_coef = samples_per_problem, problems_per_step, ent_coef
        torch.manual_seed(seed)
        self.policy = GatePolicy(len(whitener.mean), scorer.num_gates, tuple(hidden), log_std_init)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=learning_rate)
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_timesteps, self.n_updates = 0, 0
        self.obs_w = whitener(scorer.observations(self.problems))   # [N, C], fixed

    @property
    def rows_per_step(self) -> int:
        return self.B * self.K

    def step(self) -> dict:
        """One update: B problems x K samples scored in one batched call, LOO advantages, one Adam step."""
        idx = self.rng.integers(len(self.problems), size=self.B)
        obs = torch.as_tensor(np.repeat(self.obs_w[idx], self.K, axis=0))             # [B*K, C]
        d = self.policy.dist(obs)
        with torch.no_grad():
            z = (d.mean + d.stddev * torch.randn(d.mean.shape, generator=self.generator)).clamp(-LOGIT_BOUND,
                                                                                               LOGIT_BOUND)
        gates = logit_gates(z.numpy())                                                  # [B*K, k]
        problems = [self.problems[i] for i in np.repeat(idx, self.K)]
        rewards = np.asarray([r["reward"] for r in self.scorer.score(problems, gates)], np.float64)
        r = rewards.reshape(self.B, self.K)
        baseline = (r.sum(1, keepdims=True) - r) / (self.K - 1)                       # mean of the other K-1
        adv = (r - baseline).reshape(-1)
        scale = adv.std()
        adv_t = torch.as_tensor(adv / scale if scale > 0 else adv, dtype=torch.float32)  # scale-free step size
        logp = d.log_prob(z).sum(-1)                                                    # [B*K]
        entropy = d.entropy().sum(-1).mean()
        loss = -(adv_t * logp).mean() - self.ent_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.num_timesteps += len(rewards)
        self.n_updates += 1
        return dict(step=self.num_timesteps, mean_reward=float(rewards.mean()), reward_std=float(rewards.std()),
                    gates_mean=gates.mean(0).tolist(), gates_std=gates.std(0).tolist(),
                    gates_at_bounds=float(((gates < 0.01) | (gates > 0.99)).mean()),
                    policy_std=float(self.policy.log_std.detach().exp().mean()), loss=float(loss.detach()),
                    entropy=float(entropy.detach()), advantage_std=float(scale))

    def learn(self, total_timesteps: int, callback=None) -> "RLOOLearner":
        """Steps until `total_timesteps` rows are scored; callback(record) after each step may return False to
        stop (a signal)."""
        while self.num_timesteps + self.rows_per_step <= total_timesteps:
            rec = self.step()
            if callback is not None and callback(rec) is False:
                break
        return self

    def policy_gates(self, obs: np.ndarray, deterministic: bool = True, seed: int = 0) -> np.ndarray:
        """Gates [B, k] for raw observations [B, C]."""
        gen = torch.Generator().manual_seed(seed)
        return self.policy.gates(self.whitener(obs), deterministic, gen)

    def state_dict(self) -> dict:
        return dict(policy=self.policy.state_dict(), optimizer=self.optimizer.state_dict(),
                    num_timesteps=self.num_timesteps, n_updates=self.n_updates,
                    rng=self.rng.bit_generator.state, generator=self.generator.get_state())

    def load_state_dict(self, state: dict, restore_rng: bool = True):
        self.policy.load_state_dict(state["policy"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.num_timesteps, self.n_updates = int(state["num_timesteps"]), int(state["n_updates"])
        if restore_rng:
            self.rng.bit_generator.state = state["rng"]
            self.generator.set_state(state["generator"])


class _Problem:
    def __init__(self, index: int):
        self.index, self.id = index, f"planted-{index}"


class PlantedScorer:
    """GateScorer's interface over fixed observations [N, C] and a reward function
    reward_fn(problem indices [B], gates [B, k]) -> rewards [B]. `problems` lists the N problems."""

    def __init__(self, obs: np.ndarray, reward_fn, num_gates: int = 1, batch_size: int = 64):
        self.obs = np.asarray(obs, np.float32)
        self.reward_fn, self.num_gates, self.batch_size = reward_fn, num_gates, batch_size
        self.problems = [_Problem(i) for i in range(len(self.obs))]
        self.problems_scored = 0

    @property
    def obs_dim(self) -> int:
        return self.obs.shape[1]

    def prepare(self, problems):
        pass

    def observations(self, problems) -> np.ndarray:
        return self.obs[[p.index for p in problems]]

    def score(self, problems, gates, metrics=None, action_space=None, relative=True) -> list[dict]:
        idx = np.asarray([p.index for p in problems])
        g = np.asarray(gates, np.float32).reshape(len(problems), self.num_gates)
        self.problems_scored += len(problems)
        return [dict(id=p.id, reward=float(r), raw_reward=float(r)) for p, r in zip(problems, self.reward_fn(idx, g))]

    def rewards(self, problems, gates, action_space=None) -> np.ndarray:
        return np.asarray([r["reward"] for r in self.score(problems, gates)], np.float64)
