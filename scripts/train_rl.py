"""PPO over the mHC gates of a frozen model (phase 3 of the plan, docs/design.md), the black-box baselines it must
beat, and the held-out evaluation of every arm.

    python scripts/train_rl.py --model-tag mhc_sft --action-space per_layer --reward exact       # GPU scale
    python scripts/train_rl.py --preset tiny --model-tag tiny_mhc_sft --problems synthetic       # 2-core CPU
    python scripts/train_rl.py --preset tiny --model-tag tiny_mhc_sft --problems synthetic --resume
    python scripts/train_rl.py --tag NAME --model-tag tiny_mhc_sft --eval-only                   # evaluation only

1. Problems: a training pool (GSM8K `--train-split`, or synthetic problems of `--synthetic-seed`) and a held-out
   evaluation pool (GSM8K `--eval-split`, or synthetic seed + 1 without any training question).
2. PPO (stable-baselines3, MlpPolicy) on the batched vec env (envs/mhc_env.py): `--num-envs` problems per step,
   each scored under its own gates in one forward or generation. Metrics per PPO iteration go to
   <results>/rl/<tag>/metrics.jsonl (and wandb with --run); policy checkpoints to
   $NANOCHAT_BASE_DIR/checkpoints/rl/<tag>/ (exact resume with --resume; SIGINT/SIGTERM save and exit).
3. Baselines on the same budget of problems scored (envs/gate_search.py): a grid over the global gate, random
   search and an evolution strategy over per-layer gates -> baselines.json (reused by a rerun).
4. Evaluation on the held-out problems, exact match and dense reward for each arm: the learned default gates, the
   RL policy (deterministic) and the initial policy, the best gates of each baseline, g = 0 and g = 1 everywhere;
   n, 95% CIs and paired tests against the default (McNemar for accuracy, paired t for the dense reward) and of
   the RL policy against each baseline's gates (the best black box = the highest training reward) -> eval.json,
   eval_examples.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

import envs  # noqa: F401 -- registers the gymnasium env
from envs.gate_search import evaluate_arms, evolution_strategy, grid_search, random_search
from envs.mhc_env import GSM8KMHCVecEnv, build_problem_pool, build_scorer
from envs.ppo_controller import (ControllerCallback, build_ppo, load_policy, policy_gates, restore, take_snapshot,
                                 write_snapshot)
from nanochat.checkpoint import read_meta
from nanochat.common import (UserError, autodetect_device_type, doc_summary, get_base_dir, git_commit, init_wandb,
                             machine_info, resolve_precision, run_main)
from nanochat.config import RLConfig, build_config, parse_int_list, resolve_config_path
from nanochat.training import Run, atomic_json

SMOKE_PARAMS = 50e6  # below this a result is a smoke test of the pipeline, never a finding (docs/design.md, section 7)
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


def problem_pools(cfg: RLConfig, scorer):
    """(train problems, eval problems, their descriptions). The evaluation never holds a training question."""
    if cfg.problems == "synthetic":
        knobs = dict(synthetic_steps=parse_int_list(cfg.synthetic_steps, "synthetic-steps"),
                     synthetic_max_value=cfg.synthetic_max_value, synthetic_ops=cfg.synthetic_ops)
        n_train = cfg.train_problems if cfg.train_problems > 0 else SYNTHETIC_DEFAULT_COUNTS[0]
        n_eval = cfg.eval_problems if cfg.eval_problems > 0 else SYNTHETIC_DEFAULT_COUNTS[1]
        train, train_info = build_problem_pool(scorer, "synthetic", count=n_train, seed=cfg.synthetic_seed, **knobs)
        held, eval_info = build_problem_pool(scorer, "synthetic", count=n_eval, seed=cfg.synthetic_seed + 1,
                                             exclude=train, **knobs)
    else:
        train, train_info = build_problem_pool(scorer, "gsm8k", split=cfg.train_split, count=cfg.train_problems,
                                               seed=cfg.seed, task_data=cfg.task_data)
        held, eval_info = build_problem_pool(scorer, "gsm8k", split=cfg.eval_split, count=cfg.eval_problems,
                                             seed=cfg.seed, task_data=cfg.task_data, exclude=train)
    return train, held, train_info, eval_info


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


def verdict(comparisons: list[dict], a: str, b: str) -> str | None:
    """One honest sentence on whether arm b beats arm a (paired tests, 5% level)."""
    c = next((c for c in comparisons if c["a"] == a and c["b"] == b), None)
    if c is None:
        return None
    parts = []
    for metric, label in (("exact", "accuracy"), ("dense", "dense reward")):
        d, p = c[metric]["diff"], c[metric]["p_value"]
        if d is None or p is None:
            continue
        word = "beats" if d > 0 and p < 0.05 else "is worse than" if d < 0 and p < 0.05 else "does not differ from"
        parts.append(f"on {label} {b} {word} {a} ({d:+.4f}, p = {p:.3g})")
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


def main(argv=None):
    cfg, _ = build_config(RLConfig, with_preset(argv), description=doc_summary(__doc__),
                          extra_args=lambda p: p.add_argument("--preset", choices=PRESETS, help=argparse_help()),
                          config_help="named RL config in configs/ (rl_tiny, rl_gpu) or a path to a .toml file; "
                          "--preset NAME is the same as --config rl_NAME")
    device_type = autodetect_device_type() if cfg.device_type == "auto" else cfg.device_type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    dtype, use_compile, _ = resolve_precision(device_type, cfg.dtype, cfg.compile)
    scorer, ckpt_path = build_scorer(cfg.checkpoint, cfg.model_tag, cfg.step, torch.device(device_type),
                                     action_space=cfg.action_space, reward=cfg.reward,
                                     max_new_tokens=cfg.max_new_tokens, mix_weight=cfg.mix_weight,
                                     batch_size=cfg.score_batch_size, dtype=dtype,
                                     reward_baseline=cfg.reward_baseline, compile=use_compile)
    model_tag = cfg.model_tag or os.path.basename(os.path.dirname(ckpt_path))
    tag = cfg.tag or f"{model_tag}-{cfg.problems}-{cfg.action_space}-{cfg.reward}"
    out_dir = os.path.join(cfg.results_dir, "rl", tag)
    ckpt_root = os.path.join(get_base_dir(), "checkpoints", "rl", tag)
    initial_root = os.path.join(ckpt_root, "initial")
    os.makedirs(out_dir, exist_ok=True)

    gate_range_trained = scorer.model.config.mhc.gate_range_trained()
    if not gate_range_trained:
        print(f"warning: {ckpt_path} was never trained over the gate range (no gate sampling): gates far from the "
              f"learned ones probe behaviour the model never saw. Fine-tune it with scripts.sft_train "
              f"(--mhc-gate-sample-frac 0.25 by default) first.", flush=True)
    train, held, train_info, eval_info = problem_pools(cfg, scorer)
    default_gates = scorer.default_gates().tolist()
    print(f"controlling {ckpt_path}: {scorer.num_gates} gate(s) ({cfg.action_space}), learned defaults "
          f"{np.round(default_gates, 3).tolist()}; reward {cfg.reward}; {len(train)} training problems "
          f"({train_info['source']}), {len(held)} held-out ({eval_info['source']})", flush=True)
    torch.manual_seed(cfg.seed)
    vec = GSM8KMHCVecEnv(scorer, train, cfg.num_envs, seed=cfg.seed, symmetric_actions=True)
    ppo_kwargs = dict(learning_rate=cfg.learning_rate, n_steps=cfg.n_steps, batch_size=cfg.batch_size,
                      n_epochs=cfg.n_epochs, gamma=cfg.gamma, ent_coef=cfg.ent_coef, seed=cfg.seed,
                      net_arch=parse_int_list(cfg.net_arch, "net-arch"), log_std_init=cfg.log_std_init)
    ppo = build_ppo(vec, **ppo_kwargs)
    meta = dict(model_config=dict(policy="MlpPolicy", net_arch=ppo_kwargs["net_arch"], num_gates=scorer.num_gates,
                                  obs_dim=scorer.model.config.n_embd),
                rl_config=dataclasses.asdict(cfg), controlled_checkpoint=ckpt_path, train_pool=train_info,
                eval_pool=eval_info, git_commit=git_commit(), seed=cfg.seed)
    run = Run(f"RL run {tag!r}", ckpt_root, out_dir, tag_flag="--tag")  # one writer per run (freed on exit, kill -9)
    run.write_config({**meta, "tag": tag, "default_gates": default_gates, "device_type": device_type, "dtype": dtype,
                      "machine": machine_info()})
    existing = run.resume_path(cfg.resume, allow_without_resume=cfg.eval_only)
    if cfg.eval_only and not existing:
        raise UserError(f"--eval-only: no policy checkpoint in {ckpt_root} (train first, or check --tag)")
    changes = run.check_settings(read_meta(existing).get("rl_config", {}), cfg, existing) if existing else {}
    if not existing:  # the untrained policy, kept for the evaluation's rl_initial arm
        write_snapshot(initial_root, take_snapshot(ppo, vec), meta, keep=1)

    if not cfg.eval_only:
        if existing:
            restore(ppo, vec, existing)
            run.resumed_at(ppo.num_timesteps, changes)
            print(f"resumed from {existing} at {ppo.num_timesteps} timesteps", flush=True)
        remaining = cfg.total_timesteps - ppo.num_timesteps
        if remaining > 0:
            stop = run.stop_flag()
            wandb_run = init_wandb(cfg.run, "nanochat-mhc-rl", meta, True)
            callback = ControllerCallback(vec, ckpt_root, meta, run.metrics_path, cfg.save_every,
                                          cfg.keep_checkpoints, stop_flag=stop, wandb_run=wandb_run)
            t0 = time.perf_counter()
            ppo.learn(remaining, callback=callback, reset_num_timesteps=False, progress_bar=cfg.progress)
            wandb_run.finish()
            if stop.signum:
                path = write_snapshot(ckpt_root, callback.snapshot, meta, cfg.keep_checkpoints)
                print(f"saved {path} at {callback.snapshot['num_timesteps']} timesteps", flush=True)
                run.finish(callback.snapshot["num_timesteps"], stop.signum)
            path = write_snapshot(ckpt_root, take_snapshot(ppo, vec), meta, cfg.keep_checkpoints)
            print(f"PPO: {ppo.num_timesteps} timesteps in {time.perf_counter() - t0:.0f} s; saved {path}",
                  flush=True)
    else:
        restore(ppo, vec, existing, restore_rng=False)
    budget = ppo.num_timesteps  # problems PPO scored: the baselines get exactly this many

    baselines = run_baselines(cfg, scorer, train, budget, out_dir) if budget > 0 else {}
    initial = build_ppo(vec, **ppo_kwargs)
    load_policy(initial, initial_root)
    space = cfg.action_space
    arms = {"default": (space, None),
            "rl_policy": (space, lambda obs: policy_gates(ppo, obs, vec.symmetric_actions)),
            "rl_initial": (space, lambda obs: policy_gates(initial, obs, vec.symmetric_actions))}
    for name, res in baselines.items():
        arms[name] = (res["action_space"], res["best_gates"])
    arms["gate0"], arms["gate1"] = ("global", [0.0]), ("global", [1.0])
    best_bb = max(baselines, key=lambda n: baselines[n]["best_train_reward"]) if baselines else None
    comparisons = [("rl_initial", "rl_policy")] + [(name, "rl_policy") for name in baselines]
    t0 = time.perf_counter()
    results, compared, records = evaluate_arms(scorer, held, arms, "default", comparisons)
    print(f"evaluation on {len(held)} held-out problems ({time.perf_counter() - t0:.0f} s):", flush=True)
    print_table(results, compared, "default")
    summary = dict(tag=tag, checkpoint=ckpt_path, policy_timesteps=ppo.num_timesteps, budget=budget,
                   action_space=space, reward=cfg.reward, default_gates=default_gates, train_pool=train_info,
                   gate_range_trained=gate_range_trained,
                   eval_pool=eval_info, arms=results, comparisons=compared, best_black_box=best_bb,
                   verdicts=dict(rl_vs_default=verdict(compared, "default", "rl_policy"),
                                 rl_vs_initial=verdict(compared, "rl_initial", "rl_policy"),
                                 rl_vs_best_black_box=verdict(compared, best_bb, "rl_policy") if best_bb else None,
                                 **{f"rl_vs_{name}": verdict(compared, name, "rl_policy") for name in baselines}),
                   baselines=baselines, rl_config=dataclasses.asdict(cfg), git_commit=git_commit(),
                   scale="smoke" if scorer.model.num_params() < SMOKE_PARAMS else "full")
    atomic_json(os.path.join(out_dir, "eval.json"), summary)
    with open(os.path.join(out_dir, "eval_examples.jsonl.tmp"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(os.path.join(out_dir, "eval_examples.jsonl.tmp"), os.path.join(out_dir, "eval_examples.jsonl"))
    for key, text in summary["verdicts"].items():
        if text:
            print(f"{key}: {text}")
    print(f"wrote {os.path.join(out_dir, 'eval.json')}")
    run.finish(ppo.num_timesteps)
    return summary


def argparse_help() -> str:
    return "named RL preset: tiny (2-core CPU, minutes) or gpu (the plan's PPO settings); = --config rl_NAME"


if __name__ == "__main__":
    run_main(main)
