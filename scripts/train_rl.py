"""The RL gate controller over the mHC gates of a frozen model (phase 3 of the plan, docs/design.md): a learner (PPO
or RLOO), the black-box baselines it must beat, and the held-out evaluation of every arm.

    python scripts/train_rl.py --model-tag mhc_sft --action-space per_layer --reward exact       # GPU scale
    python scripts/train_rl.py --preset tiny --model-tag tiny_mhc_sft --algo rloo                # 2-core CPU
    python scripts/train_rl.py --preset tiny --model-tag tiny_mhc_sft --resume
    python scripts/train_rl.py --tag NAME --model-tag tiny_mhc_sft --eval-only                   # evaluation only

1. Problems, disjoint by question and without any question the model was fine-tuned on: a training pool, a
   validation pool and a held-out evaluation pool. GSM8K: the train split's rl_train and rl_val parts
   (nanochat/splits.py; the fine-tuning used its sft part) and `--eval-split test`; synthetic: generator seeds s,
   s + 2 and s + 1 of the fine-tuning mixture (`--synthetic-mix`).
2. The learner on the batched vec env (envs/mhc_env.py), each episode one problem (a contextual bandit):
   `--algo ppo` (stable-baselines3, the plan's) or `--algo rloo` (K gate samples per problem, a leave-one-out
   baseline, no critic; envs/bandit.py). Observations are whitened with the training pool's fixed statistics; the
   policy is a Gaussian in logit space squashed by a sigmoid (`--action-map sigmoid`), so no action is clipped.
   Every `--eval-every` timesteps the deterministic policy is scored on the validation pool and the best is kept
   (model selection, as SB3's EvalCallback). Metrics per iteration (reward, gates, PPO's explained variance, clip
   fraction, std; validation rewards) go to <results>/rl/<tag>/metrics.jsonl (and wandb with --run, TensorBoard with
   --tensorboard-log); PPO's episodes to SB3 monitor files; checkpoints to $NANOCHAT_BASE_DIR/checkpoints/rl/<tag>/
   (exact resume with --resume; SIGINT/SIGTERM save and exit); PPO's final policy also as SB3's own zip.
3. Baselines on the same budget of problems scored (envs/gate_search.py): a grid over the global gate, random
   search and an evolution strategy over per-layer gates -> baselines.json. The vector each returns (ES: its mean)
   is re-scored on the validation pool, and the best black box is chosen there.
4. Evaluation on the held-out problems, exact match and dense reward for each arm: the learned default gates, the
   selected RL policy (deterministic and stochastic), the last policy when selection chose another, the initial
   policy, each baseline's gates, g = 0 and g = 1; n, 95% CIs and paired tests against the default (McNemar for
   accuracy, paired t for the dense reward) and of the RL policy against each baseline; a tie only by TOST within
   `--tie-margin-*` -> eval.json, eval_examples.jsonl.
Read every RL result against analysis/gate_oracle.py's headroom on the same model: the per-problem oracle and the
cross-fitted contextual baselines bound what any policy can gain.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

from stable_baselines3.common.vec_env import VecMonitor

import envs  # noqa: F401 -- registers the gymnasium env
from envs.gate_search import evaluate_arms, evolution_strategy, grid_search, random_search
from envs.bandit import ObsWhitener, RLOOLearner
from envs.gsm8k_env import load_problems
from envs.mhc_env import GSM8KMHCVecEnv, build_problem_pool, build_scorer
from envs.ppo_controller import (ControllerCallback, ModelSelector, build_ppo, policy_gates, restore, restore_rloo,
                                 take_snapshot, write_rloo, write_snapshot)
from nanochat.checkpoint import latest_checkpoint, read_meta
from nanochat.common import (SMOKE_PARAMS, UserError, WriteError, atomic_write_text, autodetect_device_type,
                             check_writable, doc_summary, get_base_dir, git_commit, init_wandb, machine_info,
                             resolve_precision, run_main, writes_results)
from nanochat.config import RLConfig, build_config, parse_int_list, resolve_config_path
from nanochat.splits import describe
from nanochat.training import WRITE_FAILED, Run, atomic_json

PRESETS = ("tiny", "gpu")  # configs/rl_tiny.toml, configs/rl_gpu.toml
SYNTHETIC_DEFAULT_COUNTS = (2048, 512)  # training / evaluation pool when --train/eval-problems is -1


def with_preset(argv):
    """--preset NAME (or --preset=NAME) = --config rl_NAME (flags still override it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--preset" or argv[i].startswith("--preset="):
            name = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in argv[i] else 2
            if name not in PRESETS:
                raise UserError(f"--preset must be one of {', '.join(PRESETS)} (got {name!r})")
            if any(a == "--config" or a.startswith("--config=") for a in argv):
                raise UserError("pass --preset or --config, not both")
            out += ["--config", resolve_config_path(f"rl_{name}")]
            continue
        out.append(argv[i])
        i += 1
    return out


def fine_tuning_questions(sft_config: dict, cfg: RLConfig) -> list[str]:
    """The questions the controlled model was fine-tuned on that RL's pools must not hold: the synthetic problems
    of its fine-tuning run, regenerated from its recorded settings. GSM8K needs none: its parts are disjoint by
    construction (nanochat/splits.py); a fine-tuning run from before the split, or with another split seed, is
    refused when RL runs on GSM8K."""
    sources = [s.strip() for s in str(sft_config.get("data", "")).split(",") if s.strip()]
    if cfg.problems == "gsm8k" and "gsm8k" in sources and sft_config.get("split_seed") != cfg.split_seed:
        raise UserError(f"the controlled model was fine-tuned on GSM8K train with split seed "
                        f"{sft_config.get('split_seed', '(none: all of GSM8K train, before the split)')}, RL uses "
                        f"--split-seed {cfg.split_seed}: RL's problems would include fine-tuning problems. Fine-tune "
                        f"again (scripts.sft_train) or pass its split seed")
    if "synthetic" not in sources:
        return []
    problems, _ = load_problems("synthetic", count=int(sft_config["synthetic_count"]),
                                seed=int(sft_config["synthetic_seed"]),
                                synthetic_steps=parse_int_list(str(sft_config.get("synthetic_steps", "1,2")),
                                                               "synthetic-steps"),
                                synthetic_max_value=int(sft_config.get("synthetic_max_value", 20)),
                                synthetic_ops=str(sft_config.get("synthetic_ops", "+-")),
                                synthetic_mix=str(sft_config.get("synthetic_mix", "")))
    return [p.extra["question"] for p in problems]


def problem_pools(cfg: RLConfig, scorer, sft_config: dict | None = None):
    """(train, validation, held-out evaluation problems, their descriptions): disjoint by question, and without any
    question the model was fine-tuned on. GSM8K: the train split's rl_train and rl_val parts, the test split held
    out; synthetic: generator seeds s, s + 2 and s + 1."""
    seen = fine_tuning_questions(sft_config or {}, cfg)
    if cfg.problems == "synthetic":
        knobs = dict(synthetic_steps=parse_int_list(cfg.synthetic_steps, "synthetic-steps"),
                     synthetic_max_value=cfg.synthetic_max_value, synthetic_ops=cfg.synthetic_ops,
                     synthetic_mix=cfg.synthetic_mix)
        n_train = cfg.train_problems if cfg.train_problems > 0 else SYNTHETIC_DEFAULT_COUNTS[0]
        n_eval = cfg.eval_problems if cfg.eval_problems > 0 else SYNTHETIC_DEFAULT_COUNTS[1]
        train, train_info = build_problem_pool(scorer, "synthetic", count=n_train, seed=cfg.synthetic_seed,
                                               exclude=seen, **knobs)
        held, eval_info = build_problem_pool(scorer, "synthetic", count=n_eval, seed=cfg.synthetic_seed + 1,
                                             exclude=[*seen, *train], **knobs)
        val, val_info = (build_problem_pool(scorer, "synthetic", count=cfg.val_problems, seed=cfg.synthetic_seed + 2,
                                            exclude=[*seen, *train, *held], **knobs)
                         if cfg.val_problems else ([], dict(source="none", count=0)))
    else:
        part = dict(part="rl_train", split_seed=cfg.split_seed) if cfg.train_split == "train" else {}
        train, train_info = build_problem_pool(scorer, "gsm8k", split=cfg.train_split, count=cfg.train_problems,
                                               seed=cfg.seed, task_data=cfg.task_data, exclude=seen, **part)
        held, eval_info = build_problem_pool(scorer, "gsm8k", split=cfg.eval_split, count=cfg.eval_problems,
                                             seed=cfg.seed, task_data=cfg.task_data, exclude=[*seen, *train],
                                             **(dict(part="rl_val", split_seed=cfg.split_seed)
                                                if cfg.eval_split == "train" else {}))
        val, val_info = ([], dict(source="none", count=0))
        if cfg.val_problems and cfg.train_split == "train":
            val, val_info = build_problem_pool(scorer, "gsm8k", split="train", count=cfg.val_problems, seed=cfg.seed,
                                               task_data=cfg.task_data, part="rl_val", split_seed=cfg.split_seed,
                                               exclude=[*seen, *train, *held])
    train_info["ids"] = describe(train, "train")["ids_sha256"]
    eval_info["ids"] = describe(held, "eval")["ids_sha256"]
    val_info["ids"] = describe(val, "val")["ids_sha256"] if val else None
    return train, val, held, dict(train=train_info, val=val_info, eval=eval_info)


def run_baselines(cfg: RLConfig, scorer, train, budget: int, out_dir: str) -> dict:
    """Each requested baseline on `budget` problems scored; cached in baselines.json for the same settings."""
    path = os.path.join(out_dir, "baselines.json")
    key = dict(budget=budget, seed=cfg.seed, reward=cfg.reward, mix_weight=cfg.mix_weight,
               reward_baseline=cfg.reward_baseline,
               random_candidates=cfg.random_candidates, es=[cfg.es_population, cfg.es_parents, cfg.es_generations,
                                                            cfg.es_sigma], train_pool=[p.id for p in train][:50])
    cached = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            cached = saved["results"]
    results = {}
    for name in cfg.baseline_list():
        if name in cached:
            results[name] = cached[name]
            continue
        t0 = time.perf_counter()
        if name == "grid":
            results[name] = grid_search(scorer, train, budget, seed=cfg.seed)
        elif name == "random":
            results[name] = random_search(scorer, train, budget, cfg.random_candidates, seed=cfg.seed)
        else:
            results[name] = evolution_strategy(scorer, train, budget, cfg.es_population, cfg.es_parents,
                                               cfg.es_generations, cfg.es_sigma, seed=cfg.seed)
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"baseline {name}: best gates {np.round(results[name]['best_gates'], 3).tolist()} "
              f"(training reward {results[name]['best_train_reward']:.4f}, {results[name]['budget']} problems, "
              f"{results[name]['seconds']:.0f} s)", flush=True)
        atomic_json(path, dict(key=key, results={**cached, **results}))
    return results


def validate_baselines(scorer, val, baselines: dict) -> str | None:
    """Re-score the gate vector each baseline returns (ES: its final mean, which it never scored) on the same
    validation problems, and name the best black box by that: training rewards are a mean over one batch for the
    grid, a max over candidates for random search and ES (a winner's curse), so they cannot choose. Without
    validation problems the choice falls back to the training reward (and says so)."""
    if not baselines:
        return None
    if not val:
        print("warning: no validation problems: the best black box is chosen by its training reward", flush=True)
        return max(baselines, key=lambda n: baselines[n]["best_train_reward"])
    for name, res in baselines.items():
        g = np.tile(np.asarray(res["best_gates"], np.float32)[None], (len(val), 1))
        res["validation_reward"] = float(scorer.rewards(val, g, action_space=res["action_space"]).mean())
    return max(baselines, key=lambda n: baselines[n]["validation_reward"])


def verdict(comparisons: list[dict], a: str, b: str) -> str | None:
    """One honest sentence on whether arm b beats arm a (paired tests, 5% level). Without a significant
    difference, a tie is declared only when the TOST equivalence test within the config's margin says so;
    otherwise the comparison is inconclusive."""
    c = next((c for c in comparisons if c["a"] == a and c["b"] == b), None)
    if c is None:
        return None
    parts = []
    for metric, label in (("exact", "accuracy"), ("dense", "dense reward")):
        d, p = c[metric]["diff"], c[metric]["p_value"]
        if d is None or p is None:
            continue
        tost = c[metric].get("tost")
        if p < 0.05:
            parts.append(f"on {label} {b} {'beats' if d > 0 else 'is worse than'} {a} ({d:+.4f}, p = {p:.3g})")
        elif tost and tost["equivalent"]:
            parts.append(f"on {label} {b} ties {a} ({d:+.4f}, p = {p:.3g}; equivalent within "
                         f"+-{tost['margin']:g}, TOST p = {tost['p_value']:.3g})")
        else:
            margin = f" within +-{tost['margin']:g}" if tost else ""
            parts.append(f"on {label} {b} vs {a} is inconclusive ({d:+.4f}, p = {p:.3g}; no difference at 5% and "
                         f"no equivalence{margin})")
    return "; ".join(parts)


def print_table(arms: dict, comparisons: list[dict], reference: str):
    vs = {c["b"]: c for c in comparisons if c["a"] == reference}
    print(f"{'arm':<12} {'accuracy [95% CI]':<26} {'d acc (McNemar p)':<20} {'dense [95% CI]':<28} "
          f"{'d dense (t p)':<18}")
    for name, r in arms.items():
        e, d = r["exact"], r["dense"]
        c = vs.get(name)
        dacc = f"{c['exact']['diff']:+.3f} ({c['exact']['p_value']:.3g})" if c else ""
        dden = f"{c['dense']['diff']:+.4f} ({c['dense']['p_value']:.3g})" if c and c["dense"]["p_value"] is not None \
            else ""
        print(f"{name:<12} {e['acc']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] n={e['n']:<5} {dacc:<20} "
              f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] {dden:<18}")


def build_learner(cfg: RLConfig, scorer, train, whitener, vec=None):
    """The configured learner, untrained: PPO on the vec env, or RLOO on the training pool."""
    if cfg.algo == "rloo":
        return RLOOLearner(scorer, train, whitener or ObsWhitener(np.zeros(scorer.obs_dim), np.ones(scorer.obs_dim)),
                           samples_per_problem=cfg.rloo_samples, problems_per_step=cfg.rloo_problems_per_step,
                           learning_rate=cfg.rloo_learning_rate, ent_coef=cfg.ent_coef,
                           hidden=parse_int_list(cfg.net_arch, "net-arch"), log_std_init=cfg.log_std_init,
                           seed=cfg.seed)
    return build_ppo(vec, learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                     n_epochs=cfg.n_epochs, gamma=cfg.gamma, ent_coef=cfg.ent_coef, seed=cfg.seed,
                     net_arch=parse_int_list(cfg.net_arch, "net-arch"), log_std_init=cfg.log_std_init,
                     tensorboard_log=cfg.tensorboard_log)


def gates_fn(learner, vec, deterministic: bool = True, seed: int = 0):
    """raw observations [B, C] -> the learner's gates [B, k]."""
    if isinstance(learner, RLOOLearner):
        return lambda obs: learner.policy_gates(obs, deterministic, seed)
    return lambda obs: policy_gates(learner, obs, vec.action_map, vec.whitener, deterministic, seed)


def save_learner(learner, vec, root: str, meta: dict, keep: int) -> str:
    if isinstance(learner, RLOOLearner):
        return write_rloo(root, learner, meta, keep)
    return write_snapshot(root, take_snapshot(learner, vec), meta, keep)


@writes_results
def episode_monitor(path: str, vec, run: Run) -> VecMonitor:
    """SB3's VecMonitor writing path. Its episode rows are results too: a row that cannot be written goes the way
    of a metrics record that cannot (Run.write_failed: a checkpoint, then one line), and no row is written after."""
    monitor = VecMonitor(vec, path)
    writer, write_row = monitor.results_writer, monitor.results_writer.write_row

    def guarded(epinfo):
        if run.write_error is not None:
            return
        try:
            write_row(epinfo)
        except OSError as e:
            run.write_failed(WriteError(path, e))
    writer.write_row = guarded
    return monitor


def load_learner(learner, vec, path: str, restore_rng: bool = True) -> dict:
    if isinstance(learner, RLOOLearner):
        return restore_rloo(learner, path, restore_rng)
    return restore(learner, vec, path, restore_rng)


def learn_rloo(learner: RLOOLearner, cfg: RLConfig, root: str, meta: dict, log, stop, selector, wandb_run):
    """RLOO's loop: a metrics record per update (log: Run.log), the validation check and the periodic checkpoint at
    update boundaries, a stop on signal or a failed results write (after the update in flight)."""
    last_saved = learner.num_timesteps

    def after_step(rec):
        nonlocal last_saved
        log(rec)
        if wandb_run is not None:
            wandb_run.log({f"rl/{k}": v for k, v in rec.items() if not isinstance(v, list)})
        if selector.due(learner.num_timesteps):
            selector.evaluate(learner.num_timesteps, gates_fn(learner, None),
                              lambda r, extra: write_rloo(r, learner, {**meta, **extra}, 1))
        if learner.num_timesteps - last_saved >= cfg.save_every:
            write_rloo(root, learner, meta, cfg.keep_checkpoints)
            last_saved = learner.num_timesteps
        return not (stop.signum or stop.write_failed)

    learner.learn(cfg.total_timesteps, after_step)


def main(argv=None):
    cfg, _ = build_config(RLConfig, with_preset(argv), description=doc_summary(__doc__),
                          extra_args=lambda p: p.add_argument("--preset", choices=PRESETS, help=argparse_help()),
                          config_help="named RL config in configs/ (rl_tiny, rl_gpu) or a path to a .toml file; "
                          "--preset NAME is the same as --config rl_NAME")
    seeds = parse_int_list(cfg.seeds, "seeds") if cfg.seeds.strip() else []
    if not seeds:
        return run_one(cfg)
    base_tag = cfg.tag or default_tag(cfg)
    summaries = [run_one(dataclasses.replace(cfg, seed=s, seeds="", tag=f"{base_tag}-s{s}")) for s in seeds]
    out = aggregate_seeds(summaries, cfg)
    path = os.path.join(cfg.results_dir, "rl", base_tag, "seeds.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_json(path, out)
    for line in out["lines"]:
        print(line)
    print(f"wrote {path}")
    return out


def default_tag(cfg: RLConfig) -> str:
    """<model-tag>-<problems>-<action-space>-<reward>[-<algo> unless ppo] (the model tag, or the checkpoint's
    folder)."""
    model_tag = cfg.model_tag or os.path.basename(os.path.dirname(os.path.normpath(cfg.checkpoint)))
    return f"{model_tag}-{cfg.problems}-{cfg.action_space}-{cfg.reward}" + ("" if cfg.algo == "ppo" else
                                                                            f"-{cfg.algo}")


def aggregate_seeds(summaries: list[dict], cfg: RLConfig) -> dict:
    """The arms over seeds: per arm, its gain over the learned gates (dense reward and accuracy) as mean and IQM with
    bootstrap CIs over the seeds; the RL policy against the best black box of each seed, with a TOST over the seeds'
    differences (a tie only within the config's margins)."""
    from nanochat.stats import paired_mean, seeds_summary, tost_paired
    arms = [a for a in summaries[0]["arms"] if all(a in s["arms"] for s in summaries)]
    out = dict(seeds=[s["rl_config"]["seed"] for s in summaries], tags=[s["tag"] for s in summaries],
               algo=cfg.algo, margins=dict(dense=cfg.tie_margin_dense, exact=cfg.tie_margin_accuracy), arms={},
               lines=[])

    def gain(s, arm, metric):
        key = "mean" if metric == "dense" else "acc"
        return s["arms"][arm][metric][key] - s["arms"]["default"][metric][key]

    for arm in arms:
        if arm == "default":
            continue
        out["arms"][arm] = {m: seeds_summary([gain(s, arm, m) for s in summaries]) for m in ("dense", "exact")}
    vs = {}
    for metric in ("dense", "exact"):
        rl = [gain(s, "rl_policy", metric) for s in summaries]
        bb = [gain(s, s["best_black_box"], metric) if s.get("best_black_box") else None for s in summaries]
        if None in bb:
            continue
        d = np.asarray(rl) - np.asarray(bb)
        vs[metric] = dict(rl_minus_best_black_box=seeds_summary(d), test=paired_mean(bb, rl),
                          tost=tost_paired(bb, rl, out["margins"][metric]))
    out["rl_vs_best_black_box"] = vs
    for arm, r in out["arms"].items():
        g = r["dense"]
        out["lines"].append(f"{arm:<22} dense gain over the learned gates: mean {g['mean']:+.5f} [{g['mean_ci'][0]:+.5f}"
                            f", {g['mean_ci'][1]:+.5f}], IQM {g['iqm']:+.5f} over {g['n_seeds']} seeds")
    for metric, r in vs.items():
        t, p = r["tost"], r["test"]["p_value"]
        word = ("beats" if r["test"]["diff"] > 0 else "is below") if p is not None and p < 0.05 else \
            "ties (TOST)" if t["equivalent"] else "is inconclusive against"
        out["lines"].append(f"rl_policy {word} the best black box on {metric}: "
                            f"{r['rl_minus_best_black_box']['mean']:+.5f} over seeds (t p = {p}, TOST p = "
                            f"{t['p_value']}, margin +-{t['margin']:g})")
    return out


def run_one(cfg: RLConfig) -> dict:
    """One seed: learn, baselines, evaluation (see the module docstring). Returns the eval.json record."""
    device_type = autodetect_device_type() if cfg.device_type == "auto" else cfg.device_type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    dtype, use_compile, _ = resolve_precision(device_type, cfg.dtype, cfg.compile)
    scorer, ckpt_path = build_scorer(cfg.checkpoint, cfg.model_tag, cfg.step, torch.device(device_type),
                                     action_space=cfg.action_space, reward=cfg.reward,
                                     max_new_tokens=cfg.max_new_tokens, mix_weight=cfg.mix_weight,
                                     batch_size=cfg.score_batch_size, dtype=dtype,
                                     reward_baseline=cfg.reward_baseline, compile=use_compile)
    tag = cfg.tag or default_tag(dataclasses.replace(cfg, checkpoint=ckpt_path))
    out_dir = os.path.join(cfg.results_dir, "rl", tag)
    ckpt_root = os.path.join(get_base_dir(), "checkpoints", "rl", tag)
    initial_root, best_root = os.path.join(ckpt_root, "initial"), os.path.join(ckpt_root, "best")
    check_writable(out_dir)  # a results folder that cannot be written is refused before any compute

    gate_range_trained = scorer.model.config.mhc.gate_range_trained()
    if not gate_range_trained:
        print(f"warning: {ckpt_path} was never trained over the gate range (no gate sampling): gates far from the "
              f"learned ones probe behaviour the model never saw. Fine-tune it with scripts.sft_train "
              f"(--mhc-gate-sample-frac 0.25 by default) first.", flush=True)
    train, val, held, pools = problem_pools(cfg, scorer, read_meta(ckpt_path).get("sft_config"))
    default_gates = scorer.default_gates().tolist()
    print(f"controlling {ckpt_path}: {scorer.num_gates} gate(s) ({cfg.action_space}), learned defaults "
          f"{np.round(default_gates, 3).tolist()}; reward {cfg.reward}; learner {cfg.algo}; {len(train)} training "
          f"problems ({pools['train']['source']}), {len(val)} validation ({pools['val']['source']}), {len(held)} "
          f"held-out ({pools['eval']['source']})", flush=True)
    torch.manual_seed(cfg.seed)
    scorer.prepare(train)
    whitener = ObsWhitener.fit(scorer.observations(train)) if cfg.whiten_obs else None
    vec = GSM8KMHCVecEnv(scorer, train, cfg.num_envs, seed=cfg.seed, action_map=cfg.action_map, whitener=whitener)
    learner = build_learner(cfg, scorer, train, whitener, vec)
    meta = dict(model_config=dict(policy="GatePolicy" if cfg.algo == "rloo" else "MlpPolicy", algo=cfg.algo,
                                  net_arch=parse_int_list(cfg.net_arch, "net-arch"), num_gates=scorer.num_gates,
                                  obs_dim=scorer.obs_dim, action_map=cfg.action_map),
                obs_whitening=whitener.state_dict() if whitener else None,
                rl_config=dataclasses.asdict(cfg), controlled_checkpoint=ckpt_path, train_pool=pools["train"],
                val_pool=pools["val"], eval_pool=pools["eval"], git_commit=git_commit(), seed=cfg.seed)
    run = Run(f"RL run {tag!r}", ckpt_root, out_dir, tag_flag="--tag")  # one writer per run (freed on exit, kill -9)
    run.write_config({**meta, "tag": tag, "default_gates": default_gates, "device_type": device_type, "dtype": dtype,
                      "machine": machine_info()})
    existing = run.resume_path(cfg.resume, allow_without_resume=cfg.eval_only)
    if cfg.eval_only and not existing:
        raise UserError(f"--eval-only: no policy checkpoint in {ckpt_root} (train first, or check --tag)")
    changes = run.check_settings(read_meta(existing).get("rl_config", {}), cfg, existing) if existing else {}
    if not existing:  # the untrained policy, kept for the evaluation's rl_initial arm
        save_learner(learner, vec, initial_root, meta, keep=1)
    selector = ModelSelector(scorer, val, cfg.eval_every, best_root, run.log)

    if not cfg.eval_only:
        if existing:
            load_learner(learner, vec, existing)
            run.resumed_at(learner.num_timesteps, changes)
            print(f"resumed from {existing} at {learner.num_timesteps} timesteps", flush=True)
        remaining = cfg.total_timesteps - learner.num_timesteps
        if remaining > 0:
            stop = run.stop_flag()
            wandb_run = init_wandb(cfg.run, "nanochat-mhc-rl", meta, True)
            t0 = time.perf_counter()
            if cfg.algo == "rloo":
                learn_rloo(learner, cfg, ckpt_root, meta, run.log, stop, selector, wandb_run)
            else:
                # Monitor-style episode statistics (SB3's VecMonitor: reward, length, time of every episode),
                # one file per start so a resumed run never overwrites the first part
                monitor = episode_monitor(os.path.join(out_dir, f"from_{learner.num_timesteps}.monitor.csv"), vec,
                                          run)
                learner.set_env(monitor)
                callback = ControllerCallback(vec, ckpt_root, meta, run.log, cfg.save_every,
                                              cfg.keep_checkpoints, stop_flag=stop, wandb_run=wandb_run,
                                              selector=selector)
                learner.learn(remaining, callback=callback, reset_num_timesteps=False, progress_bar=cfg.progress,
                              tb_log_name=tag)
            wandb_run.finish()
            signum = stop.synced(None)  # a signal, or WRITE_FAILED: a results write failed (Run.log)
            if signum:
                if cfg.algo == "rloo":
                    snapshot_steps = learner.num_timesteps
                    path = run.save_with(lambda: write_rloo(ckpt_root, learner, meta, cfg.keep_checkpoints))
                else:  # the last rollout boundary: the rollout in flight is redone on --resume
                    snapshot_steps = callback.snapshot["num_timesteps"]
                    path = run.save_with(lambda: write_snapshot(ckpt_root, callback.snapshot, meta,
                                                                cfg.keep_checkpoints))
                print(f"saved {path} at {snapshot_steps} timesteps", flush=True)
                run.finish(snapshot_steps, signum)
            path = run.save_with(lambda: save_learner(learner, vec, ckpt_root, meta, cfg.keep_checkpoints))
            print(f"{cfg.algo}: {learner.num_timesteps} timesteps in {time.perf_counter() - t0:.0f} s; saved {path}",
                  flush=True)
    else:
        load_learner(learner, vec, existing, restore_rng=False)
    if selector.every > 0 and val and selector.last != learner.num_timesteps:   # the last policy is a candidate too
        selector.evaluate(learner.num_timesteps, gates_fn(learner, vec),
                          lambda r, extra: save_learner(learner, vec, r, {**meta, **extra}, 1))
    if run.write_error is not None:  # that record could not be written: the final policy is saved, stop here
        run.finish(learner.num_timesteps, WRITE_FAILED)
    if cfg.algo == "ppo":   # the final policy as SB3's own zip (PPO.load opens it) + the whitening it expects
        learner.save(os.path.join(out_dir, "ppo_policy.zip"))
        atomic_json(os.path.join(out_dir, "ppo_policy_obs_whitening.json"), meta["obs_whitening"])
    budget = learner.num_timesteps  # problems the learner scored: the baselines get exactly this many

    baselines = run_baselines(cfg, scorer, train, budget, out_dir) if budget > 0 else {}
    best_bb = validate_baselines(scorer, val, baselines)
    initial = build_learner(cfg, scorer, train, whitener, vec)
    load_learner(initial, vec, latest_checkpoint(initial_root), restore_rng=False)
    best = build_learner(cfg, scorer, train, whitener, vec)
    best_path = latest_checkpoint(best_root)
    selected = load_learner(best, vec, best_path, restore_rng=False) if best_path else None
    if selected is None:
        best = learner
    space = cfg.action_space
    arms = {"default": (space, None),
            "rl_policy": (space, gates_fn(best, vec)),
            "rl_policy_stochastic": (space, gates_fn(best, vec, deterministic=False, seed=cfg.seed)),
            "rl_initial": (space, gates_fn(initial, vec))}
    if selected is not None and selected["num_timesteps"] != learner.num_timesteps:
        arms["rl_last"] = (space, gates_fn(learner, vec))
    for name, res in baselines.items():
        arms[name] = (res["action_space"], res["best_gates"])
    arms["gate0"], arms["gate1"] = ("global", [0.0]), ("global", [1.0])
    comparisons = [("rl_initial", "rl_policy")] + [(name, "rl_policy") for name in baselines]
    t0 = time.perf_counter()
    results, compared, records = evaluate_arms(scorer, held, arms, "default", comparisons,
                                               margins=dict(exact=cfg.tie_margin_accuracy,
                                                            dense=cfg.tie_margin_dense))
    print(f"evaluation on {len(held)} held-out problems ({time.perf_counter() - t0:.0f} s):", flush=True)
    print_table(results, compared, "default")
    selection = dict(validation_problems=len(val), eval_every=cfg.eval_every,
                     selected_timesteps=selected["num_timesteps"] if selected else learner.num_timesteps,
                     selected_val_reward=selected.get("val_reward") if selected else None,
                     last_timesteps=learner.num_timesteps)
    summary = dict(tag=tag, checkpoint=ckpt_path, algo=cfg.algo, policy_timesteps=learner.num_timesteps,
                   budget=budget, action_space=space, reward=cfg.reward, default_gates=default_gates,
                   train_pool=pools["train"], val_pool=pools["val"], eval_pool=pools["eval"],
                   gate_range_trained=gate_range_trained, model_selection=selection,
                   arms=results, comparisons=compared, best_black_box=best_bb,
                   verdicts=dict(rl_vs_default=verdict(compared, "default", "rl_policy"),
                                 rl_vs_initial=verdict(compared, "rl_initial", "rl_policy"),
                                 rl_vs_best_black_box=verdict(compared, best_bb, "rl_policy") if best_bb else None,
                                 **{f"rl_vs_{name}": verdict(compared, name, "rl_policy") for name in baselines}),
                   baselines=baselines, rl_config=dataclasses.asdict(cfg), git_commit=git_commit(),
                   scale="smoke" if scorer.model.num_params() < SMOKE_PARAMS else "full")
    atomic_json(os.path.join(out_dir, "eval.json"), summary)
    atomic_write_text(os.path.join(out_dir, "eval_examples.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    for key, text in summary["verdicts"].items():
        if text:
            print(f"{key}: {text}")
    print(f"wrote {os.path.join(out_dir, 'eval.json')}")
    run.finish(learner.num_timesteps)
    return summary


def argparse_help() -> str:
    return "named RL preset: tiny (2-core CPU, minutes) or gpu (the plan's PPO settings); = --config rl_NAME"


if __name__ == "__main__":
    run_main(main)
