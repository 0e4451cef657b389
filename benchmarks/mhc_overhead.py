"""mHC overhead vs the baseline GPT: training-step time ratio (interleaved in one process, so machine noise hits
both alike; the median of per-pair ratios, with its IQR and the ratio of the fastest steps), peak-memory ratio and
parameter overhead; and, for one sub-layer's worth of logits ([batch * seq, n, n]), the forward + backward time of
the fast Sinkhorn against the log-space autograd reference.
Writes JSON.

    python -m benchmarks.mhc_overhead                     # the tiny CPU config: depth 4, width 256, seq 256, batch 8
    python -m benchmarks.mhc_overhead --depth 12 --head-dim 128 --seq-len 1024 --batch-size 16 --vocab-size 32768 \
        --dtype bfloat16 --compile                        # the GPU preset's model on one GPU (scripts/gpu_check.sh)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_utils import (add_tiny_shape_args, child_peak_memory_mib, own_peak_memory_mib,
                                    timed_train_step, write_record)
from nanochat.common import doc_summary, autocast_ctx, autodetect_device_type, run_main
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.mhc import MHCConfig, sinkhorn, sinkhorn_log
from nanochat.optim import setup_optimizers


def build(args, mhc: bool, device):
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=n_embd,
                    mhc=MHCConfig(enabled=mhc, num_streams=args.num_streams, sinkhorn_iters=args.sinkhorn_iters,
                                  bf16_streams=mhc and args.bf16_streams))
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    model.init_weights()
    model.set_activation_checkpointing("full" if args.activation_checkpointing == "full" else
                                       ("mhc" if mhc and args.activation_checkpointing == "mhc" else "off"))
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    return model, (torch.compile(model) if args.compile else model), opts


def time_sinkhorns(args, device, device_type, rounds: int = 20) -> dict:
    """Median fwd + bwd ms of sinkhorn and sinkhorn_log on [B*T, n, n] near-identity logits, interleaved."""
    n = args.num_streams
    torch.manual_seed(0)
    logits = (torch.randn(args.batch_size * args.seq_len, n, n, device=device) + 2 * torch.eye(n, device=device))
    logits.requires_grad_()
    upstream = torch.randn_like(logits)
    times = {"fast": [], "log_reference": []}
    for i in range(rounds + 3):
        for name, fn in (("fast", sinkhorn), ("log_reference", sinkhorn_log)):
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(logits, args.sinkhorn_iters).backward(upstream)
            if device_type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(1000 * (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(fwd_bwd_ms=med, speedup=med["log_reference"] / med["fast"])


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    add_tiny_shape_args(p)
    p.add_argument("--num-streams", type=int, default=4)
    p.add_argument("--sinkhorn-iters", type=int, default=20)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-checkpointing", default="off", choices=["off", "mhc", "full"],
                   help="mhc: the mHC model's connections only (the baseline runs without); full: both models")
    p.add_argument("--bf16-streams", action="store_true", help="the mHC model with mhc_bf16_streams")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model, interleaved")
    p.add_argument("--out", default="results/bench/mhc_overhead.json")
    p.add_argument("--_memory-child", dest="memory_child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device_type = autodetect_device_type()
    device = torch.device(device_type)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    ctx = autocast_ctx(device_type, args.dtype)

    if args.memory_child:  # child process: a few steps of one model, print its peak memory in MiB
        model, train_model, opts = build(args, args.memory_child == "mhc", device)
        for _ in range(2):
            timed_train_step(train_model, opts, x, y, ctx, device_type)
        print(own_peak_memory_mib(device_type))
        return

    models = {name: build(args, name == "mhc", device) for name in ("baseline", "mhc")}
    times = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name, (model, train_model, opts) in models.items():  # interleaved: noise hits both
            dt = timed_train_step(train_model, opts, x, y, ctx, device_type)
            if i >= args.warmup:
                times[name].append(dt)
    med = {name: statistics.median(t) for name, t in times.items()}
    # the headline ratio pairs each mHC step with the baseline step right before it and takes the median: a burst
    # of load from elsewhere on the machine then moves single pairs, not the result
    paired = sorted(m / b for m, b in zip(times["mhc"], times["baseline"]))
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    params = {name: m[0].num_params() for name, m in models.items()}
    del models
    sinkhorn_times = time_sinkhorns(args, device, device_type)
    memory = {name: child_peak_memory_mib("benchmarks.mhc_overhead", "mhc" if name == "mhc" else "base", args,
                                          exclude=("compile", "out")) for name in ("baseline", "mhc")}
    results = dict(
        median_step_s=med, step_times_s=times, step_time_ratio=statistics.median(paired),
        step_time_ratio_iqr=[quartiles[0], quartiles[2]], step_time_ratio_of_medians=med["mhc"] / med["baseline"],
        step_time_ratio_of_minimums=min(times["mhc"]) / min(times["baseline"]),
        tok_per_sec={k: args.batch_size * args.seq_len / v for k, v in med.items()},
        peak_memory_mib=memory, peak_memory_ratio=memory["mhc"] / memory["baseline"], num_params=params,
        param_overhead_pct=100 * (params["mhc"] - params["baseline"]) / params["baseline"],
        sinkhorn=sinkhorn_times)
    print(f"step time: baseline {1000 * med['baseline']:.0f} ms, mHC {1000 * med['mhc']:.0f} ms "
          f"-> ratio {results['step_time_ratio']:.3f} (median of {len(paired)} paired steps; IQR "
          f"{quartiles[0]:.3f}-{quartiles[2]:.3f}; ratio of the fastest steps "
          f"{results['step_time_ratio_of_minimums']:.3f})")
    print(f"peak memory: baseline {memory['baseline']:.0f} MiB, mHC {memory['mhc']:.0f} MiB "
          f"-> ratio {results['peak_memory_ratio']:.3f}")
    print(f"parameters: baseline {params['baseline']:,}, mHC {params['mhc']:,} "
          f"(+{results['param_overhead_pct']:.2f}%)")
    print(f"sinkhorn fwd+bwd on [{args.batch_size * args.seq_len}, {args.num_streams}, {args.num_streams}]: fast "
          f"{sinkhorn_times['fwd_bwd_ms']['fast']:.2f} ms, log-space reference "
          f"{sinkhorn_times['fwd_bwd_ms']['log_reference']:.2f} ms -> {sinkhorn_times['speedup']:.1f}x")
    write_record(args.out, "mhc_overhead", args, device_type, results)


if __name__ == "__main__":
    run_main(main)
