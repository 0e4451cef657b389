"""docs/results.md: the measured tables of one speedrun's results folder, with the commit and the machine that
produced them, so that every number in the docs names its run and can be regenerated when the code changes it.

    python -m analysis.results_doc --results-dir results --prefix tiny_ --out docs/results.md

Sections: provenance (each run's commit and machine, from its config.json), the speedrun stage times, val bpb over
training (baseline vs mHC), the Phase-4 comparison (analysis.compare_results), what the mHC connections learned
(mhc_stats.json), the headroom of a context-dependent gate (every gate_oracle JSON), every RL run's arms (the
report's table; a --seeds study's summary), the memory estimates, and the benchmark records in
<results>/bench. No figures (they live in the results folder: results/report.md shows them).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os

from analysis.compare_results import add_column_args, build_table, columns_for, to_markdown
from analysis.plots import read_jsonl
from analysis.report import oracle_table, rl_table, seeds_table, stage_times
from nanochat.common import UserError, doc_summary, git_commit, run_main


def _load(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def provenance(results_dir: str, tags: list[str]) -> list[str]:
    lines = ["| run | git commit | machine | torch, threads |", "|---|---|---|---|"]
    for tag in tags:
        cfg = _load(os.path.join(results_dir, tag, "config.json"))
        if cfg is None:
            continue
        m = cfg.get("machine") or {}
        where = m.get("gpu") or f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, {m.get('cpu_capability', '?')})"
        lines.append(f"| `{tag}` | `{cfg.get('git_commit', '?')}` | {where} | {m.get('torch', '?')}, "
                     f"{m.get('threads', '?')} |")
    return lines + [""]


def val_bpb_curves(results_dir: str, runs: dict) -> list[str]:
    """val bpb at every in-training evaluation, one column per run."""
    curves = {}
    for name, tag in runs.items():
        path = os.path.join(results_dir, tag, "metrics.jsonl")
        if os.path.isfile(path):
            curves[name] = {r["step"]: r["val_bpb"] for r in read_jsonl(path) if "val_bpb" in r}
    if not curves:
        return ["(no metrics.jsonl found)", ""]
    steps = sorted(set().union(*(c.keys() for c in curves.values())))
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(f"{c[s]:.4f}" if s in c else "—" for c in curves.values()) + " |")
    return lines + [""]


def mhc_stats_table(results_dir: str, tag: str) -> list[str]:
    stats = _load(os.path.join(results_dir, tag, "mhc_stats.json"))
    if stats is None:
        return [f"(no {tag}/mhc_stats.json)", ""]
    lines = [f"`{tag}` at step {stats['step']}, over {stats['tokens']} validation tokens:", "",
             "| sub-layer | gate | mean diag(H_res) | mean abs(H_res - I) | from init | worst row/col sum error |",
             "|---|---|---|---|---|---|"]
    for s in stats["sublayers"]:
        lines.append(f"| {s['layer']} {s['kind']} | {s['gate']:.3f} | {s['h_res_mean_diag']:.3f} | "
                     f"{s['h_res_dist_identity']:.4f} | {s.get('h_res_dist_init', float('nan')):.4f} | "
                     f"{s['h_res_max_sum_error']:.1e} |")
    return lines + [""]


def memory_lines(results_dir: str) -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(results_dir, "bench", "memory_estimate_*.json"))):
        rec = _load(path)
        res = rec["results"]
        for mode, est in res["by_mode"].items():
            lines.append(f"| {os.path.basename(path)[16:-5]} | {mode} | {res['device_batch_size']} x {res['seq_len']} "
                         f"| {rec['config']['dtype']} | {est['peak'] / 2**30:.3f} | {est['activations'] / 2**30:.3f} |")
    if not lines:
        return ["(no memory estimates)", ""]
    return ["| model | activation checkpointing | tokens per device | dtype | peak GiB | activations GiB |",
            "|---|---|---|---|---|---|", *lines, ""]


def inference_lines(results_dir: str) -> list[str]:
    rec = _load(os.path.join(results_dir, "bench", "inference.json"))
    if rec is None:
        return ["(no bench/inference.json)", ""]
    return ["```", json.dumps(rec["results"], indent=1)[:3000], "```", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    add_column_args(p)
    p.add_argument("--out", default="docs/results.md")
    args = p.parse_args(argv)
    R = args.results_dir
    if not os.path.isdir(R):
        raise UserError(f"--results-dir {R} does not exist")
    columns = columns_for(args.prefix, args.baseline_tag, args.mhc_tag, args.sft_tag, args.rl_tag,
                          args.baseline_sft_tag)
    tags = {c["name"]: c["tag"] for c in columns}
    lines = ["# Measured results", "",
             f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} by `python -m analysis.results_doc "
             f"--results-dir {os.path.basename(os.path.abspath(R))} --prefix {args.prefix}` (code at commit "
             f"`{git_commit()}`) from one run of `bash speedrun.sh`. Each run's own commit and machine:", "",
             *provenance(R, list(tags.values())),
             "A tiny-preset number is a smoke test of the pipeline, never a finding (docs/design.md, section 7).", "",
             "## Speedrun stages", ""]
    times = stage_times(R)
    lines += (["| stage | wall time |", "|---|---|", *[f"| {t['stage']} | {t['seconds']} s |" for t in times],
               f"| **total** | **{sum(t['seconds'] for t in times)} s** |", ""] if times else ["(none recorded)", ""])
    lines += ["## val bpb over training", "", *val_bpb_curves(R, {k: tags[k] for k in ("Baseline", "Dynamic mHC")})]
    table = build_table(R, columns, os.path.join(R, "bench", "inference.json"))
    lines += ["## Phase-4 comparison", "", to_markdown(table), ""]
    lines += ["## What the mHC connections learned", "", *mhc_stats_table(R, tags["Dynamic mHC"])]
    lines += ["## Headroom of a context-dependent gate (analysis.gate_oracle)", ""]
    for path in sorted(glob.glob(os.path.join(R, tags["mHC + SFT"], "gate_oracle_*.json"))):
        lines += [f"### `{os.path.splitext(os.path.basename(path))[0]}`", "", *oracle_table(_load(path))]
    lines += ["## RL gate controller", ""]
    for run_dir in sorted(d for d in glob.glob(os.path.join(R, "rl", "*")) if os.path.isdir(d)):
        ev = _load(os.path.join(run_dir, "eval.json"))
        seeds = _load(os.path.join(run_dir, "seeds.json"))
        if ev is not None:
            lines += [f"### `{os.path.basename(run_dir)}`", "", *rl_table(ev)]
        elif seeds is not None:
            lines += [f"### `{os.path.basename(run_dir)}` over seeds", "", *seeds_table(seeds)]
    lines += ["## Memory (estimated before training)", "", *memory_lines(R)]
    lines += ["## Inference benchmark", "", *inference_lines(R)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
