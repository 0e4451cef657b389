"""scripts.sweep: the campaign runner with a fake training function (resume, crashes, combine,
ranking and ties, bad input), and one real end-to-end sweep of tiny scripts.base_train subprocesses."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from nanochat.common import UserError
from scripts.sweep import _cell, load_sweep, parse_metrics, parse_slots, rank, run_campaign, train_args

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, body: str, name="camp") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body))
    return str(path)


class FakeTrain:
    """Writes a metrics.jsonl as base_train would; val bpb = value(overrides, seed). Counts its calls."""

    def __init__(self, value, fail=lambda job: False, interrupt_after=None):
        self.value, self.fail, self.interrupt_after, self.calls = value, fail, interrupt_after, []
        self.interrupted = 0

    def __call__(self, job, slot):
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            self.interrupted += 1
            raise KeyboardInterrupt  # the campaign is killed while this run is in flight
        self.calls.append((job.round, job.variant, job.seed))
        if self.fail(job) == "signal":
            return 143, "stopped by signal 15 at step 3; continue with --resume"
        if self.fail(job):
            return 1, "Traceback ...\nRuntimeError: boom in " + job.tag
        path = os.path.join(job.results_dir, job.tag, "metrics.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            for step in range(1, 11):
                f.write(json.dumps(dict(step=step, loss=10.0 - step * 0.5, lrm=1.0, grad_norm=1.0, dt=0.1,
                                        tok_per_sec=1.0 if step <= 5 else 100.0, projections=step // 3)) + "\n")
            f.write(json.dumps(dict(step=10, val_bpb=self.value(job.overrides, job.seed))) + "\n")
        return 0, ""


TWO_ROUNDS = """
    name = "camp"
    [base]
    depth = 2
    [[rounds]]
    name = "lr"
    category = "lr"
    values = { matrix_lr = [0.01, 0.03, 0.04] }
    [[rounds]]
    name = "wd"
    category = "schedule"
    grid = { warmdown_ratio = [0.1, 0.3], final_lr_frac = [0.0, 0.1] }
    [[rounds]]
    name = "both"
    combine = "lr..wd"
"""


def lr_wd_value(o, seed):  # best: matrix_lr 0.03, warmdown 0.3, final_lr_frac 0.1
    return (3.0 + abs(o.get("matrix_lr", 0.02) - 0.03) * 10 + abs(o.get("warmdown_ratio", 0.3) - 0.3)
            + abs(o.get("final_lr_frac", 0.1) - 0.1) + 0.001 * seed)


def test_interrupted_campaign_resumes_without_rerunning(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, TWO_ROUNDS))
    out = str(tmp_path / "out")
    first = FakeTrain(lr_wd_value, interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(sweep, out, [0, 1], [("cpu", None)], first, log=lambda *a: None)
    assert len(first.calls) == 5 and first.interrupted == 1  # nothing new starts after the interruption
    lines = (tmp_path / "out" / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 5  # one fsync'd line per finished run
    second = FakeTrain(lr_wd_value)
    summary = run_campaign(sweep, out, [0, 1], [("cpu", None)], second, log=lambda *a: None)
    total = (3 + 4 + 1) * 2
    assert len(second.calls) == total - 5
    assert not set(first.calls) & set(second.calls)
    assert summary["runs_total"] == total and summary["runs_failed"] == 0
    third = FakeTrain(lr_wd_value)
    run_campaign(sweep, out, [0, 1], [("cpu", None)], third, log=lambda *a: None)
    assert third.calls == []  # everything recorded: nothing reruns
    assert len((tmp_path / "out" / "runs.jsonl").read_text().splitlines()) == total  # and nothing is re-recorded
    fourth = FakeTrain(lr_wd_value)  # a new seed runs only that seed
    run_campaign(sweep, out, [0, 1, 2], [("cpu", None)], fourth, log=lambda *a: None)
    assert len(fourth.calls) == 8 and {c[2] for c in fourth.calls} == {2}
    for name in ("summary.md", "summary.json"):
        assert (tmp_path / "out" / name).is_file()


def test_identical_runs_are_reused(tmp_path):
    body = """
        [base]
        matrix_lr = 0.02
        [[rounds]]
        name = "lr"
        values = { matrix_lr = [0.01, 0.02] }
        [[rounds]]
        name = "depth"
        values = { depth = [12, 10] }
    """
    sweep = load_sweep(write_sweep(tmp_path, body))
    fake = FakeTrain(lambda o, s: 1.0)
    summary = run_campaign(sweep, str(tmp_path / "out"), [0, 1], [("cpu", None)], fake, log=lambda *a: None)
    assert len(fake.calls) == 6  # depth=12 is the base (12 is the default), already run as matrix_lr=0.02
    recs = [json.loads(x) for x in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    reused = [r for r in recs if "reused_from" in r]
    assert [(r["round"], r["seed"], r["reused_from"]) for r in reused] == [
        ("depth", 0, "camp-lr-matrix_lr_0.02-s0"), ("depth", 1, "camp-lr-matrix_lr_0.02-s1")]
    assert summary["runs_total"] == 8


def test_changed_settings_rerun(tmp_path):
    out = str(tmp_path / "out")
    sweep = load_sweep(write_sweep(tmp_path, TWO_ROUNDS))
    run_campaign(sweep, out, [0], [("cpu", None)], FakeTrain(lr_wd_value), log=lambda *a: None)
    changed = load_sweep(write_sweep(tmp_path, TWO_ROUNDS.replace("depth = 2", "depth = 3")))
    again = FakeTrain(lr_wd_value)
    run_campaign(changed, out, [0], [("cpu", None)], again, log=lambda *a: None)
    assert len(again.calls) == 8  # the base changed: the hash of every run's resolved config changed


def test_crashed_run_is_recorded_and_not_retried(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, TWO_ROUNDS))
    out = str(tmp_path / "out")
    crash = lambda job: job.round == "lr" and job.overrides["matrix_lr"] == 0.04 and job.seed == 1  # noqa: E731
    fake = FakeTrain(lr_wd_value, fail=crash)
    summary = run_campaign(sweep, out, [0, 1], [("cpu", None)], fake, log=lambda *a: None)
    recs = [json.loads(x) for x in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    bad = [r for r in recs if not r["ok"]]
    assert len(bad) == 1 and bad[0]["exit_status"] == 1 and "boom in camp-lr-matrix_lr_0.04-s1" in bad[0][
        "stderr_tail"]
    assert summary["runs_failed"] == 1 and "boom" in (tmp_path / "out" / "summary.md").read_text()
    rerun = FakeTrain(lr_wd_value)
    run_campaign(sweep, out, [0, 1], [("cpu", None)], rerun, log=lambda *a: None)
    assert rerun.calls == []
    retry = FakeTrain(lr_wd_value)
    summary = run_campaign(sweep, out, [0, 1], [("cpu", None)], retry, retry_failed=True, log=lambda *a: None)
    assert retry.calls == [("lr", "matrix_lr=0.04", 1)] and summary["runs_failed"] == 0


def test_run_stopped_by_a_signal_is_not_a_failure(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, TWO_ROUNDS))
    out = str(tmp_path / "out")
    stop = lambda job: "signal" if job.round == "lr" and job.seed == 0 else False  # noqa: E731
    run_campaign(sweep, out, [0], [("cpu", None)], FakeTrain(lr_wd_value, fail=stop), log=lambda *a: None)
    recs = [json.loads(x) for x in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert all(r["round"] != "lr" for r in recs)  # exit 143 = saved and stopped: resumable, so not recorded
    again = FakeTrain(lr_wd_value)
    run_campaign(sweep, out, [0], [("cpu", None)], again, log=lambda *a: None)
    assert sorted(c[0] for c in again.calls) == ["both", "lr", "lr", "lr"]  # both: lr's winner now exists


def test_combine_takes_the_recorded_winners(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, TWO_ROUNDS))
    out = str(tmp_path / "out")
    summary = run_campaign(sweep, out, [0, 1], [("cpu", None)], FakeTrain(lr_wd_value), log=lambda *a: None)
    rounds = {r["name"]: r for r in summary["rounds"]}
    assert rounds["lr"]["winner_overrides"] == {"matrix_lr": 0.03}
    assert rounds["wd"]["winner_overrides"] == {"warmdown_ratio": 0.3, "final_lr_frac": 0.1}
    assert rounds["both"]["ranking"][0]["overrides"] == {"matrix_lr": 0.03, "warmdown_ratio": 0.3,
                                                         "final_lr_frac": 0.1}
    # the winners come from the record: a later best in lr (other seeds' numbers) changes what is combined
    inverted = FakeTrain(lambda o, s: lr_wd_value(o, s) - 50 * o.get("matrix_lr", 0))
    summary = run_campaign(sweep, out, [5], [("cpu", None)], inverted, log=lambda *a: None)
    both = {r["name"]: r for r in summary["rounds"]}["both"]
    assert both["ranking"][0]["overrides"]["matrix_lr"] == 0.04


def test_ranking_puts_the_better_round_first_and_marks_noise_ties(tmp_path):
    body = """
        [[rounds]]
        name = "good"
        set = { matrix_lr = 0.01 }
        [[rounds]]
        name = "noisy_a"
        set = { matrix_lr = 0.02 }
        [[rounds]]
        name = "noisy_b"
        set = { matrix_lr = 0.03 }
    """
    sweep = load_sweep(write_sweep(tmp_path, body))
    # good: clearly lower on every seed; a and b: the same up to seed noise (+-0.05) that flips their order
    vals = {0.01: [1.00, 1.01, 0.99, 1.00], 0.02: [2.00, 2.10, 1.95, 2.02], 0.03: [2.05, 1.98, 2.08, 1.97]}
    fake = FakeTrain(lambda o, s: vals[o["matrix_lr"]][s])
    summary = run_campaign(sweep, str(tmp_path / "out"), [0, 1, 2, 3], [("cpu", None)], fake, log=lambda *a: None)
    overall = summary["overall"]
    assert [e["round"] for e in overall][0] == "good"
    assert overall[1]["tie_with_above"] is False  # good vs the next: separated
    assert overall[2]["tie_with_above"] is True   # a vs b: within noise
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "~ 3" in md and "tie" in md and "bits per byte" in md
    cell = overall[0]["metrics"]["val_bpb"]
    assert cell["n"] == 4 and cell["ci95"][0] < cell["mean"] < cell["ci95"][1]
    # one seed: no noise estimate; every difference unverified
    summary = run_campaign(sweep, str(tmp_path / "one"), [0], [("cpu", None)], FakeTrain(lambda o, s: vals[
        o["matrix_lr"]][s]), log=lambda *a: None)
    assert all(e["tie_with_above"] is None for e in summary["overall"])
    assert "no noise estimate" in (tmp_path / "one" / "summary.md").read_text()


def test_rank_tie_rules_directly():
    def entry(name, per_seed):
        vals = list(per_seed.values())
        return dict(round=name, variant="default", per_seed=per_seed, metrics={"val_bpb": _cell(vals)})
    # disjoint intervals, consistent paired differences: separated
    r = rank([entry("a", {0: 1.0, 1: 1.1, 2: 1.05}), entry("b", {0: 2.0, 1: 2.12, 2: 2.04})])
    assert r[1]["tie_with_above"] is False
    # overlapping intervals but a consistent paired shift: still a tie by the overlap rule
    r = rank([entry("a", {0: 1.0, 1: 2.0, 2: 3.0}), entry("b", {0: 1.1, 1: 2.15, 2: 3.12})])
    assert r[1]["tie_with_above"] is True and "overlap" in r[1]["tie_note"]


def test_parse_metrics_and_args(tmp_path):
    FakeTrain(lambda o, s: 1.5)(type("J", (), dict(results_dir=str(tmp_path), tag="t", overrides={}, seed=0,
                                                   round="r", variant="v"))(), None)
    m = parse_metrics(str(tmp_path / "t" / "metrics.jsonl"))
    assert m["val_bpb"] == 1.5 and m["train_loss"] == 5.0 and m["first_train_loss"] == 9.5
    assert m["tok_per_sec"] == 100.0  # the first 5 (warm-up) steps are left out
    assert m["projections"] == 3 and m["steps"] == 10
    assert abs(m["loss_reduction_pct"] - 100 * 4.5 / 9.5) < 1e-9
    assert parse_metrics(str(tmp_path / "missing.jsonl"))["val_bpb"] is None
    assert parse_slots("cuda:0,cuda:1", 1) == [("cuda", "0"), ("cuda", "1")]
    assert parse_slots("cuda:0,cuda:1,cuda:2,cuda:3", 2) == [("cuda", "0,1"), ("cuda", "2,3")]
    assert parse_slots("cpu", 1) == [("cpu", None)]
    for bad in (("cuda:0,cuda:0", 1), ("gpu0", 1), ("cuda:0,cuda:1,cuda:2", 2), ("cpu", 2)):
        with pytest.raises(UserError):
            parse_slots(*bad)


@pytest.mark.parametrize("body,needle", [
    ("[[rounds]]\nname = 'r1'\nvalues = { matrix_lrr = [0.1] }\n", "round 'r1'"),
    ("[base]\nnot_a_key = 1\n[[rounds]]\nname = 'r1'\nset = { depth = 2 }\n", "not_a_key"),
    ("[[rounds]]\nname = 'r1'\nset = { depth = 2 }\n[[rounds]]\nname = 'r2'\ncombine = ['r1', 'nope']\n", "'nope'"),
    ("[[rounds]]\nname = 'r2'\ncombine = 'r2'\n", "round 'r2'"),
    ("[[rounds]]\nname = 'r1'\nset = { seed = 3 }\n", "set by the sweep runner"),
    ("[[rounds]]\nname = 'r1'\nvalues = { depth = [2, 3], matrix_lr = [0.1] }\n", "equal lengths"),
    ("[[rounds]]\nname = 'r1'\nset = { depth = 'two' }\n", "'depth'"),
    ("[[rounds]]\nname = 'r1'\nset = { depth = -2 }\n", "--depth must be > 0"),
    ("[[rounds]\nname = 'r1'\n", "not valid TOML"),
    ("[base]\nconfig = 'no_such_config'\n[[rounds]]\nname = 'r1'\nset = { depth = 2 }\n", "no_such_config"),
    ("[[rounds]]\nname = 'r1'\n", "changes nothing"),
])
def test_bad_sweep_files(tmp_path, body, needle):
    path = write_sweep(tmp_path, body, name="bad")
    with pytest.raises(UserError) as e:
        load_sweep(path)
    assert needle in str(e.value) and "bad.toml" in str(e.value)
    if "matrix_lrr" in body:
        assert "'matrix_lrr'" in str(e.value)


def test_campaign_files_validate():
    """The shipped campaigns load (every key is a TrainConfig field); a key unknown to TrainConfig fails."""
    for name in ("ngpt_campaign", "ngpt_campaign_tiny"):
        sweep = load_sweep(str(REPO / "configs" / "sweeps" / f"{name}.toml"))
        assert sweep.base_overrides["arch"] == "ngpt" and len(sweep.rounds) >= 4
        assert {r.category for r in sweep.rounds} >= {"lr", "batch", "logit_scale", "lazy_proj"}
    full = load_sweep(str(REPO / "configs" / "sweeps" / "ngpt_campaign.toml"))
    # the seed's 18 one-factor runs are all there (plus the base value in each round), then combine + extended
    assert sum(len(r.variants) for r in full.rounds) >= 18 and full.rounds[-2].combine and full.rounds[-1].combine
    job = type("J", (), dict(tag="t", seed=1, results_dir="o", overrides={"ngpt_lr": 0.002}))()
    args = train_args(full, job, "cuda")
    assert args[:2] == ["--config", "baseline"] and "--scalar-alpha" in args and "--resume" in args
    assert args.count("--ngpt-lr") == 1 and args[args.index("--ngpt-lr") + 1] == "0.002"  # the round's value wins


def test_end_to_end_tiny_sweep(tiny_base_dir, tmp_path):
    """Real scripts.base_train subprocesses: 2 rounds x 2 seeds, 5 steps of a depth-2 model."""
    from scripts.sweep import main
    body = """
        name = "e2e"
        seeds = [0, 1]
        [base]
        arch = "ngpt"
        lazy_proj_freq = 2
        depth = 2
        aspect_ratio = 32
        head_dim = 32
        max_seq_len = 64
        device_batch_size = 4
        total_batch_size = 256
        data_source = "local"
        eval_tokens = 1024
        eval_every = -1
        save_every = -1
        dtype = "float32"
        compile = "false"
        num_iterations = 5
        [[rounds]]
        name = "lr"
        values = { ngpt_lr = [0.001, 0.003] }
        [[rounds]]
        name = "best"
        combine = "lr"
        set = { lazy_proj_freq = 3 }
    """
    path = write_sweep(tmp_path, body, name="e2e")
    out = tmp_path / "out"
    main([path, "--out", str(out), "--devices", "cpu", "--drop-checkpoints"])
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["ok"] and "reused_from" not in r for r in recs), [r.get("stderr_tail")
                                                                                       for r in recs]
    best = [r for r in recs if r["round"] == "best"]
    assert best[0]["overrides"]["lazy_proj_freq"] == 3 and "ngpt_lr" in best[0]["overrides"]
    for r in recs:
        assert r["steps"] == 5 and r["val_bpb"] > 0 and r["tok_per_sec"] > 0 and r["projections"] >= 1
        assert (out / "runs" / r["tag"] / "config.json").is_file()
        assert not (tiny_base_dir.base_dir / "checkpoints" / r["tag"]).exists()  # --drop-checkpoints
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_total"] == 6 and len(summary["overall"]) == 3
    assert "## Top" in (out / "summary.md").read_text()
    main([path, "--out", str(out), "--devices", "cpu"])  # all recorded: nothing trains again
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6


def test_speedrun_campaign_stage_is_optional(tmp_path):
    """RUN_NGPT_CAMPAIGN=1 adds the tiny campaign with 2 seeds (stand-in python: nothing trains); off by default."""
    from test_faults_speedrun import speedrun, speedrun_env  # pytest puts tests/ on sys.path (no package)
    off = speedrun(speedrun_env(tmp_path / "off"))
    assert off.returncode == 0, off.stderr[-2000:]
    assert "scripts.sweep" not in (tmp_path / "off" / "python_calls").read_text()
    on = speedrun(speedrun_env(tmp_path / "on", RUN_NGPT_CAMPAIGN="1"))
    assert on.returncode == 0, on.stderr[-2000:]
    calls = [c for c in (tmp_path / "on" / "python_calls").read_text().splitlines() if "scripts.sweep" in c]
    out = tmp_path / "on" / "results" / "sweeps" / "ngpt_campaign_tiny"
    assert calls == [f"-m scripts.sweep configs/sweeps/ngpt_campaign_tiny.toml --seeds 0,1 --drop-checkpoints "
                     f"--out {out}"]
    assert (tmp_path / "on" / "base" / "speedrun" / "ngpt_campaign.done").exists()


# ---- one sweep per --out, and a clean stop on SIGTERM (issue 21 items 2 and 6) ----------------------------------

ONE_ROUND = """
    name = "camp"
    [base]
    depth = 2
    [[rounds]]
    name = "lr"
    category = "lr"
    values = { matrix_lr = [0.01, 0.03] }
"""


def test_a_second_sweep_on_the_same_out_is_refused_and_records_nothing(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, ONE_ROUND))
    out = tmp_path / "out"
    started, go = threading.Event(), threading.Event()

    def slow(job, slot):  # the first sweep, with a run in flight
        started.set()
        assert go.wait(30)
        return first_train(job, slot)

    first_train = FakeTrain(lr_wd_value)
    first = threading.Thread(target=run_campaign, args=(sweep, str(out), [0], [("cpu", None)], slow),
                             kwargs=dict(log=lambda *a: None))
    first.start()
    try:
        assert started.wait(30)
        second = FakeTrain(lr_wd_value)
        with pytest.raises(UserError, match=rf"^sweep output {re.escape(str(out))} is in use by another run \(PID "
                                            rf"{os.getpid()}, lock {re.escape(str(out / '.lock'))}\): wait for that "
                                            r"sweep to finish or stop it, or "
                                            r"choose another --out$"):
            run_campaign(sweep, str(out), [0], [("cpu", None)], second, log=lambda *a: None)
        assert second.calls == [] and not (out / "runs.jsonl").exists()
    finally:
        go.set()
        first.join(30)
    recs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["variant"] for r in recs) == ["matrix_lr=0.01", "matrix_lr=0.03"]  # each run once

    # the same through the command line, the lock held by another process: one line, exit 2, nothing written
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from nanochat.locks import lock_file; "
                               "lock_file(sys.argv[1], 'x', 'y'); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "out2" / ".lock")], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cli = subprocess.run([sys.executable, "-m", "scripts.sweep", write_sweep(tmp_path, ONE_ROUND), "--out",
                              str(tmp_path / "out2"), "--devices", "cpu", "--seeds", "0,1"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert cli.returncode == 2
    assert cli.stderr.splitlines() == [f"error: sweep output {tmp_path / 'out2'} is in use by another run (PID "
                                       f"{holder.pid}, lock {tmp_path / 'out2' / '.lock'}): wait for that sweep to "
                                       f"finish or stop it, or choose another --out"]
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == [".lock"]


STOPPABLE = """
import subprocess, sys
import scripts.sweep as sw

def make(sweep, out, nproc=1):
    def train(job, slot):  # a run in flight: a child the sweep passes SIGTERM on to, as to base_train
        proc = subprocess.Popen(["sleep", "30"])
        sw.LIVE.add(proc)
        print("started", flush=True)
        try:
            return proc.wait(), ""
        finally:
            sw.LIVE.discard(proc)
    return train

sw.make_subprocess_trainer = make
sw.run_main(lambda: sw.main(sys.argv[1:]))
"""


def test_sigterm_stops_a_sweep_with_one_line_and_143(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", STOPPABLE, write_sweep(tmp_path, ONE_ROUND), "--out", str(out),
                             "--devices", "cpu", "--seeds", "0,1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.strip() == "started":
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.splitlines() == ["[sweep] stopped by SIGTERM: the runs in flight saved and stopped; run the same "
                                "command again to resume"]
    assert not (out / "runs.jsonl").exists()  # the stopped run is not recorded: a rerun resumes it


@pytest.mark.parametrize("name", ["runs.jsonl", "summary.json", "summary.md"])
def test_a_full_disk_stops_the_sweep_in_one_line_and_leaves_no_tmp(tmp_path, full_disk, name):
    """The sweep's own writers (the run records, the summaries) go through common.writes_results: a full disk is one
    UserError naming the file and the errno, and no .tmp is left; the records already written stay readable."""
    from nanochat.run_records import read_records
    sweep = load_sweep(write_sweep(tmp_path, ONE_ROUND))
    out = tmp_path / "out"
    # the first write of that file goes through (the summaries: of their .tmp), then the disk is full
    full_disk(out, after=1, name=name if name == "runs.jsonl" else name + ".tmp")
    with pytest.raises(UserError) as e:
        run_campaign(sweep, str(out), [0, 1], [("cpu", None)], FakeTrain(lr_wd_value), log=lambda *a: None)
    assert str(e.value) == f"cannot write {out / name}: [Errno 28] No space left on device"
    assert not list(out.rglob("*.tmp"))
    assert len(read_records(str(out / "runs.jsonl"))) == (1 if name == "runs.jsonl" else 4)


def test_an_unwritable_sweep_out_is_refused_before_any_run(tmp_path, full_disk):
    sweep = load_sweep(write_sweep(tmp_path, ONE_ROUND))
    out = tmp_path / "out"
    full_disk(out)
    train = FakeTrain(lr_wd_value)
    with pytest.raises(UserError) as e:
        run_campaign(sweep, str(out), [0, 1], [("cpu", None)], train, log=lambda *a: None)
    assert str(e.value) == (f"cannot write {out}: [Errno 28] No space left on device; the results go there: free "
                            f"space, fix its permissions or choose another --out (nothing was computed)")
    assert train.calls == [] and not out.exists()
