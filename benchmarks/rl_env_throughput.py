"""RL env throughput: env steps (problems scored) per second, the batched vec env against one env stepping one
problem at a time, on the same model, problems and random actions. Writes JSON.

    python -m benchmarks.rl_env_throughput --model-tag tiny_mhc_sft                      # dense and exact rewards
    python -m benchmarks.rl_env_throughput --model-tag mhc_sft --num-envs 64 --rewards exact --problems gsm8k
    python -m benchmarks.rl_env_throughput --model-tag tiny_mhc_sft --compile true    # the compiled decode, CPU

A real (fine-tuned) checkpoint, because the exact reward's cost depends on when generation stops. Each repeat
times both sides back to back (single env, then vec env), and the reported figure is the median over --repeats
of each side and of their per-repeat ratio, so machine noise hits both sides alike.
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from benchmarks.bench_utils import time_single_env, time_vec_env, write_record
from envs.mhc_env import GateScorer, GSM8KMHCEnv, GSM8KMHCVecEnv, build_problem_pool, load_frozen_model
from nanochat.common import doc_summary, autodetect_device_type, resolve_precision, run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of a (fine-tuned) mHC checkpoint")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag)")
    p.add_argument("--rewards", default="dense,exact", help="comma-separated rewards to time")
    p.add_argument("--action-space", default="per_layer", choices=["global", "per_layer", "per_sublayer"])
    p.add_argument("--num-envs", type=int, default=16, help="sub-environments of the vec env")
    p.add_argument("--steps", type=int, default=128, help="env steps (problems) per timing")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    p.add_argument("--problems", default="synthetic", choices=["synthetic", "gsm8k"], help="problem source")
    p.add_argument("--synthetic-steps", type=int, default=1, help="synthetic: operations per problem")
    p.add_argument("--synthetic-max-value", type=int, default=10, help="synthetic: largest operand")
    p.add_argument("--max-new-tokens", type=int, default=64, help="exact reward: generation limit")
    p.add_argument("--task-data", default="auto", choices=["auto", "hub", "local"], help="GSM8K data source")
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="the scorer's --compile: the dense forward and the exact reward's decode step through "
                        "torch.compile (auto = on CUDA only); the warm-up pays the compile")
    p.add_argument("--out", default="results/bench/rl_env_throughput.json", help="output JSON")
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    model, tokenizer, path, _ = load_frozen_model(args.checkpoint, args.model_tag, device=torch.device(device_type))
    dtype, use_compile, _ = resolve_precision(device_type, "auto", args.compile)
    results = {}
    for reward in [r.strip() for r in args.rewards.split(",") if r.strip()]:
        scorer = GateScorer(model, tokenizer, action_space=args.action_space, reward=reward,
                            max_new_tokens=args.max_new_tokens, batch_size=args.num_envs, dtype=dtype,
                            compile=use_compile)
        kw = dict(count=512, seed=1, synthetic_steps=[args.synthetic_steps],
                  synthetic_max_value=args.synthetic_max_value) if args.problems == "synthetic" else \
            dict(split="train", count=512, task_data=args.task_data)
        problems, pool = build_problem_pool(scorer, args.problems, **kw)
        env = GSM8KMHCEnv(scorer=scorer, action_space=args.action_space, reward=reward, problems=problems)
        vec = GSM8KMHCVecEnv(scorer, problems, args.num_envs, seed=0)
        rng = np.random.default_rng(0)
        time_single_env(env, 4, rng), time_vec_env(vec, args.num_envs, rng)  # warm-up (allocator, caches)
        single, batched = [], []
        for _ in range(args.repeats):
            single.append(time_single_env(env, args.steps, rng))
            batched.append(time_vec_env(vec, args.steps, rng))
        ratios = [b / s for s, b in zip(single, batched)]
        results[reward] = dict(single_env_steps_per_s=statistics.median(single),
                               vec_env_steps_per_s=statistics.median(batched), speedup=statistics.median(ratios),
                               speedup_range=[min(ratios), max(ratios)], problems=pool)
        print(f"{reward}: one env {results[reward]['single_env_steps_per_s']:.1f} steps/s, vec env of "
              f"{args.num_envs} {results[reward]['vec_env_steps_per_s']:.1f} steps/s, "
              f"x{results[reward]['speedup']:.1f} ({min(ratios):.1f}-{max(ratios):.1f})", flush=True)
    return write_record(args.out, "rl_env_throughput", args, device_type, results, checkpoint=path)


if __name__ == "__main__":
    run_main(main)
