"""Peak memory of one training step of a named config, before anything trains: the estimate nanochat/memory.py
makes (the eager step on fake tensors, every live tensor counted by PyTorch's MemTracker) for each
--activation-checkpointing mode, and whether it fits a GPU of --gpu-memory-gib. Writes JSON.

    python -m benchmarks.memory_estimate --config baseline            # the GPU preset: d12, 64 x 1024, bf16
    python -m benchmarks.memory_estimate --config dynamic_mhc --device-batch-size 32
    python -m benchmarks.memory_estimate --config tiny_cpu_mhc --vocab-size 4096 --dtype float32
    python -m benchmarks.memory_estimate --config dynamic_mhc --mhc-bf16-streams   # any training flag overrides

A compiled step keeps what the eager one keeps or less (inductor's partitioner), so the eager figure bounds it.
"""
from __future__ import annotations

import argparse
import time

from benchmarks.bench_utils import write_record
from nanochat.common import doc_summary, run_main
from nanochat.config import TrainConfig, build_config
from nanochat.gpt import ACTIVATION_CHECKPOINTING
from nanochat.memory import FRAGMENTATION, GIB, GPU_RESERVE_GIB, estimate_training_memory, gpu_budget


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--config", required=True, help="named config in configs/ (baseline, dynamic_mhc, tiny_cpu, ...)")
    p.add_argument("--vocab-size", type=int, default=32768, help="the tokenizer's vocabulary (GPU preset 32768, "
                   "tiny preset 4096)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="bfloat16 = autocast, as on a "
                   "GPU")
    p.add_argument("--modes", default="", help="comma-separated --activation-checkpointing modes (default: every "
                   "mode the model takes)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="the card to check against (H100: 80)")
    p.add_argument("--out", default="", help="JSON path (default results/bench/memory_estimate_<config>.json)")
    args, overrides = p.parse_known_args(argv)  # the rest are scripts.base_train flags (--device-batch-size ...)
    cfg, _ = build_config(TrainConfig, ["--config", args.config, *overrides], description="memory estimate")
    model_config = cfg.model_config(args.vocab_size)
    modes = [m for m in args.modes.split(",") if m] or [m for m in ACTIVATION_CHECKPOINTING
                                                        if m != "mhc" or model_config.mhc.enabled]
    budget = gpu_budget(int(args.gpu_memory_gib * GIB))
    print(f"{args.config}: depth {model_config.n_layer}, width {model_config.n_embd}, mHC "
          f"{'on' if model_config.mhc.enabled else 'off'}; {cfg.device_batch_size} x {cfg.max_seq_len} tokens per "
          f"device, {args.dtype}; a {args.gpu_memory_gib:.0f} GiB GPU leaves {budget / GIB:.1f} GiB "
          f"({GPU_RESERVE_GIB:.0f} GiB CUDA/NCCL, {100 * FRAGMENTATION:.0f}% fragmentation)")
    header = ("checkpointing", "peak GiB", "params", "grads", "optim", "activ", "temp")
    print(f"{header[0]:<14} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (9, 7, 6, 6, 7, 6))) + "  fits")
    results = {}
    for mode in modes:
        t0 = time.perf_counter()
        est = estimate_training_memory(model_config, cfg.device_batch_size, cfg.max_seq_len, args.dtype, mode)
        est["seconds"] = time.perf_counter() - t0
        est["fits"] = est["peak"] <= budget
        results[mode] = est
        print(f"{mode:<14} {est['peak'] / GIB:>9.2f} {est['parameters'] / GIB:>7.2f} {est['gradients'] / GIB:>6.2f} "
              f"{est['optimizer'] / GIB:>6.2f} {est['activations'] / GIB:>7.2f} {est['temporaries'] / GIB:>6.2f}  "
              f"{'yes' if est['fits'] else 'NO'}")
    print("eager figures; a compiled step keeps at most as much (inductor's partitioner)")
    args.train_overrides = overrides
    write_record(args.out or f"results/bench/memory_estimate_{args.config}.json", "memory_estimate", args, "fake",
                 dict(by_mode=results, budget_bytes=budget, device_batch_size=cfg.device_batch_size,
                      seq_len=cfg.max_seq_len, model=dict(n_layer=model_config.n_layer, n_embd=model_config.n_embd,
                                                          mhc=model_config.mhc.enabled)))


if __name__ == "__main__":
    run_main(main)
