"""Activation checkpointing, cost and saving: the training-step time of each --activation-checkpointing mode
relative to off (the modes interleaved in one process, so machine noise hits all alike; the median of per-round
ratios) and each mode's estimated peak memory (nanochat/memory.py) at the benchmark's shape. Writes JSON.

    python -m benchmarks.checkpointing --mhc                # the tiny CPU shape: depth 4, width 256, seq 256, batch 8
    python -m benchmarks.checkpointing --mhc --depth 12 --head-dim 128 --seq-len 1024 --batch-size 16 \\
        --vocab-size 32768 --dtype bfloat16 --compile       # one GPU
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_utils import add_tiny_shape_args, timed_train_step, write_record
from nanochat.common import doc_summary, autocast_ctx, autodetect_device_type, run_main
from nanochat.gpt import ACTIVATION_CHECKPOINTING, GPT, GPTConfig, model_dims_from_depth
from nanochat.memory import GIB, estimate_training_memory
from nanochat.mhc import MHCConfig
from nanochat.optim import setup_optimizers


def model_config(args) -> GPTConfig:
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    return GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd,
                     mhc=MHCConfig(enabled=args.mhc, bf16_streams=args.mhc and args.bf16_streams))


def build(cfg: GPTConfig, mode: str, args, device):
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights()
    model.set_activation_checkpointing(mode)
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    return (torch.compile(model, dynamic=False) if args.compile else model), opts


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    add_tiny_shape_args(p)
    p.add_argument("--mhc", action="store_true", help="the mHC model (default: the baseline)")
    p.add_argument("--bf16-streams", action="store_true", help="mHC: mhc_bf16_streams (under --dtype bfloat16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (one step of every mode per round)")
    p.add_argument("--out", default="results/bench/checkpointing.json")
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    device = torch.device(device_type)
    cfg = model_config(args)
    modes = [m for m in ACTIVATION_CHECKPOINTING if m != "mhc" or args.mhc]
    models = {m: build(cfg, m, args, device) for m in modes}
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    ctx = autocast_ctx(device_type, args.dtype)
    times = {m: [] for m in modes}
    for i in range(args.warmup + args.steps):
        for m, (model, opts) in models.items():
            dt = timed_train_step(model, opts, x, x, ctx, device_type)
            if i >= args.warmup:
                times[m].append(dt)
    ratios = {m: statistics.median(t / o for t, o in zip(times[m], times["off"])) for m in modes}
    memory = {m: estimate_training_memory(cfg, args.batch_size, args.seq_len, args.dtype, m) for m in modes}
    for m in modes:
        print(f"{m:<5} step {1000 * statistics.median(times[m]):7.1f} ms  x{ratios[m]:.3f} of off | estimated peak "
              f"{memory[m]['peak'] / GIB:.3f} GiB (activations {memory[m]['activations'] / GIB:.3f}) "
              f"x{memory[m]['peak'] / memory['off']['peak']:.3f} of off")
    write_record(args.out, "checkpointing", args, device_type,
                 dict(step_time_s=times, median_step_s={m: statistics.median(t) for m, t in times.items()},
                      time_ratio_vs_off=ratios, estimated_memory=memory,
                      peak_ratio_vs_off={m: memory[m]["peak"] / memory["off"]["peak"] for m in modes}))


if __name__ == "__main__":
    run_main(main)
