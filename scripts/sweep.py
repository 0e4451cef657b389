"""Run a hyperparameter campaign: every (round, variant, seed) of a sweep file is one scripts.base_train run.

    python -m scripts.sweep configs/sweeps/ngpt_campaign_tiny.toml --seeds 0,1          # CPU, one run at a time
    python -m scripts.sweep configs/sweeps/ngpt_campaign.toml --devices cuda:0,cuda:1   # two runs at once
    python -m scripts.sweep configs/sweeps/ngpt_campaign.toml --devices cuda:0,cuda:1,cuda:2,cuda:3 \\
        --nproc-per-node 2                                                             # torchrun, 2 GPUs per run

The file format is in nanochat/sweep.py. Outputs in --out (default results/sweeps/<name>/):
runs.jsonl (one fsync'd line per finished run: val bpb, train loss, loss reduction, tokens/s, projections, wall
time, exit status), runs/<tag>/ (each run's metrics.jsonl and config.json), logs/<tag>.out/.err, summary.md and
summary.json (mean ± std and 95% t-intervals over seeds, top/bottom tables, per-category winners, ties within
noise). Starting it again skips the runs already recorded with the same settings; a failed run is recorded with
the tail of its stderr and is retried only with --retry-failed. Model tags are <name>-<round>-<variant>-s<seed>;
their checkpoints go to $NANOCHAT_BASE_DIR/checkpoints/<tag>/ as for any run (an interrupted run resumes there).
"""
from __future__ import annotations

import argparse
import os
import signal

from nanochat.common import UserError, repo_root, run_main
from nanochat.config import parse_int_list
from nanochat.sweep import load_sweep, make_subprocess_trainer, parse_slots, run_campaign, stop_runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("sweep_file", help="a sweep TOML file (configs/sweeps/*.toml) or its name in configs/sweeps/")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's `seeds`)")
    p.add_argument("--out", default=None, help="output folder (default: results/sweeps/<name>)")
    p.add_argument("--devices", default="auto", help="auto (every visible GPU, else cpu) | cpu | cuda:0,cuda:1,... "
                   "(a pool: one run per GPU at a time)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="GPUs per run (torchrun via scripts.launch)")
    p.add_argument("--retry-failed", action="store_true", help="rerun the runs recorded as failed")
    p.add_argument("--drop-checkpoints", action="store_true", help="delete a run's checkpoints once it is recorded "
                   "as finished (they are $NANOCHAT_BASE_DIR/checkpoints/<tag>/; the metrics stay in --out)")
    p.add_argument("--top", type=int, default=10, help="rows of the top-N and bottom-N tables")
    p.add_argument("--dry-run", action="store_true", help="validate the file and list the runs; train nothing")
    args = p.parse_args(argv)
    path = args.sweep_file
    if not os.path.isfile(path) and os.sep not in path and not path.endswith(".toml"):
        path = os.path.join(repo_root(), "configs", "sweeps", path + ".toml")
    sweep = load_sweep(path)
    seeds = parse_int_list(args.seeds, "seeds") if args.seeds else sweep.seeds
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must be distinct integers >= 0 (got {args.seeds!r})")
    if args.top < 1:
        raise UserError(f"--top must be >= 1 (got {args.top})")
    # absolute: the runs start in the repository root, whatever the caller's working directory
    out = os.path.abspath(args.out or os.path.join("results", "sweeps", sweep.name))
    if args.dry_run:
        for r in sweep.rounds:
            variants = [n for n, _ in r.variants] or ["default"]
            extra = f" + winners of {', '.join(r.combine)}" if r.combine else ""
            print(f"{r.name} ({r.category}): {len(variants)} variant(s) x {len(seeds)} seed(s){extra}: "
                  f"{'; '.join(variants)}" + (f" | set {r.set}" if r.set else ""))
        return
    slots = parse_slots(args.devices, args.nproc_per_node)
    if len(seeds) < 2:
        print("[sweep] one seed: no noise estimate, every rank difference will be unverified")
    train = make_subprocess_trainer(sweep, out, args.nproc_per_node)

    def on_term(signum, frame):  # a preempted sweep stops its runs cleanly (they resume on the next start)
        stop_runs(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    run_campaign(sweep, out, seeds, slots, train, retry_failed=args.retry_failed, top=args.top,
                 drop_checkpoints=args.drop_checkpoints)
    print(f"[sweep] summary: {os.path.join(out, 'summary.md')}")


if __name__ == "__main__":
    run_main(main)
