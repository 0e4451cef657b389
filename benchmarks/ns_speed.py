"""Time per Newton–Schulz call, per preset and iteration dtype, measured side by side in one process (interleaved
rounds, so machine noise hits every variant alike). Writes JSON with the medians and the ratios to quintic x5.

    python -m benchmarks.ns_speed                                # 768 x 3072 (a d12 MLP matrix), fp32 and bf16
    python -m benchmarks.ns_speed --shape 768x768 --batch 4 --rounds 10 --out results/bench/ns_speed.json

Every preset does the same 3 matmuls per step, so handover8 / quintic x5 is at most the FLOP ratio 8/5 = 1.6: the
fixed per-call work (normalisation, casts, transposes) is shared and pulls the measured ratio below it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.bench_utils import write_record
from nanochat.common import doc_summary, UserError, autodetect_device_type, run_main
from nanochat.newton_schulz import PRESETS, ns_schedule, zeropower_via_newtonschulz


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--shape", default="768x3072", help="rows x cols of each matrix")
    p.add_argument("--batch", type=int, default=1, help="matrices per call (Muon batches equal shapes)")
    p.add_argument("--presets", default="quintic,handover8,polar_express5,cubic")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per variant (the median is reported)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default="results/bench/ns_speed.json")
    args = p.parse_args(argv)
    try:
        m, n = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape must look like 768x3072 (got {args.shape!r})") from None
    names = [s.strip() for s in args.presets.split(",") if s.strip()]
    if unknown := [s for s in names if s not in PRESETS]:
        raise UserError(f"--presets: unknown {', '.join(unknown)} (known: {', '.join(PRESETS)})")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if unknown := [d for d in args.dtypes.split(",") if d not in dtypes]:
        raise UserError(f"--dtypes: unknown {', '.join(unknown)} (known: float32, bfloat16)")
    if args.batch <= 0 or args.rounds <= 0 or args.warmup < 0:
        raise UserError("--batch and --rounds must be > 0, --warmup >= 0")

    device = torch.device(args.device or autodetect_device_type())
    G = torch.randn(args.batch, m, n, generator=torch.Generator().manual_seed(0)).to(device)
    variants = [(name, d) for d in args.dtypes.split(",") for name in names]

    def call(name, d):
        zeropower_via_newtonschulz(G, PRESETS[name], dtype=dtypes[d])
        if device.type == "cuda":
            torch.cuda.synchronize()

    for v in variants:
        for _ in range(args.warmup):
            call(*v)
    times = {v: [] for v in variants}
    for _ in range(args.rounds):  # interleaved: round r times every variant once
        for v in variants:
            t0 = time.perf_counter()
            call(*v)
            times[v].append(time.perf_counter() - t0)

    results = {}
    for d in args.dtypes.split(","):
        base = statistics.median(times[("quintic", d)]) if "quintic" in names else None
        for name in names:
            med = statistics.median(times[(name, d)])
            steps = len(ns_schedule(PRESETS[name]))
            results[f"{name}/{d}"] = dict(preset=name, dtype=d, steps=steps, median_ms=1000 * med,
                                          min_ms=1000 * min(times[(name, d)]),
                                          ratio_to_quintic=med / base if base else None,
                                          flop_ratio_to_quintic=steps / 5)
    write_record(args.out, "ns_speed", args, device.type, results, shape=[m, n])
    for key, r in results.items():
        ratio = f"{r['ratio_to_quintic']:.2f}x quintic (FLOPs {r['flop_ratio_to_quintic']:.2f}x)" \
            if r["ratio_to_quintic"] else ""
        print(f"{key:24s} {r['steps']} steps  median {r['median_ms']:8.1f} ms  {ratio}")


if __name__ == "__main__":
    run_main(main)
