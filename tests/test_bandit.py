"""The learners for the one-step gate bandit (envs/bandit.py RLOO, SB3's PPO on the vec env) recover a planted
context-dependent optimum on the tiny model's *real* observations at a realistic effect size (about 1e-3 nats between
the two classes' best gates), with the configs' own hyperparameters; the policy's pieces (whitening, the logit-normal
map, RLOO's leave-one-out baseline) behave as documented."""
import numpy as np
import pytest
import torch

from envs.bandit import GatePolicy, ObsWhitener, PlantedScorer, RLOOLearner, logit_gates
from envs.gsm8k_env import load_problems
from envs.mhc_env import GateScorer, GSM8KMHCVecEnv, actions_to_gates, load_frozen_model
from envs.ppo_controller import build_ppo, policy_gates
from nanochat.common import UserError
from nanochat.config import RLConfig

EFFECT = 1e-3                      # reward difference between the two classes' best gates, in nats
TARGETS = {False: 0.2, True: 0.8}  # add/sub problems want a low gate, problems with * or / a high one


@pytest.fixture(scope="module")
def planted(tiny_mhc_checkpoint):
    """Real observations of 256 mixed synthetic problems, and a planted reward over them: a class-dependent
    quadratic (the signal), a per-problem random tilt that no feature predicts, and per-call noise."""
    model, tokenizer, _, _ = load_frozen_model(str(tiny_mhc_checkpoint))
    problems, _ = load_problems("synthetic", count=256, seed=5, synthetic_mix="mixed")
    obs = GateScorer(model, tokenizer, batch_size=64).observations(problems)
    heavy = np.array([p.extra["type"] in ("mul_div", "long") for p in problems])
    target = np.where(heavy, TARGETS[True], TARGETS[False])
    curvature = EFFECT / (TARGETS[True] - TARGETS[False]) ** 2
    rng = np.random.default_rng(0)
    tilt = rng.normal(0, 0.3 * EFFECT, len(problems))
    noise = np.random.default_rng(1)

    def truth(idx, gates):
        g = gates[:, 0]
        return -curvature * (g - target[idx]) ** 2 + tilt[idx] * (g - 0.5)

    def reward(idx, gates):
        return truth(idx, gates) + noise.normal(0, 0.2 * EFFECT, len(idx))

    return obs, heavy, truth, reward


def _split(n):
    order = np.random.default_rng(2).permutation(n)
    return order[: n // 2], order[n // 2:]


def _closed_gap(truth, heavy, test, gates):
    """(V_pi - V_fix) / (V_orc - V_fix) on the held-out problems, from the noiseless planted reward."""
    grid = np.linspace(0, 1, 101, dtype=np.float32)
    table = np.stack([truth(test, np.full((len(test), 1), g, np.float32)) for g in grid], 1)   # [n, 101]
    v_fix, v_orc = table.mean(0).max(), table.max(1).mean()
    v_pi = truth(test, gates.reshape(-1, 1)).mean()
    return (v_pi - v_fix) / (v_orc - v_fix)


def test_rloo_recovers_the_planted_signal_on_real_observations(planted):
    obs, heavy, truth, reward = planted
    train, test = _split(len(obs))
    cfg = RLConfig(model_tag="planted")           # the config's own RLOO settings, not tuned to this test
    scorer = PlantedScorer(obs, reward)
    problems = [scorer.problems[i] for i in train]
    learner = RLOOLearner(scorer, problems, ObsWhitener.fit(obs[train]), samples_per_problem=cfg.rloo_samples,
                          problems_per_step=cfg.rloo_problems_per_step, learning_rate=cfg.rloo_learning_rate,
                          seed=0)
    learner.learn(16384)
    gates = learner.policy_gates(obs[test])[:, 0]
    assert gates[heavy[test]].mean() > 0.6 and gates[~heavy[test]].mean() < 0.4, (gates[heavy[test]].mean(),
                                                                                  gates[~heavy[test]].mean())
    assert _closed_gap(truth, heavy, test, gates) > 0.5


@pytest.mark.slow   # ~40-80 s on 2 cores: 2,560 PPO minibatch updates
def test_ppo_recovers_the_planted_signal_on_real_observations(planted):
    obs, heavy, truth, reward = planted
    train, test = _split(len(obs))
    cfg = RLConfig(model_tag="planted")           # the GPU preset's PPO settings are these defaults
    scorer = PlantedScorer(obs, reward)
    whitener = ObsWhitener.fit(obs[train])
    vec = GSM8KMHCVecEnv(scorer, [scorer.problems[i] for i in train], num_envs=16, seed=0,
                         action_map=cfg.action_map, whitener=whitener)
    ppo = build_ppo(vec, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                    n_epochs=cfg.n_epochs, gamma=cfg.gamma, ent_coef=cfg.ent_coef, seed=0)
    ppo.learn(16384)
    gates = policy_gates(ppo, obs[test], cfg.action_map, whitener)[:, 0]
    assert gates[heavy[test]].mean() > 0.6 and gates[~heavy[test]].mean() < 0.4, (gates[heavy[test]].mean(),
                                                                                  gates[~heavy[test]].mean())
    assert _closed_gap(truth, heavy, test, gates) > 0.5


def test_rloo_leave_one_out_baseline_and_budget():
    """With a reward that does not depend on the gate the advantages are exactly 0 (the LOO baseline removes each
    problem's level), so the policy's mean does not move; every update scores B x K rows."""
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    scorer = PlantedScorer(obs, lambda idx, g: idx.astype(np.float64))   # problem level only
    learner = RLOOLearner(scorer, scorer.problems, ObsWhitener.fit(obs), samples_per_problem=4, problems_per_step=8)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    learner.learn(320)
    assert learner.num_timesteps == scorer.problems_scored == 320 and learner.n_updates == 10
    assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())


def test_sigmoid_map_never_clips_and_is_the_policy_map():
    a = np.array([[-30.0], [-10.0], [0.0], [3.0], [10.0]], np.float32)
    g = actions_to_gates(a, "sigmoid")[:, 0]
    assert g[2] == pytest.approx(0.5) and 0 < g[0] <= g[1] < 1e-4 and 1 - 1e-4 < g[4] < 1
    assert np.allclose(g[1:], logit_gates(a[1:, 0]))
    # the initial policy sits in the middle: under SB3's N(0, 1) no action is clipped, against ~32% with "linear"
    z = np.random.default_rng(0).normal(size=(20000, 1)).astype(np.float32)
    lin = actions_to_gates(z, "linear")
    assert ((lin == 0) | (lin == 1)).mean() == pytest.approx(0.32, abs=0.02)
    sig = actions_to_gates(z, "sigmoid")
    assert ((sig == 0) | (sig == 1)).mean() == 0.0
    with pytest.raises(UserError, match="action map"):
        actions_to_gates(z, "tanh")


def test_whitener_and_policy_shapes():
    obs = np.random.default_rng(0).normal(3.0, 5.0, size=(100, 6)).astype(np.float32)
    obs[:, 5] = 1.0                                   # a constant feature: centred, not divided by zero
    w = ObsWhitener.fit(obs)
    x = w(obs)
    assert np.allclose(x[:, :5].mean(0), 0, atol=1e-5) and np.allclose(x[:, :5].std(0), 1, atol=1e-4)
    assert np.all(x[:, 5] == 0)
    assert np.allclose(ObsWhitener.from_state(w.state_dict())(obs), x)
    policy = GatePolicy(6, 3)
    assert policy.gates(x[:4]).shape == (4, 3) and np.allclose(policy.gates(x[:4]), 0.5)   # starts context-free
    with pytest.raises(UserError, match="at least 2 samples"):
        RLOOLearner(PlantedScorer(obs, lambda i, g: i), PlantedScorer(obs, None).problems, w, samples_per_problem=1)
