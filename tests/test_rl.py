"""The RL gate controller: the gymnasium env and its batched vec env, rewards that really reach the model, PPO that
learns a constructed optimum, exact resume of policy checkpoints, the black-box baselines and the evaluation, and
bad input."""
from __future__ import annotations

import hashlib
import json

import gymnasium
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import envs
from envs.gate_search import evaluate_arms, evolution_strategy, grid_search, random_search
from envs.gsm8k_env import load_problems
from envs.mhc_env import (ACTION_SPACES, ENV_ID, GateScorer, GSM8KMHCEnv, GSM8KMHCVecEnv, build_scorer, check_action,
                          gates_applied,
                          load_frozen_model, num_gates)
from envs.ppo_controller import build_ppo, policy_gates
from nanochat.checkpoint import latest_checkpoint
from nanochat.common import UserError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def frozen(tiny_mhc_checkpoint):
    model, tokenizer, path, meta = load_frozen_model(str(tiny_mhc_checkpoint))
    return model, tokenizer


@pytest.fixture(scope="module")
def problems(frozen):
    model, tokenizer = frozen
    probs, _ = load_problems("synthetic", count=24, seed=1, synthetic_steps=[1], synthetic_max_value=10)
    scorer = GateScorer(model, tokenizer, max_new_tokens=12)  # the longest generation the tests below ask for
    kept, dropped = scorer.fit(probs)
    assert dropped == 0
    return kept


def scorer_for(frozen, space="global", reward="dense", **kw):
    model, tokenizer = frozen
    return GateScorer(model, tokenizer, action_space=space, reward=reward, max_new_tokens=kw.pop("max_new_tokens", 8),
                      batch_size=kw.pop("batch_size", 8), **kw)


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


# -- the environment -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ACTION_SPACES)
def test_env_passes_gymnasium_and_sb3_checkers(frozen, problems, space):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check
    env = GSM8KMHCEnv(scorer=scorer_for(frozen, space), action_space=space, reward="dense", problems=problems[:6])
    assert env.action_space.shape == (num_gates(space, 2),) and env.observation_space.shape == (64,)
    gym_check(env, skip_render_check=True)
    with pytest.warns(UserWarning):  # SB3 recommends a symmetric action space; the env's is the gate range [0, 1]
        sb3_check(env, warn=True)


def test_make_by_id_and_one_seed_gives_the_same_episode(tiny_mhc_checkpoint):
    assert envs.ENV_ID in gymnasium.registry
    env = gymnasium.make(ENV_ID, checkpoint=str(tiny_mhc_checkpoint), action_space="per_layer", reward="dense",
                         problems="synthetic", num_problems=8, max_new_tokens=8)
    obs1, info1 = env.reset(seed=3)
    r1 = env.step(np.array([0.3, 0.8], np.float32))
    obs2, info2 = env.reset(seed=3)
    r2 = env.step(np.array([0.3, 0.8], np.float32))
    assert info1["problem_id"] == info2["problem_id"] and np.array_equal(obs1, obs2)
    assert r1[1] == r2[1] and r1[2] is True and r1[4]["dense"] == r1[1]
    ids = {env.reset(seed=s)[1]["problem_id"] for s in range(8)}
    assert len(ids) > 1  # different seeds, different problems
    env.close()


@pytest.mark.parametrize("space", ACTION_SPACES)
def test_every_gate_of_every_action_space_changes_the_reward(frozen, problems, space):
    scorer = scorer_for(frozen, space)
    k = scorer.num_gates
    probs = problems[:4]
    base = np.array([r["dense"] for r in scorer.score(probs, np.zeros((4, k), np.float32))])
    for j in range(k):
        gates = np.zeros((4, k), np.float32)
        gates[:, j] = 1.0
        moved = np.array([r["dense"] for r in scorer.score(probs, gates)])
        assert np.abs(moved - base).max() > 1e-4, (space, j)


def test_a_new_action_space_is_one_registration(frozen, problems):
    """Registered here, in the test: one gate for every attention sub-layer and one for every MLP. The config
    accepts it, the env builds its Box from it, and each value reaches the sub-layers it names."""
    from nanochat.config import RLConfig
    from nanochat.gate_rewards import ACTION_SPACES, register_action_space
    register_action_space("attn_mlp", lambda L: 2, lambda g, L: np.tile(g, L), "attention gate, MLP gate")
    try:
        RLConfig(model_tag="m", action_space="attn_mlp").validate()
        env = GSM8KMHCEnv(scorer=scorer_for(frozen, "attn_mlp"), action_space="attn_mlp", reward="dense",
                          problems=problems[:4])
        assert env.action_space.shape == (2,)
        env.reset(seed=0)
        _, reward, terminated, _, info = env.step(np.array([0.1, 0.9], np.float32))
        assert terminated and np.isfinite(reward)
        model = frozen[0]
        with gates_applied(model, "attn_mlp", np.array([0.1, 0.9], np.float32)):
            assert model.get_mhc_gates() == pytest.approx([0.1, 0.9, 0.1, 0.9])  # 2 layers: attn, mlp, attn, mlp
    finally:
        del ACTION_SPACES["attn_mlp"]


def test_batched_scoring_equals_one_problem_at_a_time(frozen, problems):
    """Per-example gates in one batch (forward for dense, KV-cache generation for exact) == each problem alone."""
    scorer = scorer_for(frozen, "per_sublayer", reward="mix", max_new_tokens=12)
    probs = problems[:6]
    gates = np.random.default_rng(0).uniform(0, 1, (6, 4)).astype(np.float32)
    batched = scorer.score(probs, gates)
    for b, p in enumerate(probs):
        alone = scorer.score([p], gates[b:b + 1])[0]
        assert abs(alone["dense"] - batched[b]["dense"]) < 1e-5
        assert alone["completion"] == batched[b]["completion"] and alone["correct"] == batched[b]["correct"]
    assert len({round(r["dense"], 6) for r in batched}) > 1


def test_reward_baseline_is_the_learned_gates_reward_on_the_same_problem(frozen, problems):
    probs = problems[:6]
    plain = scorer_for(frozen, "global")
    relative = scorer_for(frozen, "global", reward_baseline="default")
    relative.prepare(probs)
    gates = np.random.default_rng(1).uniform(0, 1, (6, 1)).astype(np.float32)
    raw = plain.score(probs, gates)
    learned = plain.score(probs, None)
    rel = relative.score(probs, gates)
    for r, x, d in zip(rel, raw, learned):
        assert r["raw_reward"] == x["reward"] and r["reward"] == pytest.approx(x["reward"] - d["reward"], abs=1e-7)
    assert all(abs(r["reward"]) < 1e-7 for r in relative.score(probs, None))  # the learned gates score 0
    assert relative.score(probs, gates, relative=False)[0]["reward"] == raw[0]["reward"]
    with pytest.raises(UserError, match="reward baseline must be one of"):
        scorer_for(frozen, reward_baseline="mean")


def test_vec_env_batches_seeds_and_maps_actions(frozen, problems):
    scorer = scorer_for(frozen, "per_layer")
    vec = GSM8KMHCVecEnv(scorer, problems, num_envs=4, seed=0, action_map="linear")
    assert vec.action_space.low.min() == -1.0
    obs = vec.reset()
    assert obs.shape == (4, 64) and obs.dtype == np.float32
    before = scorer.problems_scored
    actions = np.array([[-1, -1], [1, 1], [0, 0], [5, -5]], np.float32)
    new_obs, rewards, dones, infos = vec.step(actions)
    assert scorer.problems_scored - before == 4  # one batched call for the 4 slots
    assert dones.all() and rewards.shape == (4,)
    assert [i["gates"].tolist() for i in infos] == [[0, 0], [1, 1], [0.5, 0.5], [1, 0]]
    assert np.array_equal(infos[0]["terminal_observation"], obs[0])
    # the same seed replays the same problems; the state round-trips (exact resume)
    other = GSM8KMHCVecEnv(scorer, problems, num_envs=4, seed=0, action_map="linear")
    assert np.array_equal(other.reset(), obs)
    state = vec.get_state()
    nxt = vec.step(actions)[0]
    vec.set_state(state)
    assert np.array_equal(vec.reset(), new_obs) and np.array_equal(vec.step(actions)[0], nxt)


def test_bad_actions_and_inputs_are_named(frozen, problems, tiny_baseline_checkpoint, tmp_path, monkeypatch):
    env = GSM8KMHCEnv(scorer=scorer_for(frozen, "per_layer"), action_space="per_layer", problems=problems[:2])
    with pytest.raises(UserError, match="reset"):
        env.step(np.zeros(2, np.float32))
    env.reset(seed=0)
    with pytest.raises(UserError, match="non-finite"):
        env.step(np.array([0.5, np.nan], np.float32))
    with pytest.raises(UserError, match="3 gate values for an action space of 2"):
        env.step(np.zeros(3, np.float32))
    _, _, _, _, info = env.step(np.array([1.5, -0.5], np.float32))  # clipped, and reported
    assert info["clipped"] and info["gates"].tolist() == [1.0, 0.0]
    assert check_action(np.array([0.2, 0.4]), 2)[1] is False
    with pytest.raises(UserError, match="without mHC"):
        build_scorer(checkpoint=str(tiny_baseline_checkpoint))
    with pytest.raises(UserError, match="reward must be one of"):
        scorer_for(frozen, reward="accuracy")
    with pytest.raises(UserError, match="action space must be one of"):
        scorer_for(frozen, space="per_head")
    with pytest.raises(UserError, match="built for action space"):
        GSM8KMHCEnv(scorer=scorer_for(frozen, "global"), action_space="per_layer", problems=problems)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="gsm8k/train.jsonl"):
        load_problems("gsm8k", split="train", task_data="local")


# -- PPO -------------------------------------------------------------------------------------------------------

class ContextScorer:
    """A constructed problem: problem i has a one-hot feature for its type, and the reward is 1 - |g - target|,
    with target 0.9 for type 0 and 0.1 for type 1. The best fixed gate scores 0.6 on average; a policy that reads
    the observation can score ~1."""

    class _Config:
        n_embd = 4

    class _Model:
        pass

    def __init__(self):
        self.model = self._Model()
        self.model.config = self._Config()
        self.num_gates = 1
        self.obs_dim = 4

    def prepare(self, problems):
        pass

    def observations(self, problems):
        return np.stack([np.eye(4, dtype=np.float32)[p % 2] for p in problems])

    def score(self, problems, gates, **kw):
        target = np.where(np.asarray(problems) % 2 == 0, 0.9, 0.1)
        return [dict(id=p, reward=float(1 - abs(g[0] - t))) for p, g, t in zip(problems, gates, target)]


def test_ppo_learns_a_constructed_context_dependent_optimum():
    torch.manual_seed(0)
    vec = GSM8KMHCVecEnv(ContextScorer(), list(range(64)), num_envs=8, seed=0, action_map="linear")
    ppo = build_ppo(vec, learning_rate=3e-3, n_steps=256, batch_size=64, n_epochs=10, gamma=0.99, ent_coef=0.0,
                    seed=0)
    obs = np.eye(4, dtype=np.float32)[:2]
    before = policy_gates(ppo, obs, "linear")[:, 0]
    assert abs(before[0] - before[1]) < 0.05  # the initial policy ignores the context (~0.5 for both)
    ppo.learn(6144)
    after = policy_gates(ppo, obs, "linear")[:, 0]
    assert after[0] > 0.75 and after[1] < 0.25, after  # targets 0.9 and 0.1


def test_ppo_on_the_model_leaves_its_weights_alone(frozen, problems):
    model, _ = frozen
    before = weights_hash(model)
    vec = GSM8KMHCVecEnv(scorer_for(frozen, "per_sublayer"), problems, num_envs=4, seed=0, action_map="linear")
    ppo = build_ppo(vec, learning_rate=3e-4, n_steps=16, batch_size=8, n_epochs=2, gamma=0.99, ent_coef=0.0, seed=0)
    ppo.learn(32)
    assert weights_hash(model) == before and not any(p.requires_grad for p in model.parameters())
    assert all(m.gate_override is None for m in model.mhc_modules())  # scoring leaves no override behind


def test_black_box_baselines_respect_the_budget(frozen, problems):
    scorer = scorer_for(frozen, "global")
    n0 = scorer.problems_scored
    grid = grid_search(scorer, problems, 44, grid=(0.0, 0.5, 1.0, 0.25))
    assert scorer.problems_scored - n0 == grid["budget"] == 44 and len(grid["table"]) == 4
    assert grid["best_train_reward"] == max(r["mean_reward"] for r in grid["table"])
    rnd = random_search(scorer, problems, 40, num_candidates=5)
    assert rnd["budget"] == 40 and len(rnd["best_gates"]) == 2 and all(0 <= g <= 1 for g in rnd["best_gates"])
    es = evolution_strategy(scorer, problems, 48, population=4, parents=2, generations=3)
    assert es["budget"] == 48 and len(es["history"]) == 3
    with pytest.raises(UserError, match="too small"):
        grid_search(scorer, problems, 5)


def test_evaluate_arms_reports_ci_and_paired_tests(frozen, problems):
    scorer = scorer_for(frozen, "global")
    arms = {"default": ("global", None), "gate0": ("global", [0.0]), "gate1": ("global", [1.0]),
            "policy": ("global", lambda obs: np.full((len(obs), 1), 0.5, np.float32))}
    results, comparisons, records = evaluate_arms(scorer, problems[:8], arms, "default", [("gate0", "gate1")])
    assert set(results) == set(arms) and len(records) == 4 * 8
    for name, r in results.items():
        assert r["exact"]["n"] == 8 and len(r["exact"]["ci95"]) == 2 and r["dense"]["n"] == 8
    pairs = {(c["a"], c["b"]) for c in comparisons}
    assert pairs == {("default", "gate0"), ("default", "gate1"), ("default", "policy"), ("gate0", "gate1")}
    c = next(c for c in comparisons if c["b"] == "gate1" and c["a"] == "default")
    d0 = np.array([r["dense"] for r in records if r["arm"] == "default"])
    d1 = np.array([r["dense"] for r in records if r["arm"] == "gate1"])
    assert c["dense"]["diff"] == pytest.approx((d1 - d0).mean()) and 0 <= c["dense"]["p_value"] <= 1
    assert results["policy"]["chosen_gates"]["mean"] == [0.5]
    with pytest.raises(UserError, match="not among the arms"):
        evaluate_arms(scorer, problems[:2], arms, "learned")


# -- the script ------------------------------------------------------------------------------------------------

def rl_args(ckpt, results, tag, total, *extra):
    return ["--checkpoint", str(ckpt), "--tag", tag, "--results-dir", str(results), "--problems", "synthetic",
            "--synthetic-steps", "1", "--synthetic-max-value", "10", "--train-problems", "32", "--eval-problems",
            "8", "--reward", "dense", "--max-new-tokens", "8", "--num-envs", "8", "--n-steps", "16",
            "--batch-size", "8", "--n-epochs", "2", "--total-timesteps", str(total), "--save-every", "16",
            "--no-progress", "--score-batch-size", "16", "--val-problems", "8", *extra]


def policy_weights(base_dir, tag):
    return load_file(f"{latest_checkpoint(str(base_dir / 'checkpoints' / 'rl' / tag))}/model.safetensors")


def test_train_rl_resume_equals_straight_run(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from scripts.train_rl import main
    straight = main(rl_args(tiny_mhc_checkpoint, tmp_path, "straight", 64, "--baselines", "grid,random,es",
                            "--random-candidates", "4", "--es-population", "4", "--es-parents", "2",
                            "--es-generations", "2"))
    main(rl_args(tiny_mhc_checkpoint, tmp_path, "split", 32, "--baselines", "none"))
    resumed = main(rl_args(tiny_mhc_checkpoint, tmp_path, "split", 64, "--baselines", "none", "--resume"))
    a, b = policy_weights(tiny_base_dir.base_dir, "straight"), policy_weights(tiny_base_dir.base_dir, "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["policy_timesteps"] == resumed["policy_timesteps"] == 64
    metrics = [json.loads(line) for line in open(tmp_path / "rl" / "split" / "metrics.jsonl")]
    # no duplicated iteration after the resume; the resume's allowed changes are recorded at its step
    assert [m["step"] for m in metrics if "mean_reward" in m] == [16, 32, 48, 64]
    # PPO's diagnostics on every iteration: explained variance, clip fraction, the policy's std, gates at a bound
    assert all({"explained_variance", "clip_fraction", "std", "policy_std", "gates_at_bounds"} <= set(m)
               for m in metrics if "mean_reward" in m)
    # SB3 conventions: the final policy as SB3's own zip, Monitor-style episode files (one per start)
    from stable_baselines3 import PPO
    loaded = PPO.load(str(tmp_path / "rl" / "straight" / "ppo_policy.zip"), device="cpu")
    whitening = json.loads((tmp_path / "rl" / "straight" / "ppo_policy_obs_whitening.json").read_text())
    obs = np.zeros((2, len(whitening["mean"])), np.float32)
    assert loaded.predict(obs, deterministic=True)[0].shape == (2, 1)
    episodes = (tmp_path / "rl" / "straight" / "from_0.monitor.csv").read_text().splitlines()
    assert episodes[1] == "r,l,t" and len(episodes) == 2 + 64          # one line per one-step episode
    assert [p.name for p in (tmp_path / "rl" / "split").glob("*.monitor.csv")] and \
        sorted(p.name for p in (tmp_path / "rl" / "split").glob("*.monitor.csv")) == ["from_0.monitor.csv",
                                                                                    "from_32.monitor.csv"]
    # model selection on the validation pool: the initial policy (step 0) and the last are candidates
    vals = [m for m in metrics if "val_reward" in m]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 64 and all(np.isfinite(m["val_reward"]) for m in vals)
    assert {"step": 32, "config_change": {"resume": [False, True], "total_timesteps": [32, 64]}} in metrics
    # eval.json: arms (a)-(e) with n, CIs and paired tests against the learned gates
    record = json.loads((tmp_path / "rl" / "straight" / "eval.json").read_text())
    assert {"default", "rl_policy", "rl_policy_stochastic", "rl_initial", "grid", "random", "es", "gate0",
            "gate1"} <= set(record["arms"]) <= {"default", "rl_policy", "rl_policy_stochastic", "rl_initial",
                                                "rl_last", "grid", "random", "es", "gate0", "gate1"}
    # the best black box is chosen on the validation problems, where every baseline's returned vector was scored
    assert all("validation_reward" in record["baselines"][n] for n in ("grid", "random", "es"))
    assert record["best_black_box"] == max(("grid", "random", "es"),
                                           key=lambda n: record["baselines"][n]["validation_reward"])
    assert all(r["exact"]["n"] == 8 for r in record["arms"].values())
    assert {c["b"] for c in record["comparisons"] if c["a"] == "default"} == set(record["arms"]) - {"default"}
    assert record["best_black_box"] in ("grid", "random", "es") and record["verdicts"]["rl_vs_best_black_box"]
    assert record["baselines"]["grid"]["budget"] <= 64 and record["scale"] == "smoke"
    assert "chosen_gates" in record["arms"]["rl_policy"]


def test_train_rl_rloo_resume_equals_straight_run(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from scripts.train_rl import main
    rloo = ("--algo", "rloo", "--rloo-samples", "4", "--rloo-problems-per-step", "4", "--baselines", "none")
    straight = main(rl_args(tiny_mhc_checkpoint, tmp_path, "rloo_straight", 64, *rloo))
    main(rl_args(tiny_mhc_checkpoint, tmp_path, "rloo_split", 32, *rloo))
    resumed = main(rl_args(tiny_mhc_checkpoint, tmp_path, "rloo_split", 64, *rloo, "--resume"))
    a, b = policy_weights(tiny_base_dir.base_dir, "rloo_straight"), policy_weights(tiny_base_dir.base_dir, "rloo_split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["policy_timesteps"] == resumed["policy_timesteps"] == 64 and straight["algo"] == "rloo"
    metrics = [json.loads(line) for line in open(tmp_path / "rl" / "rloo_split" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "mean_reward" in m] == [16, 32, 48, 64]   # 4 problems x 4 samples
    assert straight["arms"]["rl_policy"]["dense"]["n"] == 8


def test_train_rl_tensorboard_log(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from scripts.train_rl import main   # tensorboard is in the rl extra (pyproject.toml)
    main(rl_args(tiny_mhc_checkpoint, tmp_path, "tb", 16, "--baselines", "none", "--tensorboard-log",
                 str(tmp_path / "tb")))
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_train_rl_refuses_what_it_cannot_do_honestly(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from scripts.train_rl import main
    with pytest.raises(UserError, match="--reward must be one of"):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "bad", 16, "--reward", "accuracy"))
    with pytest.raises(UserError, match="--action-space must be one of"):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "bad", 16, "--action-space", "per_head"))
    with pytest.raises(UserError, match="no policy checkpoint"):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "never", 16, "--eval-only"))
    with pytest.raises(UserError, match="both 'train'"):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "bad", 16, "--problems", "gsm8k", "--eval-split", "train"))
    main(rl_args(tiny_mhc_checkpoint, tmp_path, "once", 16, "--baselines", "none"))
    with pytest.raises(UserError, match="--resume"):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "once", 16, "--baselines", "none"))
    with pytest.raises(UserError, match="--action-space: checkpoint .global., now .per_layer."):
        main(rl_args(tiny_mhc_checkpoint, tmp_path, "once", 32, "--baselines", "none", "--resume",
                     "--action-space", "per_layer"))
    evaluated = main(rl_args(tiny_mhc_checkpoint, tmp_path, "once", 16, "--baselines", "none", "--eval-only"))
    assert evaluated["policy_timesteps"] == 16


def test_presets_load_and_flags_override_them():
    from nanochat.config import RLConfig, build_config
    from scripts.train_rl import with_preset
    cfg, _ = build_config(RLConfig, with_preset(["--preset", "tiny", "--model-tag", "m", "--num-envs", "8"]), "")
    assert (cfg.problems, cfg.reward, cfg.total_timesteps, cfg.num_envs) == ("synthetic", "dense", 768, 8)
    cfg, _ = build_config(RLConfig, with_preset(["--preset=gpu", "--model-tag", "m"]), "")
    assert (cfg.problems, cfg.reward, cfg.total_timesteps, cfg.ent_coef) == ("gsm8k", "exact", 50000, 0.1)
    defaults = RLConfig(model_tag="m")  # the plan's PPO settings are the dataclass defaults
    assert (defaults.learning_rate, defaults.n_steps, defaults.batch_size, defaults.n_epochs, defaults.gamma,
            defaults.ent_coef, defaults.total_timesteps) == (3e-4, 1024, 64, 10, 0.99, 0.1, 50000)
    for bad, match in [(["--preset", "huge"], "--preset must be one of"),
                       (["--preset", "tiny", "--config", "rl_gpu"], "not both")]:
        with pytest.raises(UserError, match=match):
            with_preset(bad)


def test_ppo_on_the_tiny_model_beats_its_initial_policy(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    """On this model the dense reward rises with the gate (g = 1 beats g = 0), and the untrained policy sits at
    g = 0.5: PPO with the dense reward must move the gate up and score better than its initial policy on held-out
    problems (paired test)."""
    from scripts.train_rl import main
    result = main(rl_args(tiny_mhc_checkpoint, tmp_path, "learns", 1024, "--baselines", "grid", "--n-steps", "128",
                          "--n-epochs", "5", "--batch-size", "32", "--eval-problems", "32", "--learning-rate", "3e-3", "--eval-every", "0",
                          "--ent-coef", "0"))
    arms, comp = result["arms"], {(c["a"], c["b"]): c for c in result["comparisons"]}
    assert arms["gate1"]["dense"]["mean"] > arms["gate0"]["dense"]["mean"]  # the landscape this test relies on
    assert arms["rl_initial"]["chosen_gates"]["mean"][0] == pytest.approx(0.5, abs=0.05)
    assert arms["rl_policy"]["chosen_gates"]["mean"][0] > 0.6
    c = comp[("rl_initial", "rl_policy")]["dense"]
    assert c["diff"] > 0 and c["p_value"] < 0.05, c


def test_sigterm_saves_a_boundary_checkpoint_and_resume_is_exact(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    """A real SIGTERM during PPO: the run writes the last rollout-boundary snapshot and exits 143; --resume then ends
    with exactly the policy of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from scripts.train_rl import main
    repo = Path(__file__).resolve().parents[1]
    args = lambda tag: rl_args(tiny_mhc_checkpoint, tmp_path, tag, 1024, "--baselines", "none",  # noqa: E731
                               "--save-every", "100000")
    main(args("uninterrupted"))
    proc = subprocess.Popen([sys.executable, "scripts/train_rl.py", *args("killed")], cwd=repo,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "rl" / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # 1024 timesteps take far longer than 2 iterations
    assert "stopped by signal 15" in out
    stopped = latest_checkpoint(str(tiny_base_dir.base_dir / "checkpoints" / "rl" / "killed"))
    assert stopped is not None and 0 < int(stopped.rsplit("_", 1)[1]) < 1024
    main(args("killed") + ["--resume"])
    a, b = policy_weights(tiny_base_dir.base_dir, "uninterrupted"), policy_weights(tiny_base_dir.base_dir, "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in map(json.loads, open(metrics)) if "mean_reward" in r]   # one per iteration
    assert steps == list(range(16, 1025, 16))


def test_train_rl_seeds_aggregates_over_seeds(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    """--seeds runs once per seed (tags <tag>-s<seed>) and writes the arms over seeds, with the RL policy against
    each seed's best black box and a TOST within the config's margin."""
    from scripts.train_rl import main
    out = main(rl_args(tiny_mhc_checkpoint, tmp_path, "multi", 16, "--seeds", "0,1,2", "--baselines", "grid",
                       "--algo", "rloo", "--rloo-problems-per-step", "2"))
    assert out["seeds"] == [0, 1, 2] and out["tags"] == ["multi-s0", "multi-s1", "multi-s2"]
    saved = json.loads((tmp_path / "rl" / "multi" / "seeds.json").read_text())
    assert saved["arms"]["rl_policy"]["dense"]["n_seeds"] == 3
    per_seed = [json.loads((tmp_path / "rl" / f"multi-s{s}" / "eval.json").read_text()) for s in range(3)]
    gains = [e["arms"]["rl_policy"]["dense"]["mean"] - e["arms"]["default"]["dense"]["mean"] for e in per_seed]
    assert saved["arms"]["rl_policy"]["dense"]["mean"] == pytest.approx(np.mean(gains))
    assert saved["rl_vs_best_black_box"]["dense"]["tost"]["margin"] == 1e-3
    assert {e["rl_config"]["seed"] for e in per_seed} == {0, 1, 2}
