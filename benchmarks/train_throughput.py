"""Training-step throughput (forward + backward + Muon/AdamW step) of the GPT, fp32 vs bf16 autocast,
measured side by side in one process so machine noise hits both alike. Writes JSON.

    python -m benchmarks.train_throughput                        # issue-2 config: depth 4, width 256, seq 256,
                                                                 # batch 8, vocab 4096, on this machine's device
    python -m benchmarks.train_throughput --steps 20 --out results/bench/train_throughput.json
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_utils import add_tiny_shape_args, timed_train_step, write_record
from nanochat.common import doc_summary, autocast_ctx, autodetect_device_type, run_main
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.optim import setup_optimizers


def time_steps(model, optimizers, x, y, ctx, warmup: int, steps: int, device_type: str) -> list[float]:
    times = [timed_train_step(model, optimizers, x, y, ctx, device_type) for _ in range(warmup + steps)]
    return times[warmup:]


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    add_tiny_shape_args(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before measuring")
    p.add_argument("--steps", type=int, default=12, help="timed steps per dtype (the median is reported)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", default="results/bench/train_throughput.json")
    args = p.parse_args(argv)

    device_type = autodetect_device_type()
    device = torch.device(device_type)
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    cfg = GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                    n_kv_head=n_head, n_embd=n_embd)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    results = {}
    for dtype in args.dtypes.split(","):
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        model.init_weights()
        optimizers = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02,
                                      scalar_lr=0.5, weight_decay=0.0,
                                      ns_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        train_model = torch.compile(model) if args.compile else model
        times = time_steps(train_model, optimizers, x, y, autocast_ctx(device_type, dtype), args.warmup,
                           args.steps, device_type)
        median = statistics.median(times)
        results[dtype] = dict(median_step_s=median, tok_per_sec=args.batch_size * args.seq_len / median,
                              step_times_s=times)
        print(f"{dtype:>9}: median step {1000 * median:.0f} ms | {results[dtype]['tok_per_sec']:,.0f} tok/s")
    if "float32" in results and "bfloat16" in results:
        results["bf16_speedup"] = results["float32"]["median_step_s"] / results["bfloat16"]["median_step_s"]
        print(f"bf16 / fp32 speed-up: {results['bf16_speedup']:.2f}x")
    write_record(args.out, "train_throughput", args, device_type, results,
                 num_params=sum(p.numel() for p in model.parameters()))


if __name__ == "__main__":
    run_main(main)
