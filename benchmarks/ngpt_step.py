"""Training-step time of nGPT vs the baseline GPT, and what lazy projection saves: the baseline (Muon + AdamW),
nGPT projecting every step, and nGPT projecting every k steps, interleaved step by step in one process so machine
noise hits all three alike. A step is forward + backward + optimizer step (+ the weight projection when due).

    python -m benchmarks.ngpt_step        # the tiny config: depth 4, width 256, seq 256, batch 8, vocab 4096
    python -m benchmarks.ngpt_step --lazy-proj-freq 7 --rounds 28 --out results/bench/ngpt_step.json

Reports the median step time per arm, the ratios of the medians, and one projection's own cost.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_utils import add_tiny_shape_args, write_record
from nanochat.common import doc_summary, UserError, run_main
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth
from nanochat.optim import setup_ngpt_optimizers, setup_optimizers


def build(arch: str, args):
    n_embd, n_head = model_dims_from_depth(args.depth, args.aspect_ratio, args.head_dim)
    model = GPT(GPTConfig(sequence_len=args.seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=n_head,
                          n_kv_head=n_head, n_embd=n_embd, arch=arch))
    model.init_weights()
    if arch == "gpt":  # the baseline's defaults (TrainConfig)
        opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                                weight_decay=0.0, ns_dtype=torch.float32)
    else:
        opts = setup_ngpt_optimizers(model, lr=1e-3)
    return model, opts


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    add_tiny_shape_args(p)
    p.add_argument("--lazy-proj-freq", type=int, default=7, help="k of the benchmark's lazy arm (7: the nGPT "
                   "campaign's winner, configs/sweeps/ngpt_campaign.toml; the other arm projects every step, "
                   "training's default --lazy-proj-freq 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before measuring")
    p.add_argument("--rounds", type=int, default=28, help="timed steps per arm (a multiple of k gives the lazy arm "
                                                          "its exact share of projections)")
    p.add_argument("--out", default="results/bench/ngpt_step.json")
    args = p.parse_args(argv)
    if args.lazy_proj_freq < 1 or args.rounds < 1:
        raise UserError(f"--lazy-proj-freq and --rounds must be >= 1 (got {args.lazy_proj_freq}, {args.rounds})")
    torch.manual_seed(0)
    arms = {"gpt": (*build("gpt", args), 0), "ngpt_every_step": (*build("ngpt", args), 1),
            f"ngpt_every_{args.lazy_proj_freq}": (*build("ngpt", args), args.lazy_proj_freq)}
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    steps_done = dict.fromkeys(arms, 0)

    def step(name: str) -> float:
        model, opts, freq = arms[name]
        t0 = time.perf_counter()
        model(x, y).backward()
        for opt in opts:
            opt.step()
        steps_done[name] += 1
        if freq and steps_done[name] % freq == 0:
            model.project_weights()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in arms:
        for _ in range(args.warmup):
            step(name)
    times = {name: [] for name in arms}
    for _ in range(args.rounds):  # interleaved: one step of each arm per round
        for name in arms:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    lazy = f"ngpt_every_{args.lazy_proj_freq}"
    model = arms["ngpt_every_step"][0]
    proj = []
    for _ in range(20):
        t0 = time.perf_counter()
        model.project_weights()
        proj.append(time.perf_counter() - t0)
    results = dict(step_times_s=times, median_step_s=median,
                   ngpt_vs_gpt=median["ngpt_every_step"] / median["gpt"],
                   lazy_vs_every_step=median[lazy] / median["ngpt_every_step"],
                   projection_s=statistics.median(proj))
    for name, m in median.items():
        print(f"{name}: median step {1000 * m:.1f} ms")
    print(f"nGPT / GPT {results['ngpt_vs_gpt']:.3f}; lazy (k={args.lazy_proj_freq}) / every step "
          f"{results['lazy_vs_every_step']:.3f}; one projection {1000 * results['projection_s']:.2f} ms")
    write_record(args.out, "ngpt_step", args, "cpu", results)
    return results


if __name__ == "__main__":
    run_main(main)
