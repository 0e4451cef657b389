"""The learners over the mHC gates -- PPO (stable-baselines3) and RLOO (envs/bandit.py) -- their checkpoints (exact
resume), model selection on the RL-validation pool, and their logging.

A checkpoint is taken at rollout boundaries -- after an update, before the next rollout -- and holds everything
the rest of the run depends on: the policy and value weights (safetensors), Adam's state, the timestep and update
counters, the torch / numpy / python RNG states (SB3 samples actions with torch and shuffles minibatches with
numpy's global RNG) and the vec env's problem sampler with the problems already drawn. Restoring one and calling
learn() again reproduces the uninterrupted run exactly (tests/test_rl.py). A signal stops learning at the next env
step and writes the last boundary snapshot, so at most one rollout is redone on --resume.
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback

from envs.mhc_env import actions_to_gates
from nanochat.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from envs.bandit import ObsWhitener, RLOOLearner
from nanochat.common import UserError
from nanochat.gate_rewards import check_ppo_sizes


def build_ppo(vec_env, *, learning_rate: float, n_steps: int, batch_size: int, n_epochs: int, gamma: float,
              ent_coef: float, seed: int, net_arch=(64, 64), log_std_init: float = 0.0,
              tensorboard_log: str | None = None) -> PPO:
    """PPO with an MLP policy on the CPU (a small MLP gains nothing from a GPU). `n_steps` is the rollout size
    over all sub-environments (the plan's number); SB3's per-env n_steps is derived from it."""
    check_ppo_sizes(n_steps, vec_env.num_envs, batch_size)
    return PPO("MlpPolicy", vec_env, learning_rate=learning_rate, n_steps=n_steps // vec_env.num_envs,
               batch_size=batch_size, n_epochs=n_epochs, gamma=gamma, ent_coef=ent_coef, seed=seed, device="cpu",
               policy_kwargs=dict(net_arch=list(net_arch), log_std_init=log_std_init), verbose=0,
               tensorboard_log=tensorboard_log or None)


def policy_gates(ppo: PPO, obs: np.ndarray, action_map: str, whitener=None, deterministic: bool = True,
                 seed: int = 0) -> np.ndarray:
    """The policy's gates [B, k] for raw observations [B, C] (whitened as in training): the Gaussian mean
    (deterministic) or a sample drawn from torch's RNG seeded with `seed`, mapped as the vec env maps actions."""
    obs = obs if whitener is None else whitener(obs)
    if not deterministic:
        torch.manual_seed(seed)
    actions, _ = ppo.predict(obs, deterministic=deterministic)
    return actions_to_gates(np.asarray(actions, dtype=np.float32).reshape(len(obs), -1), action_map)


# -- checkpoints ---------------------------------------------------------------------------------------------------

class _State:
    """A frozen state dict standing in for a module or optimizer in save_checkpoint."""

    def __init__(self, sd):
        self.sd = sd

    def state_dict(self):
        return self.sd


def take_snapshot(ppo: PPO, vec_env) -> dict:
    np_state = np.random.get_state()
    return dict(
        policy={k: v.detach().cpu().clone() for k, v in ppo.policy.state_dict().items()},
        optim=_clone(ppo.policy.optimizer.state_dict()),
        num_timesteps=int(ppo.num_timesteps), n_updates=int(ppo._n_updates),
        rng=dict(torch=torch.get_rng_state(), numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)),
                 numpy_rest=list(np_state[2:]), python=random.getstate()),
        env=vec_env.get_state())


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def write_snapshot(root: str, snap: dict, meta: dict, keep: int) -> str:
    bad = [k for k, v in snap["policy"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"refusing to save the policy at {snap['num_timesteps']} timesteps: non-finite weights in "
                        f"{', '.join(bad[:3])}")
    meta = {**meta, "num_timesteps": snap["num_timesteps"], "n_updates": snap["n_updates"], "env_state": snap["env"]}
    return save_checkpoint(root, snap["num_timesteps"], _State(snap["policy"]), [_State(snap["optim"])], meta,
                           keep=keep, rng_state=snap["rng"])


def restore(ppo: PPO, vec_env, path: str, restore_rng: bool = True) -> dict:
    """Load a policy checkpoint into `ppo` (and the sampler state into `vec_env`). Returns its meta."""
    weights, payload, meta = load_checkpoint(path, device="cpu")
    try:
        ppo.policy.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"policy checkpoint {path} does not fit this policy (action space or network differ): "
                        f"{str(e).splitlines()[0]}") from None
    ppo.policy.optimizer.load_state_dict(payload["optimizers"][0])
    ppo.num_timesteps, ppo._n_updates = meta["num_timesteps"], meta["n_updates"]
    if restore_rng:
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), *rng["numpy_rest"]))
        random.setstate(rng["python"])
        vec_env.set_state(meta["env_state"])
        ppo._last_obs = None  # learn() re-reads the restored problems through reset()
    return meta


# -- logging and checkpointing during learn() ----------------------------------------------------------------------

class ControllerCallback(BaseCallback):
    """Per PPO iteration: one metrics record (timesteps, rollout reward, the gates chosen, PPO's losses, speed);
    a boundary snapshot before every rollout, written every `save_every` timesteps; a stop on signal. log(record)
    writes a record (train_rl: Run.log, which turns a failed write into a stop with a checkpoint)."""

    def __init__(self, vec_env, root: str, meta: dict, log, save_every: int, keep: int,
                 stop_flag=None, wandb_run=None, master: bool = True, selector: ModelSelector | None = None):
        super().__init__()
        self.selector = selector
        self.vec_env, self.root, self.meta, self.log = vec_env, root, meta, log
        self.save_every, self.keep, self.stop_flag, self.wandb_run = save_every, keep, stop_flag, wandb_run
        self.snapshot: dict | None = None
        self.last_saved = None
        self.pending: dict | None = None
        self.t_last = time.perf_counter()

    def _on_training_start(self):
        self.last_saved = self.model.num_timesteps
        self.t_last = time.perf_counter()

    def _on_rollout_start(self):
        self._flush()  # the previous iteration's record, now with its update's losses
        self.snapshot = take_snapshot(self.model, self.vec_env)
        if self.selector is not None and self.selector.due(self.model.num_timesteps):
            env = self.vec_env
            self.selector.evaluate(self.model.num_timesteps,
                                   lambda obs: policy_gates(self.model, obs, env.action_map, env.whitener),
                                   lambda root, extra: write_snapshot(root, self.snapshot, {**self.meta, **extra}, 1))
        if self.model.num_timesteps - self.last_saved >= self.save_every:
            write_snapshot(self.root, self.snapshot, self.meta, self.keep)
            self.last_saved = self.model.num_timesteps

    def _on_step(self) -> bool:  # a signal or a failed results write (StopFlag.write_failed) stops
        return not (self.stop_flag and (self.stop_flag.signum or self.stop_flag.write_failed))

    def _on_rollout_end(self):
        buf = self.model.rollout_buffer
        # the gates the env applied: SB3 clips the raw Gaussian actions to the action space, then the env maps them
        gates = actions_to_gates(buf.actions.reshape(-1, buf.actions.shape[-1]), self.vec_env.action_map)
        now = time.perf_counter()
        # policy_std: the Gaussian's std in action units (logits under the sigmoid map); gates_at_bounds: the share
        # of gates within 0.01 of 0 or 1 (the "linear" map's clipped actions land exactly there)
        self.pending = dict(step=int(self.model.num_timesteps), mean_reward=float(buf.rewards.mean()),
                            reward_std=float(buf.rewards.std()), gates_mean=gates.mean(0).tolist(),
                            gates_std=gates.std(0).tolist(),
                            gates_at_bounds=float(((gates < 0.01) | (gates > 0.99)).mean()),
                            policy_std=torch.exp(self.model.policy.log_std).mean().item(),
                            env_steps_per_s=buf.rewards.size / max(now - self.t_last, 1e-9))
        self.t_last = now

    def _on_training_end(self):
        self._flush()

    def _flush(self):
        if self.pending is None:
            return
        logged = self.model.logger.name_to_value
        for key in ("train/loss", "train/approx_kl", "train/entropy_loss", "train/value_loss", "train/clip_fraction",
                    "train/policy_gradient_loss", "train/explained_variance", "train/std"):
            if key in logged:
                self.pending[key.split("/")[1]] = float(logged[key])
        self.log(self.pending)
        if self.wandb_run is not None:
            self.wandb_run.log({f"rl/{k}": v for k, v in self.pending.items() if not isinstance(v, list)})
        self.pending = None


# -- RLOO checkpoints ----------------------------------------------------------------------------------------------

def write_rloo(root: str, learner: RLOOLearner, meta: dict, keep: int) -> str:
    """The RLOO learner's policy, Adam state, counters and RNG states (exact resume)."""
    sd = learner.state_dict()
    meta = {**meta, "num_timesteps": sd["num_timesteps"], "n_updates": sd["n_updates"], "numpy_rng": sd["rng"]}
    return save_checkpoint(root, sd["num_timesteps"], _State(sd["policy"]), [_State(sd["optimizer"])], meta,
                           keep=keep, rng_state=dict(generator=sd["generator"]))


def restore_rloo(learner: RLOOLearner, path: str, restore_rng: bool = True) -> dict:
    weights, payload, meta = load_checkpoint(path, device="cpu")
    try:
        learner.load_state_dict(dict(policy=weights, optimizer=payload["optimizers"][0],
                                     num_timesteps=meta["num_timesteps"], n_updates=meta["n_updates"],
                                     rng=meta["numpy_rng"], generator=payload["rng"]["generator"]), restore_rng)
    except RuntimeError as e:
        raise UserError(f"policy checkpoint {path} does not fit this policy (action space or network differ): "
                        f"{str(e).splitlines()[0]}") from None
    return meta


# -- model selection on the RL-validation pool (SB3's EvalCallback, for both learners) ------------------------------

class ModelSelector:
    """Every `every` timesteps, score the deterministic policy's gates on the validation problems (mean reward,
    the training reward's definition) and keep the best policy under `root` (a checkpoint whose meta holds its
    validation reward). The final evaluation uses that policy: no held-out problem chooses it. log(record) writes
    its records (train_rl: Run.log)."""

    def __init__(self, scorer, problems, every: int, root: str, log):
        self.scorer, self.problems, self.every, self.root = scorer, list(problems), every, root
        self.log = log
        self.best, self.last = None, None
        path = latest_checkpoint(root)
        if path is not None:   # a resumed run keeps the best it had
            m = read_meta(path)
            self.best, self.last = m.get("val_reward"), m.get("num_timesteps")

    def due(self, timesteps: int) -> bool:
        return self.every > 0 and bool(self.problems) and (self.last is None or timesteps - self.last >= self.every)

    def evaluate(self, timesteps: int, gates_fn, save_fn) -> float:
        """gates_fn(raw observations) -> gates; save_fn(root, extra meta) writes the policy when it is the best."""
        obs = self.scorer.observations(self.problems)
        value = float(self.scorer.rewards(self.problems, gates_fn(obs)).mean())
        self.last = timesteps
        improved = self.best is None or value > self.best
        if improved:
            self.best = value
            save_fn(self.root, dict(val_reward=value))
        self.log(dict(step=int(timesteps), val_reward=value, val_best=self.best, val_improved=improved))
        return value


def whitener_from_meta(meta: dict) -> ObsWhitener | None:
    state = meta.get("obs_whitening")
    return None if state is None else ObsWhitener.from_state(state)
