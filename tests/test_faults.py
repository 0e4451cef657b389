"""Fault injection: crashes at every point of a checkpoint save, divergence, two runs on one tag, tampered
checkpoints, partial metrics lines, a full disk, changed settings on resume. Each fault must leave no lost work,
no silent wrong number, and a clear message (issue 12). Data and tokenizer faults: test_faults_data.py; evaluation:
test_faults_eval.py; speedrun: test_faults_speedrun.py."""
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
