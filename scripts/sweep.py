"""Run a hyperparameter campaign: every (round, variant, seed) of a sweep file is one scripts.base_train run.

    python -m scripts.sweep configs/sweeps/ngpt_campaign_tiny.toml --seeds 0,1          # CPU, one run at a time
    python -m scripts.sweep configs/sweeps/ngpt_campaign.toml --devices cuda:0,cuda:1   # two runs at once
    python -m scripts.sweep configs/sweeps/ngpt_campaign.toml --devices cuda:0,cuda:1,cuda:2,cuda:3 \\
        --nproc-per-node 2                                                             # torchrun, 2 GPUs per run

Outputs in --out (default results/sweeps/<name>/):
runs.jsonl (one fsync'd line per finished run: val bpb, train loss, loss reduction, tokens/s, projections, wall
time, exit status), runs/<tag>/ (each run's metrics.jsonl and config.json), logs/<tag>.out/.err, summary.md and
summary.json (mean ± std and 95% t-intervals over seeds, top/bottom tables, per-category winners, ties within
noise). Starting it again skips the runs already recorded with the same settings; a failed run is recorded with
the tail of its stderr and is retried only with --retry-failed. Model tags are <name>-<round>-<variant>-s<seed>;
their checkpoints go to $NANOCHAT_BASE_DIR/checkpoints/<tag>/ as for any run (an interrupted run resumes there).

Hyperparameter campaigns over scripts.base_train: a declarative sweep file, one subprocess per (round, variant,
seed), a crash-resistant record of finished runs, and a summary that says which rank differences are noise.

Sweep file (TOML; configs/sweeps/*.toml):

    name = "ngpt_campaign"        # prefix of every model tag (default: the file's stem)
    seeds = [0, 1]                # default seeds (--seeds overrides)
    [base]                        # the base run: a named config and/or TrainConfig keys
    config = "baseline"
    arch = "ngpt"
    [[rounds]]
    name = "lr"                   # unique; [A-Za-z0-9_.-]
    category = "lr"               # groups rounds for the per-category winners (default: the name)
    values = { matrix_lr = [0.01, 0.02] }   # one variant per value; several keys are zipped (equal lengths)
    # grid = { a = [..], b = [..] }         # one variant per combination (cartesian product)
    # set = { warmup_ratio = 0.1 }          # fixed overrides of every variant of the round
    # combine = ["lr", "batch"]  or "lr..shape"   # the winning overrides of those (earlier) rounds, merged in order

A round's variant = base + combined winners + set + its own values. The winner of a round is its variant with the
lowest mean final val bpb over the seeds run (a tie within noise still picks the lower mean: the summary says so).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field

import numpy as np

from nanochat.common import (doc_summary, UserError, atomic_write_text, check_name, check_writable, flat_fields,
                             from_flat_dict, get_base_dir, repo_root, run_main)
from nanochat.config import TrainConfig, _coerce, load_config_file, parse_int_list, resolve_config_path
from nanochat.locks import FileLock
from nanochat.run_records import append_record, read_records
from nanochat.stats import mean_ci, paired_mean

RUNNER_KEYS = ("seed", "model_tag", "results_dir", "resume", "run", "device_type")  # the runner sets these per run
ROUND_KEYS = ("name", "category", "description", "set", "values", "grid", "combine")
TOP_KEYS = ("name", "description", "seeds", "base", "rounds")
WARMUP_STEPS = 5  # tokens/s skips the first steps (compilation, allocator warm-up), as base_train's ETA does
STDERR_TAIL = 3000


# ---------------------------------------------------------------------------------------------------------------
# the sweep file

@dataclass
class Round:
    name: str
    category: str
    description: str = ""
    set: dict = field(default_factory=dict)
    variants: list = field(default_factory=list)  # [(variant name, overrides)] from values/grid; [] = one variant
    combine: list = field(default_factory=list)   # names of earlier rounds


@dataclass
class Sweep:
    path: str
    name: str
    description: str
    seeds: list
    base_config: str | None      # the named config (or path) passed as --config
    base_values: dict            # what that config file resolves to (part of every run's hash)
    base_overrides: dict
    rounds: list


def _check_keys(overrides, where: str) -> dict:
    """TrainConfig keys (snake or kebab case) with values of the field's type; the runner's own keys are refused."""
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: expected a table of TrainConfig keys (got {overrides!r})")
    known = {name for name, _ in flat_fields(TrainConfig)}
    out = {}
    for key, value in overrides.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"{where}: unknown key {key!r} (not a TrainConfig field; see python -m scripts.base_train "
                            f"--help)")
        if name in RUNNER_KEYS:
            raise UserError(f"{where}: key {key!r} is set by the sweep runner for every run; remove it")
        out[name] = _coerce(TrainConfig, name, value, where)
    return out


def _variant_name(overrides: dict) -> str:
    return ",".join(f"{k}={_fmt(v)}" for k, v in overrides.items())


def _fmt(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def _expand(rnd: dict, where: str) -> list:
    """values (zipped) or grid (product) -> [(name, overrides)]."""
    kind = [k for k in ("values", "grid") if k in rnd]
    if len(kind) > 1:
        raise UserError(f"{where}: give 'values' or 'grid', not both")
    if not kind:
        return []
    table = rnd[kind[0]]
    if not isinstance(table, dict) or not table:
        raise UserError(f"{where}: {kind[0]!r} must be a non-empty table of key = [values]")
    for key, vals in table.items():
        if not isinstance(vals, list) or not vals:
            raise UserError(f"{where}: {kind[0]}.{key} must be a non-empty list (got {vals!r})")
    keys = list(table)
    if kind[0] == "values":
        lengths = {len(v) for v in table.values()}
        if len(lengths) > 1:
            raise UserError(f"{where}: the 'values' lists are zipped and must have equal lengths (got "
                            + ", ".join(f"{k}: {len(v)}" for k, v in table.items()) + ")")
        combos = list(zip(*table.values()))
    else:
        combos = list(itertools.product(*table.values()))
    out = []
    for combo in combos:
        overrides = _check_keys(dict(zip(keys, combo)), where)
        out.append((_variant_name(overrides), overrides))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: repeated variants {sorted({n for n in names if names.count(n) > 1})}")
    return out


def _resolve_combine(spec, names_before: list, where: str) -> list:
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, list) or not spec or not all(isinstance(s, str) for s in spec):
        raise UserError(f"{where}: 'combine' must be a round name, a list of round names, or 'FIRST..LAST'")
    out = []
    for item in spec:
        ends = item.split("..") if ".." in item else [item]
        for end in ends:
            if end not in names_before:
                raise UserError(f"{where}: 'combine' names round {end!r}, which is not a round before this one "
                                f"(earlier rounds: {', '.join(names_before) or 'none'})")
        if len(ends) == 2:
            i, j = names_before.index(ends[0]), names_before.index(ends[1])
            if i > j:
                raise UserError(f"{where}: 'combine' range {item!r} runs backwards")
            out += names_before[i:j + 1]
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def _check_resolved(sweep: Sweep, overrides: dict, where: str):
    """The whole run config must be valid (ranges, choices), before anything trains."""
    try:
        from_flat_dict(TrainConfig, {**sweep.base_values, **overrides}).validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def load_sweep(path: str) -> Sweep:
    if not os.path.isfile(path):
        raise UserError(f"sweep file {path}: no such file")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"sweep file {path} is not valid TOML: {e}") from None
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"sweep file {path}: unknown top-level key {key!r} (known: {', '.join(TOP_KEYS)})")
    name = str(raw.get("name", os.path.splitext(os.path.basename(path))[0]))
    try:  # it names the output folder results/sweeps/<name> and every run's tag
        check_name("name", name, required=True, hint="")
    except UserError as e:
        raise UserError(f"sweep file {path}: {e}") from None
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise UserError(f"sweep file {path}: seeds must be a non-empty list of integers >= 0 (got {seeds!r})")
    base = dict(raw.get("base", {}))
    base_config = base.pop("config", None)
    try:
        base_values = load_config_file(TrainConfig, resolve_config_path(str(base_config))) if base_config else {}
    except UserError as e:
        raise UserError(f"sweep file {path}, [base] config: {e}") from None
    sweep = Sweep(path=path, name=name, description=str(raw.get("description", "")), seeds=seeds,
                  base_config=str(base_config) if base_config else None, base_values=base_values,
                  base_overrides=_check_keys(base, f"sweep file {path}, [base]"), rounds=[])
    sweep.base_values = {**base_values, **sweep.base_overrides}
    _check_resolved(sweep, {}, f"sweep file {path}, [base]")
    rounds = raw.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        raise UserError(f"sweep file {path}: no [[rounds]]")
    for i, rnd in enumerate(rounds):
        rname = rnd.get("name") if isinstance(rnd, dict) else None
        where = f"sweep file {path}, round {rname or i + 1!r}"
        if not isinstance(rname, str):
            raise UserError(f"{where}: every round needs a name (got {rname!r})")
        try:  # part of every run's tag
            check_name("round name", rname, required=True, hint="")
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if rname in [r.name for r in sweep.rounds]:
            raise UserError(f"{where}: two rounds are named {rname!r}")
        for key in rnd:
            if key not in ROUND_KEYS:
                raise UserError(f"{where}: unknown round key {key!r} (known: {', '.join(ROUND_KEYS)})")
        r = Round(name=rname, category=str(rnd.get("category", rname)), description=str(rnd.get("description", "")),
                  set=_check_keys(rnd.get("set", {}), f"{where}, set"), variants=_expand(rnd, where))
        if "combine" in rnd:
            r.combine = _resolve_combine(rnd["combine"], [x.name for x in sweep.rounds], where)
        if not (r.set or r.variants or r.combine):
            raise UserError(f"{where}: the round changes nothing (give set, values, grid or combine)")
        if not r.combine:  # a combine round's overrides exist only once its rounds have winners
            for vname, vals in r.variants or [("", {})]:
                _check_resolved(sweep, {**r.set, **vals}, where + (f", variant {vname}" if vname else ""))
        sweep.rounds.append(r)
    return sweep


# ---------------------------------------------------------------------------------------------------------------
# runs

@dataclass
class Job:
    round: str
    variant: str
    seed: int
    overrides: dict   # on top of the base: combined winners + set + the variant's values
    key_hash: str     # hash of the resolved config: a changed base or round reruns, same settings skip
    tag: str
    results_dir: str  # OUT/runs; metrics in results_dir/tag/metrics.jsonl


def config_hash(sweep: Sweep, overrides: dict) -> str:
    """Of the resolved config, written as its differences from the TrainConfig defaults: `depth = 12` set or not
    is the same run, and a new TrainConfig field (with its default) does not make every recorded run stale."""
    merged = {**sweep.base_values, **overrides}
    resolved = {name: merged[name] for name, f in flat_fields(TrainConfig)
                if name in merged and merged[name] != f.default}
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A variant's name as part of a run tag: the tag rule's characters only (nanochat.common.check_name), so
    matrix_lr=0.02 becomes matrix_lr_0.02."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "default"


def round_variants(rnd: Round, winners: dict) -> list:
    """[(variant name, overrides)] of a round, given the winners {round: overrides} of the earlier rounds."""
    merged = {}
    for name in rnd.combine:
        merged.update(winners[name])  # later rounds win a conflict (the summary lists what was combined)
    base = {**merged, **rnd.set}
    if not rnd.variants:
        return [("default", base)]
    return [(vname, {**base, **vals}) for vname, vals in rnd.variants]


def train_args(sweep: Sweep, job: Job, device_type: str) -> list:
    """scripts.base_train's flags for one run."""
    args = ["--config", sweep.base_config] if sweep.base_config else []
    args += ["--model-tag", job.tag, "--seed", str(job.seed), "--results-dir", job.results_dir, "--resume",
             "--device-type", device_type]
    for key, value in {**sweep.base_overrides, **job.overrides}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args


def parse_slots(devices: str, nproc: int) -> list:
    """'cpu' | 'auto' | 'cuda:0,cuda:1,...' -> slots [(device_type, CUDA_VISIBLE_DEVICES or None)], one run each.
    With nproc > 1 the GPUs are grouped nproc at a time (one torchrun job per group)."""
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be >= 1 (got {nproc})")
    if devices == "auto":
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = ",".join(f"cuda:{i}" for i in range(n)) if n else "cpu"
    if devices == "cpu":
        if nproc > 1:
            raise UserError("--nproc-per-node > 1 needs GPUs (--devices cuda:0,cuda:1,...); the CPU runs one at a time")
        return [("cpu", None)]
    ids = []
    for item in devices.split(","):
        m = re.fullmatch(r"cuda:(\d+)", item.strip())
        if not m:
            raise UserError(f"--devices: {item!r} is not cpu, auto or cuda:N (got {devices!r})")
        ids.append(m.group(1))
    if len(set(ids)) != len(ids):
        raise UserError(f"--devices lists a GPU twice ({devices!r})")
    if len(ids) % nproc:
        raise UserError(f"--devices has {len(ids)} GPUs, not a multiple of --nproc-per-node {nproc}")
    return [("cuda", ",".join(ids[i:i + nproc])) for i in range(0, len(ids), nproc)]


LIVE: set = set()  # the training subprocesses in flight (stop_runs passes a signal on to them)
STOPPED = {130, 143, -2, -15}  # SIGINT / SIGTERM: the run saved at a step boundary and resumes; not a failure


def stop_runs(signum: int):
    """Pass SIGTERM (a scheduler's preemption of the sweep) on to the runs: each saves a checkpoint and exits."""
    for proc in list(LIVE):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass


def make_subprocess_trainer(sweep: Sweep, out: str, nproc: int = 1):
    """The real training function: scripts.base_train in a subprocess (torchrun via scripts.launch for nproc > 1).
    stdout/stderr go to OUT/logs/<tag>.out/.err. Returns (exit status, tail of stderr)."""
    def train(job: Job, slot) -> tuple[int, str]:
        device_type, visible = slot
        if nproc > 1:
            cmd = [sys.executable, "-m", "scripts.launch", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   "scripts.base_train", "--"]
        else:
            cmd = [sys.executable, "-m", "scripts.base_train"]
        cmd += train_args(sweep, job, device_type)
        env = dict(os.environ)
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        logs = os.path.join(out, "logs")
        os.makedirs(logs, exist_ok=True)
        err_path = os.path.join(logs, job.tag + ".err")
        with open(os.path.join(logs, job.tag + ".out"), "w") as fo, open(err_path, "w") as fe:
            fo.write(" ".join(cmd) + "\n")
            fo.flush()
            proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=fo, stderr=fe)
            LIVE.add(proc)
            try:
                rc = proc.wait()
            finally:
                LIVE.discard(proc)
        with open(err_path, errors="replace") as f:
            return rc, f.read()[-STDERR_TAIL:]
    return train


def parse_metrics(path: str) -> dict:
    """What one run's metrics.jsonl says: final val bpb, first/last train loss, mean tokens/s after warm-up,
    projections (nGPT; 0 when absent), steps."""
    out = dict(val_bpb=None, train_loss=None, first_train_loss=None, loss_reduction_pct=None, tok_per_sec=None,
               projections=0, steps=0)
    if not os.path.isfile(path):
        return out
    steps, vals = [], []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            if "val_bpb" in rec:
                vals.append(rec["val_bpb"])
            elif "loss" in rec:
                steps.append(rec)
    if vals:
        out["val_bpb"] = vals[-1]
    if steps:
        first, last = steps[0]["loss"], steps[-1]["loss"]
        timed = steps[min(WARMUP_STEPS, len(steps) - 1):]
        out.update(train_loss=last, first_train_loss=first, steps=steps[-1]["step"],
                   loss_reduction_pct=100.0 * (first - last) / first if first else None,
                   tok_per_sec=float(np.mean([s["tok_per_sec"] for s in timed])),
                   projections=int(steps[-1].get("projections", 0)))
    return out


def record_key(rec) -> tuple:
    return (rec["round"], rec["variant"], rec["seed"], rec["hash"])


def current_records(records: list, keys: set) -> dict:
    """The last record per key, of the keys this campaign (its seeds and settings) has now."""
    out = {}
    for rec in records:
        if record_key(rec) in keys:
            out[record_key(rec)] = rec
    return out


def round_winner(records: list) -> tuple | None:
    """(variant, overrides, mean val bpb) of the OK runs with the lowest mean; None when no run finished."""
    by_variant = {}
    for rec in records:
        if rec["ok"]:
            by_variant.setdefault(rec["variant"], (rec["overrides"], []))[1].append(rec["val_bpb"])
    if not by_variant:
        return None
    name = min(by_variant, key=lambda v: (np.mean(by_variant[v][1]), v))
    return name, by_variant[name][0], float(np.mean(by_variant[name][1]))


def run_campaign(sweep: Sweep, out: str, seeds: list, slots: list, train_fn, retry_failed: bool = False,
                 top: int = 10, drop_checkpoints: bool = False, log=print) -> dict:
    """Every (round, variant, seed) not yet finished, round by round (a combine round needs the winners of the
    rounds before it); within a round, on the slots in parallel. Returns the summary (also written to OUT).
    One sweep per OUT: a second one is refused (OUT/.lock, nanochat.locks) before it writes anything, since two
    would record runs twice and overwrite each other's logs. An OUT that cannot be written is refused first."""
    check_writable(out, "--out")
    with FileLock(os.path.join(out, ".lock"), f"sweep output {out}",
                  "wait for that sweep to finish or stop it, or choose another --out"):
        return _run_campaign(sweep, out, seeds, slots, train_fn, retry_failed, top, drop_checkpoints, log)


def _run_campaign(sweep, out, seeds, slots, train_fn, retry_failed, top, drop_checkpoints, log) -> dict:
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    runs_path = os.path.join(out, "runs.jsonl")
    winners, notes, keys = {}, {}, set()
    for rnd in sweep.rounds:
        missing = [c for c in rnd.combine if c not in winners]
        if missing:
            notes[rnd.name] = f"skipped: no run of round(s) {', '.join(missing)} finished, so there is no winner"
            log(f"[sweep] round {rnd.name}: {notes[rnd.name]}")
            continue
        jobs = []
        for vname, overrides in round_variants(rnd, winners):
            if rnd.combine:
                _check_resolved(sweep, overrides, f"sweep file {sweep.path}, round {rnd.name!r}")
            for seed in seeds:
                job = Job(round=rnd.name, variant=vname, seed=seed, overrides=overrides,
                          key_hash=config_hash(sweep, overrides), results_dir=os.path.join(out, "runs"),
                          tag=f"{sweep.name}-{rnd.name}-{slug(vname)}-s{seed}")
                jobs.append(job)
                keys.add((job.round, job.variant, job.seed, job.key_hash))
        done = current_records(read_records(runs_path), keys)
        todo = [j for j in jobs if (key := (j.round, j.variant, j.seed, j.key_hash)) not in done
                or (retry_failed and not done[key]["ok"])]
        skipped = len(jobs) - len(todo)
        todo = _reuse_identical(todo, read_records(runs_path), runs_path, log)
        log(f"[sweep] round {rnd.name}: {len(jobs)} runs, {skipped} already recorded, {len(todo)} to run")
        _run_jobs(todo, slots, train_fn, runs_path, drop_checkpoints, log)
        recs = [r for k, r in current_records(read_records(runs_path), keys).items() if k[0] == rnd.name]
        win = round_winner(recs)
        if win:
            winners[rnd.name] = win[1]
        write_summary(out, summarize(sweep, read_records(runs_path), keys, seeds, notes), top)
    summary = summarize(sweep, read_records(runs_path), keys, seeds, notes)
    write_summary(out, summary, top)
    return summary


def _reuse_identical(jobs: list, records: list, runs_path: str, log) -> list:
    """A run identical to a finished one of another round (same resolved config and seed: e.g. the base value
    that every one-factor round repeats) is not trained again; its record is copied with `reused_from`."""
    finished = {(r["hash"], r["seed"]): r for r in records if r["ok"]}
    todo = []
    for job in jobs:
        same = finished.get((job.key_hash, job.seed))
        if same is None:
            todo.append(job)
            continue
        rec = {**same, "round": job.round, "variant": job.variant, "tag": job.tag, "overrides": job.overrides,
               "reused_from": same.get("reused_from", same["tag"])}
        append_record(runs_path, rec)
        log(f"[sweep] {job.tag}: identical to {rec['reused_from']}, reused (val bpb {rec['val_bpb']:.4f})")
    return todo


def _run_jobs(jobs: list, slots: list, train_fn, runs_path: str, drop_checkpoints: bool, log):
    free = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(job):
        slot = free.get()
        try:
            metrics_path = os.path.join(job.results_dir, job.tag, "metrics.jsonl")
            if not os.path.isdir(os.path.join(get_base_dir(), "checkpoints", job.tag)) and os.path.exists(
                    metrics_path):
                os.remove(metrics_path)  # a start from scratch must not append to a killed attempt's curve
            t0 = time.monotonic()
            try:
                rc, err = train_fn(job, slot)
            except Exception as e:  # a broken launcher is that run's failure, not the campaign's
                rc, err = -1, f"{type(e).__name__}: {e}"
            return job, rc, err, time.monotonic() - t0, slot
        finally:
            free.put(slot)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(slots))
    try:
        for fut in concurrent.futures.as_completed([pool.submit(one, j) for j in jobs]):
            job, rc, err, wall, slot = fut.result()
            if rc in STOPPED:
                log(f"[sweep] {job.tag}: stopped by a signal (exit {rc}); not recorded, a rerun resumes it")
                continue
            m = parse_metrics(os.path.join(job.results_dir, job.tag, "metrics.jsonl"))
            ok = rc == 0 and m["val_bpb"] is not None and math.isfinite(m["val_bpb"])
            rec = dict(round=job.round, variant=job.variant, seed=job.seed, hash=job.key_hash, tag=job.tag,
                       overrides=job.overrides, ok=ok, exit_status=rc, wall_s=round(wall, 3), **m,
                       device=slot[0] + (f":{slot[1]}" if slot[1] is not None else ""),
                       finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            if not ok:
                rec["stderr_tail"] = err if rc != 0 else "exited 0 but metrics.jsonl has no val_bpb record"
            append_record(runs_path, rec)
            ckpt = os.path.join(get_base_dir(), "checkpoints", job.tag)
            if ok and drop_checkpoints and os.path.isdir(ckpt):
                shutil.rmtree(ckpt)  # recorded: a finished sweep run is its metrics, not its weights
            val = f"val bpb {m['val_bpb']:.4f}" if ok else f"FAILED (exit {rc})"
            log(f"[sweep] {job.tag}: {val} in {wall:.1f} s")
    finally:  # on Ctrl-C / SIGTERM: start nothing new, wait for the runs in flight to save and exit
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------
# summary

METRICS = ("val_bpb", "train_loss", "loss_reduction_pct", "tok_per_sec", "projections", "wall_s")
TIE_RULE = ("Ranks are by mean final val bpb (bits per byte on the validation split; lower is better). Two adjacent "
            "ranks are marked a tie (`~`) when their 95% t-intervals over seeds overlap, or when a paired t-test "
            "over the seeds both ran gives p >= 0.05: the order between them is not established by these seeds. "
            "A tie is not transitive: a chain of ties can end in a real difference.")


def _cell(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return dict(n=0, mean=None, std=None, ci95=None)
    n = len(vals)
    ci = mean_ci(vals)["ci95"] if n >= 2 else None
    return dict(n=n, mean=float(np.mean(vals)), std=float(np.std(vals, ddof=1)) if n >= 2 else None, ci95=ci)


def _tie(a: dict, b: dict) -> tuple[bool | None, str]:
    """Whether two ranked entries (a above b) are within noise: None when there is no noise estimate."""
    ca, cb = a["metrics"]["val_bpb"]["ci95"], b["metrics"]["val_bpb"]["ci95"]
    shared = sorted(set(a["per_seed"]) & set(b["per_seed"]))
    p = None
    if len(shared) >= 2:
        p = paired_mean([a["per_seed"][s] for s in shared], [b["per_seed"][s] for s in shared])["p_value"]
    if ca is None and p is None:
        return None, "unverified (one seed)"
    why = []
    if ca is not None and cb is not None and ca[1] >= cb[0] and cb[1] >= ca[0]:
        why.append("95% intervals overlap")
    if p is not None and p >= 0.05:
        why.append(f"paired t p={p:.2f}")
    if why:
        return True, "tie: " + ", ".join(why)
    return False, f"separated (paired t p={p:.3f})" if p is not None else "separated (intervals disjoint)"


def rank(entries: list) -> list:
    """Sort by mean val bpb and mark each entry's tie with the one ranked just above it."""
    ranked = sorted([e for e in entries if e["metrics"]["val_bpb"]["mean"] is not None],
                    key=lambda e: e["metrics"]["val_bpb"]["mean"])
    for i, e in enumerate(ranked):
        e["rank"] = i + 1
        e["tie_with_above"], e["tie_note"] = _tie(ranked[i - 1], e) if i else (None, "")
    return ranked


def summarize(sweep: Sweep, records: list, keys: set, seeds: list, notes: dict | None = None) -> dict:
    cur = current_records(records, keys)
    entries, failed = {}, []
    for (rname, vname, seed, _), rec in sorted(cur.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        e = entries.setdefault((rname, vname), dict(round=rname, variant=vname, overrides=rec["overrides"],
                                                    runs=[], per_seed={}, failed_seeds=[]))
        e["runs"].append(rec)
        if rec["ok"]:
            e["per_seed"][seed] = rec["val_bpb"]
        else:
            e["failed_seeds"].append(seed)
            failed.append(dict(round=rname, variant=vname, seed=seed, exit_status=rec["exit_status"],
                               stderr_tail=rec.get("stderr_tail", "")[-600:]))
    order = {r.name: i for i, r in enumerate(sweep.rounds)}
    category = {r.name: r.category for r in sweep.rounds}
    for e in entries.values():
        ok = [r for r in e["runs"] if r["ok"]]
        e["metrics"] = {m: _cell([r.get(m) for r in ok]) for m in METRICS}
        e["category"] = category.get(e["round"], "")
        del e["runs"]
    all_entries = sorted(entries.values(), key=lambda e: (order.get(e["round"], 1e9), e["variant"]))
    rounds = []
    for r in sweep.rounds:
        mine = [e for e in all_entries if e["round"] == r.name]
        ranked = rank([dict(e) for e in mine])
        rounds.append(dict(name=r.name, category=r.category, description=r.description, combine=r.combine,
                           note=(notes or {}).get(r.name, ""), ranking=ranked,
                           winner=ranked[0]["variant"] if ranked else None,
                           winner_overrides=ranked[0]["overrides"] if ranked else None,
                           winner_tied=bool(len(ranked) > 1 and ranked[1]["tie_with_above"])))
    categories = {}
    for cat in dict.fromkeys(r.category for r in sweep.rounds):
        ranked = rank([dict(e) for e in all_entries if e["category"] == cat])
        if ranked:
            categories[cat] = dict(winner=dict(round=ranked[0]["round"], variant=ranked[0]["variant"],
                                               val_bpb=ranked[0]["metrics"]["val_bpb"]),
                                   runner_up_tie=ranked[1]["tie_with_above"] if len(ranked) > 1 else None,
                                   runner_up_note=ranked[1]["tie_note"] if len(ranked) > 1 else "")
    overall = rank([dict(e) for e in all_entries])
    n_seeds = len(seeds)
    return dict(campaign=sweep.name, sweep_file=sweep.path, seeds=seeds, base_config=sweep.base_config,
                base_overrides=sweep.base_overrides, metric="final val_bpb (bits per byte, lower is better)",
                tie_rule=TIE_RULE,
                noise=("no noise estimate exists with one seed: every rank difference is unverified"
                       if n_seeds < 2 else f"{n_seeds} seeds: 95% t-intervals over seeds, paired over shared seeds"),
                runs_total=len(cur), runs_failed=len(failed), rounds=rounds, categories=categories,
                overall=overall, failed=failed)


def _num(cell: dict, digits: int = 4, big: bool = False) -> str:
    if cell["mean"] is None:
        return "-"
    f = (lambda x: f"{x:,.0f}") if big else (lambda x: f"{x:.{digits}f}")
    s = f(cell["mean"])
    if cell["std"] is not None:
        s += f" ± {f(cell['std'])}"
    return s


def _table(entries: list) -> list:
    lines = ["| rank | round | variant | val bpb (mean ± std) | 95% CI | vs above | train loss | loss red. % | tok/s "
             "| proj. | wall s | seeds ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = e["metrics"]
        ci = m["val_bpb"]["ci95"]
        mark = {True: "~ ", False: "", None: ""}[e["tie_with_above"]]
        fails = f" ({len(e['failed_seeds'])} failed)" if e["failed_seeds"] else ""
        lines.append(f"| {mark}{e['rank']} | {e['round']} | {e['variant']} | {_num(m['val_bpb'])} | "
                     + (f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "-") + f" | {e['tie_note'] or '-'} | "
                     f"{_num(m['train_loss'])} | {_num(m['loss_reduction_pct'], 1)} | "
                     f"{_num(m['tok_per_sec'], big=True)} | {_num(m['projections'], 0)} | "
                     f"{_num(m['wall_s'], 0)} | {m['val_bpb']['n']}{fails} |")
    return lines


def render_markdown(s: dict, top: int = 10) -> str:
    lines = [f"# Sweep `{s['campaign']}`", "",
             f"File `{s['sweep_file']}`; base config `{s['base_config']}` with {json.dumps(s['base_overrides'])}; "
             f"seeds {s['seeds']}; {s['runs_total']} runs recorded, {s['runs_failed']} failed.", "",
             f"**Metric:** {s['metric']}. Train loss is the last step's (nats/token); loss reduction is first vs "
             f"last step's train loss; tok/s is the mean over steps after the first {WARMUP_STEPS}; proj. is the "
             f"nGPT weight-projection count (0 for GPT).", "",
             f"**Noise:** {s['noise']}.", "", f"**Ties:** {s['tie_rule']}", ""]
    if len(s["seeds"]) < 2:
        lines += ["> With one seed there is no noise estimate: every difference below is unverified. Rerun with "
                  "`--seeds 0,1,2` (finished runs are kept).", ""]
    overall = s["overall"]
    lines += [f"## Top {min(top, len(overall))}", ""] + _table(overall[:top]) + [""]
    if len(overall) > top:
        lines += [f"## Bottom {min(top, len(overall) - top)}", ""] + _table(overall[-min(top, len(overall) - top):])
        lines += [""]
    lines += ["## Per-category winners", "", "| category | round | variant | val bpb | runner-up |",
              "|---|---|---|---|---|"]
    for cat, c in s["categories"].items():
        w = c["winner"]
        lines.append(f"| {cat} | {w['round']} | {w['variant']} | {_num(w['val_bpb'])} | {c['runner_up_note'] or '-'} |")
    lines += ["", "## Rounds", ""]
    for r in s["rounds"]:
        head = f"### {r['name']} ({r['category']})"
        lines += [head, ""]
        if r["description"]:
            lines += [r["description"], ""]
        if r["combine"]:
            merged = f": `{json.dumps(r['ranking'][0]['overrides'])}`" if r["ranking"] else ""
            lines += [f"Combines the winners of {', '.join(r['combine'])}{merged}.", ""]
        if r["note"]:
            lines += [f"*{r['note']}*", ""]
        if not r["ranking"] and not r["note"]:
            lines += ["*No finished run yet.*", ""]
        if r["ranking"]:
            lines += _table(r["ranking"]) + [""]
            if r["winner_tied"]:
                lines += [f"Winner `{r['winner']}` is within noise of the runner-up: a combine round takes it on "
                          f"its mean alone.", ""]
    if s["failed"]:
        lines += ["## Failed runs", ""]
        for f in s["failed"]:
            tail = f["stderr_tail"].strip().splitlines()[-1:] or [""]
            lines.append(f"- {f['round']} / {f['variant']} / seed {f['seed']}: exit {f['exit_status']}: "
                         f"`{tail[0]}`")
        lines.append("")
    return "\n".join(lines)


def write_summary(out: str, summary: dict, top: int = 10):
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str)),
                       ("summary.md", render_markdown(summary, top))):
        atomic_write_text(os.path.join(out, name), text + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
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

    stopped_by = []

    def on_term(signum, frame):  # a preempted sweep stops its runs cleanly (they resume on the next start)
        stopped_by.append(signum)
        stop_runs(signum)
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        run_campaign(sweep, out, seeds, slots, train, retry_failed=args.retry_failed, top=args.top,
                     drop_checkpoints=args.drop_checkpoints)
    except KeyboardInterrupt:  # one line and the launcher's exit status (128 + the signal), not a traceback
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        print(f"[sweep] stopped by {signal.Signals(signum).name}: the runs in flight saved and stopped; "
              f"run the same command again to resume", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    print(f"[sweep] summary: {os.path.join(out, 'summary.md')}")


if __name__ == "__main__":
    run_main(main)
