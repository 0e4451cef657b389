"""Fault injection: crashes at every point of a checkpoint save, divergence, two runs on one tag, tampered
checkpoints, partial metrics lines, a full disk, changed settings on resume. Each fault must leave no lost work,
no silent wrong number, and a clear message (issue 12). Data and tokenizer faults: test_faults_data.py; evaluation:
test_faults_eval.py; speedrun: test_faults_speedrun.py; names that are paths: test_faults_names.py; a fresh
log per run, silent drops and divergence: test_faults_logs.py."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import RunLock, check_resume_settings, read_metrics, truncate_metrics

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the tiny training run of test_train.py: a step in ~10 ms on 2 cores
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
        "4", "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--compile", "false"]


class Crash(BaseException):
    """A process dying mid-call: not an Exception, so no handler in the code under test can catch it."""


def small_model(seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    return model


def save(root: Path, step: int, model: GPT, keep: int = 2) -> str:
    opt = torch.optim.AdamW(model.parameters())
    return ckpt.save_checkpoint(str(root), step, model, [opt], dict(model_config={}, seed=0), keep=keep)


def weights_of(path: str) -> dict:
    return ckpt.load_checkpoint(path)[0]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# every call a save makes that touches the disk: a crash may strike before any of them
SAVE_CALLS = [(ckpt, "save_file"), (ckpt.torch, "save"), (ckpt.json, "dump"), (ckpt, "_fsync_dir"),
              (ckpt.os, "rename"), (ckpt.shutil, "rmtree"), (ckpt.os, "makedirs")]


def inject_crash(monkeypatch, at: int) -> list[str]:
    """Make the `at`-th disk call of the code under test raise Crash (at = 0: count only). Returns the call log."""
    log = []
    for owner, name in SAVE_CALLS:
        real = getattr(owner, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            log.append(_name)
            if len(log) == at:
                raise Crash(f"crash at call {at} ({_name})")
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
    return log


@pytest.mark.parametrize("same_step", [False, True], ids=["new-step", "re-save"])
def test_a_crash_at_every_point_of_a_save_leaves_an_intact_checkpoint(tmp_path, monkeypatch, same_step):
    """Save step 1, then crash the save of step 2 (or a re-save of step 1) at each of its disk calls in turn: the
    newest intact checkpoint is always the old or the new state, whole, and the next save works."""
    old, new = small_model(0), small_model(1)
    with monkeypatch.context() as m:
        calls = inject_crash(m, 0)
        save(tmp_path / "count", 1, old)
        calls.clear()
        save(tmp_path / "count", 1 if same_step else 2, new)
        n_calls = len(calls)
    assert n_calls >= 8, calls  # the writes, fsyncs, renames and cleanups of one save
    for at in range(1, n_calls + 1):
        root = tmp_path / f"crash{at}"
        save(root, 1, old)
        with monkeypatch.context() as m:
            inject_crash(m, at)
            try:
                save(root, 1 if same_step else 2, new)
            except Crash:
                pass
        ckpt.recover_interrupted_saves(str(root))
        assert all(ckpt.STEP_DIR.match(n) for n in os.listdir(root)), (at, os.listdir(root))  # no .tmp / .old
        path = ckpt.latest_intact_checkpoint(str(root))
        got = weights_of(path)
        assert same(got, ckpt.load_checkpoint(path)[0])
        assert same(got, {k: v for k, v in old.state_dict().items()}) or \
            same(got, {k: v for k, v in new.state_dict().items()}), at
        save(root, 3, new)  # the run goes on
        assert same(weights_of(ckpt.latest_intact_checkpoint(str(root))), new.state_dict())


def test_crash_mid_save_in_training_resumes_with_the_same_losses(tiny_base_dir, tmp_path, monkeypatch, capsys):
    """base_train dies while committing its step-4 checkpoint: --resume reports and removes the unfinished write,
    continues from step 2 and reproduces the uninterrupted run's losses."""
    from scripts.base_train import main
    common = TINY + ["--num-iterations", "6", "--save-every", "2", "--keep-checkpoints", "3",
                     "--results-dir", str(tmp_path / "results")]
    main(common + ["--model-tag", "faults_straight"])
    straight = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "results/faults_straight/metrics.jsonl"))
                if "loss" in r}
    real_rename = os.rename

    def crash_on_step4(src, dst):
        if str(src).endswith("step_000004.tmp"):
            raise Crash("killed while committing step 4")
        return real_rename(src, dst)
    with monkeypatch.context() as m:
        m.setattr(ckpt.os, "rename", crash_on_step4)
        with pytest.raises(Crash):
            main(common + ["--model-tag", "faults_crash"])
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_crash"
    assert sorted(os.listdir(root)) == [".lock", "step_000002", "step_000004.tmp"]
    capsys.readouterr()
    main(common + ["--model-tag", "faults_crash", "--resume"])
    assert "removed" in capsys.readouterr().err
    resumed = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "results/faults_crash/metrics.jsonl"))
               if "loss" in r}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step


def test_non_finite_settings_are_refused_at_parse_time(capsys):
    from scripts.base_train import main
    for flag, value in (("--matrix-lr", "inf"), ("--embedding-lr", "nan"), ("--warmup-ratio", "-inf")):
        with pytest.raises(SystemExit) as e:
            main(TINY + [f"{flag}={value}"])  # "=": argparse reads a bare -inf as a flag
        assert e.value.code == 2
        assert f"argument {flag}: must be a finite number (got '{value}')" in capsys.readouterr().err


def test_a_typo_gets_the_error_first_and_a_suggestion(capsys):
    from scripts.base_train import main
    with pytest.raises(SystemExit):
        main(["--matirx-lr", "0.1"])
    err = capsys.readouterr().err
    assert err.splitlines()[0].endswith("error: unrecognized arguments: --matirx-lr 0.1")
    assert "--matirx-lr: did you mean --matrix-lr?" in err and len(err.splitlines()) <= 4


def test_a_nan_loss_stops_the_run_and_saves_nothing_non_finite(tiny_base_dir, tmp_path, monkeypatch):
    from scripts.base_train import main
    real_forward = GPT.forward
    calls = {"n": 0}

    def nan_after_two_steps(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > 2:  # steps 1-2 are fine (grad accumulation 1), then the loss is NaN
                return out * float("nan")
        return out
    monkeypatch.setattr(GPT, "forward", nan_after_two_steps)
    with pytest.raises(UserError, match="training diverged at step 2: .*no update was applied and nothing was saved"):
        main(TINY + ["--num-iterations", "6", "--save-every", "2", "--model-tag", "faults_nan",
                     "--results-dir", str(tmp_path / "results")])
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_nan"
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(root))] == ["step_000002"]
    assert not ckpt.non_finite_tensors(weights_of(str(root / "step_000002")))


def test_non_finite_weights_are_never_written(tmp_path):
    model = small_model(0)
    save(tmp_path, 1, model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"not saving step 2: 1 tensor\(s\) hold NaN or inf \(lm_head.weight\).*"
                                        r"last good checkpoint is .*step_000001"):
        save(tmp_path, 2, model)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["step_000001"]


HOLDER = "import sys, time; from nanochat.training import RunLock; RunLock(sys.argv[1:], 'x'); " \
         "print('locked', flush=True); time.sleep(120)"


def hold_lock(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_locked_tag_is_refused_and_kill_9_frees_it(tiny_base_dir, tmp_path):
    from scripts.base_train import main
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_locked"
    proc = hold_lock(root)
    try:
        with pytest.raises(UserError, match=rf"model tag 'faults_locked' is in use by another run \(PID {proc.pid}"):
            main(TINY + ["--num-iterations", "1", "--model-tag", "faults_locked",
                         "--results-dir", str(tmp_path / "results")])
        assert not (tmp_path / "results" / "faults_locked" / "metrics.jsonl").exists()  # nothing was written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    main(TINY + ["--num-iterations", "1", "--model-tag", "faults_locked", "--results-dir", str(tmp_path / "results")])
    assert ckpt.latest_checkpoint(str(root)).endswith("step_000001")


def test_lock_is_exclusive_across_processes_only(tmp_path):
    proc = hold_lock(tmp_path / "a")
    try:
        with pytest.raises(UserError, match=rf"PID {proc.pid}"):
            RunLock([str(tmp_path / "b"), str(tmp_path / "a")], "run x")
        RunLock([str(tmp_path / "b")], "run y").release()  # the refused attempt left b free
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:  # the kernel frees the lock once the process is gone
        try:
            RunLock([str(tmp_path / "a")], "run x").release()
            break
        except UserError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_tampered_meta_json_is_refused_and_resume_falls_back(tmp_path, capsys):
    save(tmp_path, 1, small_model(0), keep=3)
    newest = save(tmp_path, 2, small_model(1), keep=3)
    meta_path = os.path.join(newest, "meta.json")
    meta = json.load(open(meta_path))
    meta["seed"] = 7  # an edit by hand
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=r"step_000002 is corrupted: meta.json does not match its recorded sha256"):
        ckpt.load_checkpoint(newest)
    assert ckpt.latest_intact_checkpoint(str(tmp_path)).endswith("step_000001")
    assert "falling back to" in capsys.readouterr().err
    # the step edited *with* a recomputed checksum: the folder name disagrees
    meta["seed"], meta["step"] = 0, 1
    meta["meta_sha256"] = ckpt.meta_digest(meta)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match="meta.json says step 1, the folder says 2"):
        ckpt.read_meta(newest)
    shutil.rmtree(os.path.join(tmp_path, "step_000001"))
    with pytest.raises(UserError, match="no intact checkpoint in .*Nothing was overwritten"):
        ckpt.latest_intact_checkpoint(str(tmp_path))


def test_a_partial_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "lo')
    truncate_metrics(str(path), 3)
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]
    assert f"{path}:3: dropping a partial last line" in capsys.readouterr().err
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": \n{"step": 2, "loss": 2.5}\n')
    with pytest.raises(UserError, match=rf"{path}:2: not a metrics record"):
        truncate_metrics(str(path), 3)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64")])
def test_a_full_disk_is_named_and_the_previous_checkpoint_loads(tmp_path, monkeypatch, error):
    model = small_model(0)
    first = save(tmp_path, 1, model)

    def disk_full(*args, **kwargs):
        raise error
    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step_000002.tmp: the disk is full\. The "
                                        r"previous checkpoint .*step_000001 is intact"):
        save(tmp_path, 2, small_model(1))
    assert os.listdir(tmp_path) == ["step_000001"]
    assert same(weights_of(first), model.state_dict())


def test_resume_refuses_changed_settings_and_records_allowed_ones(tiny_base_dir, tmp_path):
    from scripts.base_train import main
    common = TINY + ["--num-iterations", "4", "--save-every", "2", "--model-tag", "faults_resume",
                     "--results-dir", str(tmp_path / "results")]
    main(common)
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_resume"
    shutil.rmtree(root / "step_000004")
    with pytest.raises(UserError, match=r"different settings \(--matrix-lr: checkpoint 0\.02, now 0\.05\)"):
        main(common + ["--resume", "--matrix-lr", "0.05"])
    with pytest.raises(UserError, match=r"--seed: checkpoint 42, now 7"):
        main(common + ["--resume", "--seed", "7"])
    main(common + ["--resume", "--log-every", "2"])  # a logging setting may change; it is recorded
    records = read_metrics(str(tmp_path / "results" / "faults_resume" / "metrics.jsonl"))
    assert {"step": 2, "config_change": {"resume": [False, True], "log_every": [1, 2]}} in records
    assert check_resume_settings({"a": 1}, {"a": 1, "b": 2}, "p", set()) == {}  # a key the checkpoint predates


def test_torchrun_sigterm_ends_like_a_single_process(tiny_base_dir, tmp_path):
    """SIGTERM to the launcher (scripts.launch = torchrun with short endings): every rank saves at a step
    boundary, the launcher exits 143 with one line, no traceback; a failing rank gives one line per rank and its
    exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    launch = [sys.executable, "-m", "scripts.launch", "--standalone", "--nproc_per_node=2", "-m",
              "scripts.base_train", "--"]
    args = TINY + ["--num-iterations", "100000", "--total-batch-size", "512", "--save-every", "-1",
                   "--model-tag", "faults_ddp_term", "--results-dir", str(results)]
    proc = subprocess.Popen(launch + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = results / "faults_ddp_term" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a few steps done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "[launch] stopped by SIGTERM: the workers saved at a step boundary" in err
    assert "Traceback" not in err and "SignalException" not in err
    saved = ckpt.latest_intact_checkpoint(str(tiny_base_dir.base_dir / "checkpoints" / "faults_ddp_term"))
    assert saved is not None and ckpt.read_meta(saved)["step"] >= 3
    bad = subprocess.run(launch + TINY + ["--total-batch-size", "100"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2
    assert "error: --total-batch-size 100 is not divisible" in bad.stderr
    # both ranks refuse the flag; whichever exits first is the one the launcher reports with status 2
    assert re.search(r"\[launch\] rank [01] exited with status 2", bad.stderr) and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------------------------
# write errors in the results folder (issue 21 item 5): one line naming the path and the errno, a checkpoint saved,
# the unwritten values on stdout, no .tmp and no .lock left; an unwritable results folder refused before compute

def run_cli(main, args, capsys) -> tuple[int, str, str]:
    """A script's main() as its command line runs it (run_main): (exit status, stdout, stderr)."""
    from nanochat.common import run_main
    capsys.readouterr()
    try:
        run_main(lambda: main(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_full_results_disk_mid_training_saves_a_checkpoint_and_says_one_line(tiny_base_dir, tmp_path, full_disk,
                                                                                capsys):
    from scripts.base_train import main
    results = tmp_path / "results"
    metrics = results / "faults_full" / "metrics.jsonl"
    args = TINY + ["--num-iterations", "8", "--save-every", "-1", "--model-tag", "faults_full",
                   "--results-dir", str(results)]
    disk = full_disk(results, after=3, name="metrics.jsonl")  # steps 1-3 are logged, then the disk is full
    code, out, err = run_cli(main, args, capsys)
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_full"
    assert disk.full and code == 2, err[-3000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: cannot write {metrics}: [Errno 28] No space left on device; saved checkpoint {root}/step_000004 at "
        f"step 4: free space and continue with --resume (the unwritten records are on stdout)"]
    assert ckpt.latest_intact_checkpoint(str(root)) == str(root / "step_000004")  # the checkpoint disk had room
    assert [r["step"] for r in read_metrics(str(metrics))] == [1, 2, 3]
    unwritten = [json.loads(line.split(": ", 1)[1]) for line in out.splitlines()
                 if line.startswith(f"not written to {metrics}: ")]
    assert [r["step"] for r in unwritten] == [4] and unwritten[0]["loss"] > 0  # the step's values, on stdout
    assert not list(results.rglob("*.tmp")) and not list(results.rglob(".write_probe*"))
    # space again: --resume continues from the saved step to the end
    capsys.readouterr()
    disk.full, disk.name = False, "never"
    main(args + ["--resume"])
    assert ckpt.latest_intact_checkpoint(str(root)) == str(root / "step_000008")
    assert [r["step"] for r in read_metrics(str(metrics)) if "loss" in r] == [1, 2, 3, 5, 6, 7, 8]


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_a_full_results_disk_mid_rl_saves_the_policy_and_says_one_line(tiny_base_dir, tiny_mhc_checkpoint, tmp_path,
                                                                       full_disk, capsys, algo):
    """train_rl goes the way of base_train (Run.log): a metrics record that cannot be written stops the learner at
    the next boundary, the policy is saved, one line names the path and the errno; --resume then finishes."""
    from scripts.train_rl import main
    from test_rl import rl_args
    tag = f"faults_rl_{algo}"
    rloo = ["--algo", "rloo", "--rloo-samples", "4", "--rloo-problems-per-step", "4"] if algo == "rloo" else []
    args = rl_args(tiny_mhc_checkpoint, tmp_path, tag, 64, "--baselines", "none", "--save-every", "1000",
                   "--eval-every", "1000", *rloo)
    metrics = tmp_path / "rl" / tag / "metrics.jsonl"
    disk = full_disk(tmp_path / "rl", after=2, name="metrics.jsonl")  # step 0's val reward and step 16 are logged
    code, out, err = run_cli(main, args, capsys)
    root = tiny_base_dir.base_dir / "checkpoints" / "rl" / tag
    assert disk.full and code == 2, err[-3000:]
    assert "Traceback" not in err
    saved = ckpt.latest_checkpoint(str(root))  # PPO: the boundary before the rollout in flight; RLOO: its update
    step = ckpt.read_meta(saved)["num_timesteps"]
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: cannot write {metrics}: [Errno 28] No space left on device; saved checkpoint {saved} at step "
        f"{step}: free space and continue with --resume (the unwritten records are on stdout)"]
    assert 16 <= step < 64
    written = read_metrics(str(metrics))
    unwritten = [json.loads(line.split(": ", 1)[1]) for line in out.splitlines()
                 if line.startswith(f"not written to {metrics}: ")]
    assert len(written) == 2 and unwritten and unwritten[0]["step"] > written[-1]["step"], (written, unwritten)
    assert unwritten[0]["step"] == step  # the policy saved is the one of the first unwritten record
    assert not list(tmp_path.rglob("*.tmp")) and not list(root.rglob("*.tmp"))
    # space again: --resume continues from the saved policy to the end
    capsys.readouterr()
    disk.full, disk.name = False, "never"
    main(args + ["--resume"])
    assert ckpt.read_meta(ckpt.latest_checkpoint(str(root)))["num_timesteps"] == 64
    assert [r["step"] for r in read_metrics(str(metrics)) if "mean_reward" in r][-1] == 64


@pytest.mark.parametrize("fault", ["ENOSPC", "EROFS", "not-a-directory"])
def test_an_unwritable_results_dir_is_refused_before_any_compute(tiny_base_dir, tmp_path, full_disk, monkeypatch,
                                                                 fault):
    from scripts.base_train import main
    results = tmp_path / "results"
    if fault == "not-a-directory":
        results.write_text("a file where the results folder should be\n")
        why = "[Errno 20] Not a directory"
    else:
        full_disk(results, err=getattr(errno, fault))
        why = "[Errno 28] No space left on device" if fault == "ENOSPC" else "[Errno 30] Read-only file system"

    def no_compute(*args, **kwargs):
        raise AssertionError("a model was built for a run that cannot write its results")
    monkeypatch.setattr(GPT, "init_weights", no_compute)
    with pytest.raises(UserError) as e:
        main(TINY + ["--num-iterations", "2", "--model-tag", "faults_unwritable", "--results-dir", str(results)])
    assert str(e.value) == (f"cannot write {results}/faults_unwritable: {why}; the results go there: free space, fix "
                            f"its permissions or choose another --results-dir (nothing was computed)")
    assert not (tiny_base_dir.base_dir / "checkpoints" / "faults_unwritable").exists()  # no folder, no stale .lock
    if fault != "not-a-directory":
        assert not results.exists()  # the folders the probe made are gone again


def test_every_results_writer_names_the_path_and_leaves_no_tmp(tmp_path, full_disk):
    from nanochat.common import append_jsonl, atomic_write_text
    from nanochat.training import atomic_json
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n')
    full_disk(tmp_path)
    for write, name in ((lambda p: atomic_json(p, {"a": 1}), "config.json"),
                        (lambda p: atomic_write_text(p, "x\n"), "eval.json"),
                        (lambda p: append_jsonl(p, {"step": 3}), "metrics.jsonl"),
                        (lambda p: truncate_metrics(p, 2), "metrics.jsonl")):
        with pytest.raises(UserError) as e:
            write(str(tmp_path / name))
        assert str(e.value) == f"cannot write {tmp_path / name}: [Errno 28] No space left on device"
        assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"], name  # no .tmp, nothing half-written
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# peers that die or freeze (issue 21 item 4): --dist-timeout bounds the wait for a frozen rank, and a frozen or
# killed peer ends the run in one line with its cause, no traceback

def worker_pid(launcher: int, rank: int, timeout: float = 60) -> int:
    """The PID of the torchrun worker of `rank` below the launcher process."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                parents, p = set(), pid
                while p not in ("0", "1"):
                    p = re.search(r"PPid:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1)
                    parents.add(int(p))
            except (OSError, AttributeError):
                continue
            if launcher in parents and f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
                return int(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def start_two_ranks(tmp_path: Path, tag: str, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "scripts.launch", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train",
           "--"] + TINY + ["--num-iterations", "100000", "--total-batch-size", "512", "--save-every", "5",
                           "--model-tag", tag, "--results-dir", str(results)] + extra
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = results / tag / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a few steps done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, metrics


@pytest.mark.slow  # ~40 s for the frozen case: torchrun waits 30 s before it kills the frozen worker
@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_a_frozen_or_killed_rank_ends_the_run_in_one_line(tiny_base_dir, tmp_path, fault):
    proc, _ = start_two_ranks(tmp_path, f"faults_peer_{fault}", ["--dist-timeout", "4"])
    victim = worker_pid(proc.pid, 1)
    try:
        t0 = time.time()
        os.kill(victim, signal.SIGSTOP if fault == "frozen" else signal.SIGKILL)
        out, err = proc.communicate(timeout=150)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if fault == "frozen":
        # 4 s of --dist-timeout, up to 4 s asking the store who is silent, torchrun's 30 s grace for the frozen one
        assert elapsed < 4 + 4 + 30 + 20, elapsed
        assert len(errors) == 1 and errors[0].startswith(
            "error: rank 0: rank 1 stopped answering (frozen, or its node is down) for --dist-timeout 4 s; stopping. "
            "Continue from the last checkpoint with --resume (cause: Timed out waiting"), errors
    else:
        assert len(errors) == 1 and errors[0].startswith(
            "error: rank 0: lost the connection to a peer rank (killed, or its node went down); stopping. Continue "
            "from the last checkpoint with --resume (cause: "), errors
    assert "[launch] rank 0 exited with status 1 (its message is above)" in err


def test_asking_who_is_silent_gives_up_when_the_store_host_is_frozen(monkeypatch):
    """peer_failure asks the rendezvous store which rank is silent; when the store's host is the frozen node, a
    store query waits for an answer forever (TCPStore has no read timeout there): silent_ranks must return anyway,
    after its wait, saying it cannot tell ([])."""
    import threading

    from nanochat import common
    frozen = threading.Event()

    class FrozenStore:  # the TCP connection is open, its host never answers
        def set(self, key, value):
            pass

        def check(self, keys):
            frozen.wait()
            return False
    monkeypatch.setattr(common.dist.distributed_c10d, "_get_default_store", lambda: FrozenStore())
    monkeypatch.setattr(common.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    answer = []
    asking = threading.Thread(target=lambda: answer.append(common.silent_ranks(0.5)), daemon=True)
    t0 = time.time()
    asking.start()
    asking.join(10)
    frozen.set()  # frees the store query of the old code, if it hung
    assert not asking.is_alive() and answer == [[]] and time.time() - t0 < 3


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path: Path, tag: str, extra: list[str], port: int, base_dirs: tuple[Path, Path],
              iterations: int = 100000, store_on_node0: bool = False) -> list[subprocess.Popen]:
    """Two local "nodes": two launchers with the wrappers' multi-node rendezvous (c10d, --nnodes 2, one process
    each), each in its own process group so that a node can be killed whole. store_on_node0: node 0's launcher
    hosts the rendezvous store (else whichever binds the port first)."""
    procs = []
    for node, base in enumerate(base_dirs):
        host = [f"--rdzv-conf=is_host={int(node == 0)}"] if store_on_node0 else []
        cmd = [sys.executable, "-m", "scripts.launch", "--nnodes=2", f"--node-rank={node}", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={tag}", *host, "-m",
               "scripts.base_train", "--"] + TINY + [
            "--num-iterations", str(iterations), "--total-batch-size", "512", "--save-every", "3", "--model-tag", tag,
            "--results-dir", str(tmp_path / "results"), "--dist-timeout", "4"] + extra
        env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_BASE_DIR": str(base)}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str]]:
    outs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
            outs.append((proc.returncode, err))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            outs.append((None, proc.communicate()[1]))  # None: still running after the timeout
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    return outs


@pytest.mark.slow
def test_two_nodes_must_share_the_base_dir_and_then_run_to_the_end(tiny_base_dir, tmp_path):
    """Two local nodes with the wrappers' c10d rendezvous (which ignores NODE_RANK: either may get rank 0, the only
    writer): a node that does not see rank 0's base dir is refused in one line before any work; with one shared
    base dir the run goes to the end and --resume continues it."""
    base = tiny_base_dir.base_dir
    other = tmp_path / "other_base"  # what a node without the shared filesystem would see
    outs = finish(two_nodes(tmp_path, "faults_nodes_split", [], free_port(), (base, other), iterations=2))
    assert all(code not in (0, None) for code, _ in outs), outs  # refused on both nodes, which end promptly
    assert all("Traceback" not in err for _, err in outs), outs
    errors = [line for _, err in outs for line in err.splitlines() if line.startswith("error:")]
    assert errors and all(re.fullmatch(
        rf"error: multi-node run: the node of rank 1 \(.*\) does not see rank 0's NANOCHAT_BASE_DIR ({base}|{other}): every node "
        rf"must share the base dir and the results dir \(one filesystem\), since rank 0, the only writer, can be on any "
        rf"node \(c10d rendezvous ignores NODE_RANK\)", line) for line in errors), errors  # rank 0: either node
    assert not (base / "checkpoints" / "faults_nodes_split").exists()
    assert not list(base.glob(".nanochat_shared_*")) and not list(other.glob(".nanochat_shared_*"))  # none left

    tag = "faults_nodes"
    outs = finish(two_nodes(tmp_path, tag, [], free_port(), (base, base), iterations=3))
    assert [code for code, _ in outs] == [0, 0], outs
    outs = finish(two_nodes(tmp_path, tag, ["--resume", "--extend-to", "5"], free_port(), (base, base),
                            iterations=3))
    assert [code for code, _ in outs] == [0, 0], outs
    root = base / "checkpoints" / tag
    assert ckpt.read_meta(ckpt.latest_intact_checkpoint(str(root)))["step"] == 5
    assert [r["step"] for r in read_metrics(str(tmp_path / "results" / tag / "metrics.jsonl")) if "loss" in r] == \
        [1, 2, 3, 4, 5]
    assert not list((tmp_path / "results").glob(".nanochat_shared_*")) and not list(base.glob(".nanochat_shared_*"))


def process_tree(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own: a signal to the
    launcher's process group misses them)."""
    children = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(re.search(r"PPid:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1))
        except (OSError, AttributeError):
            continue
        children.setdefault(ppid, []).append(int(p))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


@pytest.mark.slow  # ~20 s
def test_a_frozen_node_ends_the_run_on_the_other_node_within_the_timeout(tiny_base_dir, tmp_path):
    """Node 1 frozen whole (SIGSTOP: its launcher and its worker): the rank on node 0 gives up after --dist-timeout
    4 s, says so in one line naming the silent rank, and node 0's launcher exits 1 -- within the timeout, the time
    asking the store who is silent, and the launcher's slack. Node 0 hosts the rendezvous store here; the frozen
    store host is the next test."""
    tag = "faults_nodes_frozen"
    base = tiny_base_dir.base_dir
    procs = two_nodes(tmp_path, tag, [], free_port(), (base, base), store_on_node0=True)
    metrics = tmp_path / "results" / tag / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # a few steps done
            assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.poll() for p in procs]
            time.sleep(0.2)
        nodes = [process_tree(p.pid) for p in procs]
        for pid in nodes[1]:  # the whole node: its launcher and its worker
            os.kill(pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            for pid in process_tree(p.pid):  # workers run in sessions of their own: killed one by one
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert elapsed < 4 + 5 + 20, elapsed  # --dist-timeout, asking the store (<= 5 s), the launcher's slack
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.match(
        r"error: rank [01]: rank [01] stopped answering \(frozen, or its node is down\) for --dist-timeout 4 s; "
        r"stopping\. Continue from the last checkpoint with --resume \(cause: ", errors[0]), errors
    assert re.search(r"\[launch\] rank [01] exited with status 1 \(its message is above\)", err)


def stop_node(proc: subprocess.Popen, sig: int):
    for pid in process_tree(proc.pid):  # the whole node: its launcher and its worker
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_all(procs: list[subprocess.Popen]):
    for p in procs:
        stop_node(p, signal.SIGKILL)  # workers run in sessions of their own: killed one by one
        p.communicate()


def wait_for_steps(procs, metrics: Path, n: int, timeout: float = 120):
    deadline = time.time() + timeout
    while not (metrics.exists() and len([l for l in metrics.read_text().splitlines() if '"loss"' in l]) >= n):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, [p.poll() for p in procs]
        time.sleep(0.2)


@pytest.mark.slow  # ~30 s
def test_a_frozen_store_host_ends_the_other_node_within_the_timeout(tiny_base_dir, tmp_path, monkeypatch):
    """Node 0 hosts the rendezvous store and is frozen whole: node 1's rank gives up after --dist-timeout in one
    line, and its launcher -- whose torch elastic agent would wait for the store forever -- is ended by the
    launcher's watchdog once the store has been silent for NANOCHAT_STORE_GRACE_S (5 s here), in one line, exit 1."""
    monkeypatch.setenv("NANOCHAT_STORE_GRACE_S", "5")
    tag = "faults_nodes_store_frozen"
    base = tiny_base_dir.base_dir
    procs = two_nodes(tmp_path, tag, [], free_port(), (base, base), store_on_node0=True)
    try:
        wait_for_steps(procs, tmp_path / "results" / tag / "metrics.jsonl", 3)
        stop_node(procs[0], signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[1].communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        kill_all(procs)
    assert procs[1].returncode == 1, err[-3000:]
    # --dist-timeout, asking the store who is silent (<= 5 s), the grace with its probes (5 + 5), slack
    assert elapsed < 4 + 5 + 10 + 15, elapsed
    assert "Traceback" not in err, err[-3000:]
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err[-3000:]
    assert re.search(r"\[launch\] this node's workers have ended \(their messages are above\) and the rendezvous store "
                     r"at 127\.0\.0\.1:\d+ has not answered for 5 s", err), err[-3000:]


@pytest.mark.slow  # ~40 s
def test_a_killed_node_ends_the_other_in_one_line_and_both_resume(tiny_base_dir, tmp_path):
    """Node 1 killed whole (kill -9, as a lost machine) mid-run: node 0 ends promptly with one line, no traceback;
    relaunching both nodes with --resume continues from the last checkpoint to the end, every step logged once."""
    tag = "faults_nodes_killed"
    base = tiny_base_dir.base_dir
    metrics = tmp_path / "results" / tag / "metrics.jsonl"
    total = 24
    procs = two_nodes(tmp_path, tag, [], free_port(), (base, base), iterations=total, store_on_node0=True)
    try:
        wait_for_steps(procs, metrics, 7)  # a checkpoint at step 6 (--save-every 3)
        stop_node(procs[1], signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.time() - t0
    finally:
        kill_all(procs)
    assert procs[0].returncode not in (0, None) and elapsed < 4 + 5 + 20, (procs[0].returncode, elapsed)
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank" in errors[0] and "--resume" in errors[0], errors
    root = base / "checkpoints" / tag
    saved = ckpt.read_meta(ckpt.latest_intact_checkpoint(str(root)))["step"]
    assert 6 <= saved < total and saved % 3 == 0, saved
    outs = finish(two_nodes(tmp_path, tag, ["--resume"], free_port(), (base, base), iterations=total))
    assert [code for code, _ in outs] == [0, 0], outs
    assert ckpt.read_meta(ckpt.latest_intact_checkpoint(str(root)))["step"] == total
    steps = [r["step"] for r in read_metrics(str(metrics)) if "loss" in r]
    # every step once: the log was cut back to the checkpoint, and the resumed run went on from there to the end
    assert steps == list(range(1, total + 1)), steps
