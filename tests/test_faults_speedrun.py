"""Fault injection for speedrun.sh and the torchrun wrappers (issue 12 items 10, 11): stage markers that do not lie
(a stage is skipped only while its settings are unchanged and its outputs exist), --help and unknown arguments, and
wrappers that check what training needs before torchrun and agree with speedrun on NANOCHAT_BASE_DIR. Pure bash
with dummy commands: nothing here trains a model, so each test takes about a second."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# every stage of the tiny preset, in order (tests/test_speedrun.py checks the same list against a real run)
TINY_STAGES = ("data", "tokenizer", "pretokenize", "memory_baseline", "train_baseline", "eval_baseline", "memory_mhc",
               "train_mhc", "eval_mhc", "lm_eval_mhc", "stats_mhc", "hres_mhc", "sft_baseline", "eval_baseline_sft",
               "sft_mhc", "eval_mhc_sft", "gate_sweep", "oracle_synthetic_dense_global", "oracle_gsm8k_dense_global",
               "rl_synthetic_global-rloo", "rl_gsm8k_global", "export_baseline", "export_mhc", "eval_hf_mhc",
               "bench_inference", "report")


def stage(tmp: Path, *stage_args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """One `stage demo ...` call of scripts/stage.sh, as speedrun.sh makes it (set -euo pipefail)."""
    script = ('set -euo pipefail; source scripts/stage.sh; stage_markers="$1"; stage_times="$2"; shift 2; '
              'stage demo "$@"')
    return subprocess.run(["bash", "-c", script, "bash", str(tmp / "markers"), str(tmp / "times.jsonl"),
                           *stage_args], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def touch_stage(tmp: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A stage whose output is tmp/x and whose command also logs each run to tmp/runs."""
    out, log = tmp / "x", tmp / "runs"
    return stage(tmp, "--out", str(out), "--dep", str(tmp / "dep.txt"), "--",
                 "sh", "-c", 'touch "$1"; echo run >> "$2"', "sh", str(out), str(log), *extra, env=env)


def runs(tmp: Path) -> int:
    return len((tmp / "runs").read_text().splitlines()) if (tmp / "runs").exists() else 0


def test_stage_skips_only_while_settings_and_outputs_hold(tmp_path):
    (tmp_path / "dep.txt").write_text("a")
    first = touch_stage(tmp_path)
    assert first.returncode == 0, first.stderr
    assert runs(tmp_path) == 1 and (tmp_path / "markers" / "demo.done").exists()
    assert json.loads((tmp_path / "times.jsonl").read_text())["stage"] == "demo"

    again = touch_stage(tmp_path)
    assert "[speedrun] demo: already done" in again.stdout and runs(tmp_path) == 1

    (tmp_path / "x").unlink()  # an output deleted behind the marker's back
    missing = touch_stage(tmp_path)
    assert f"[speedrun] demo: rerunning: {tmp_path / 'x'} is missing" in missing.stdout
    assert runs(tmp_path) == 2 and (tmp_path / "x").exists()

    changed = touch_stage(tmp_path, "--num-iterations", "20")  # another command line
    assert "[speedrun] demo: rerunning: settings changed" in changed.stdout and runs(tmp_path) == 3
    assert "already done" in touch_stage(tmp_path, "--num-iterations", "20").stdout and runs(tmp_path) == 3

    (tmp_path / "dep.txt").write_text("b")  # a file the stage depends on (--dep) changed
    dep = touch_stage(tmp_path, "--num-iterations", "20")
    assert "rerunning: settings changed" in dep.stdout and runs(tmp_path) == 4

    forced = touch_stage(tmp_path, "--num-iterations", "20", env={"FORCE": "1"})
    assert "rerunning: FORCE=1" in forced.stdout and runs(tmp_path) == 5
    skipped = touch_stage(tmp_path, "--other", env={"SKIP": "data,demo"})
    assert "demo: skipped (SKIP)" in skipped.stdout and runs(tmp_path) == 5

    # the marker says what was hashed, for a human comparing runs
    marker = (tmp_path / "markers" / "demo.done").read_text().splitlines()
    assert len(marker[0]) == 64 and "--num-iterations 20" in marker[1]
    assert marker[2] == f"dep {tmp_path / 'dep.txt'} {hashlib.sha256(b'b').hexdigest()}"


def test_stage_hashes_the_config_files_it_names(tmp_path):
    """--config NAME (configs/NAME.toml) and --config=PATH: their content is a setting of the stage."""
    settings = subprocess.run(["bash", "-c", "source scripts/stage.sh; stage_settings -- python -m x --config "
                               f"tiny_cpu --config={tmp_path / 'c.toml'}"],
                              cwd=REPO, capture_output=True, text=True, timeout=30).stdout.splitlines()
    want = hashlib.sha256((REPO / "configs" / "tiny_cpu.toml").read_bytes()).hexdigest()
    assert settings[1] == f"dep {REPO / 'configs' / 'tiny_cpu.toml'} {want}"
    assert settings[2] == f"dep {tmp_path / 'c.toml'} missing"

    config = tmp_path / "c.toml"
    config.write_text("depth = 2\n")
    cmd = ["--out", str(tmp_path / "x"), "--", "sh", "-c", 'touch "$1"', "sh", str(tmp_path / "x"),
           "--config", str(config)]
    assert stage(tmp_path, *cmd).returncode == 0
    assert "already done" in stage(tmp_path, *cmd).stdout
    config.write_text("depth = 4\n")  # same command line, another config
    assert "rerunning: settings changed" in stage(tmp_path, *cmd).stdout


def test_a_failed_stage_leaves_no_marker(tmp_path):
    (tmp_path / "dep.txt").write_text("a")
    assert touch_stage(tmp_path).returncode == 0
    failed = stage(tmp_path, "--out", str(tmp_path / "x"), "--", "sh", "-c", "exit 3")  # new settings, then a crash
    assert failed.returncode == 3 and "settings changed" in failed.stdout
    assert not (tmp_path / "markers" / "demo.done").exists()  # not the old marker either: it would lie next time


def test_an_old_empty_marker_is_not_trusted(tmp_path):
    """Markers from before settings were recorded (empty files) count as changed settings."""
    (tmp_path / "dep.txt").write_text("a")
    (tmp_path / "markers").mkdir()
    (tmp_path / "markers" / "demo.done").touch()
    (tmp_path / "x").touch()
    out = touch_stage(tmp_path)
    assert "rerunning: settings changed" in out.stdout and runs(tmp_path) == 1


def test_stage_refuses_a_malformed_call(tmp_path):
    out = stage(tmp_path, "--outs", "x", "--", "true")
    assert out.returncode == 2 and "unknown option --outs" in out.stderr
    out = stage(tmp_path, "--out", "x", "true")  # the command without its --
    assert out.returncode == 2 and "unknown option true" in out.stderr
    out = stage(tmp_path, "--out", "x")
    assert out.returncode == 2 and "no -- COMMAND" in out.stderr
    out = stage(tmp_path, "--out")
    assert out.returncode == 2 and "--out needs a value" in out.stderr


def speedrun_env(tmp: Path, **extra: str) -> dict:
    """The tiny preset with a stand-in venv whose `python` only logs its arguments: every stage "runs" in
    milliseconds and writes nothing, so the markers' output checks have something to catch. The speedrun's lock
    (`python -m nanochat.locks`, scripts/stage.sh's stage_lock) is taken for real, by this interpreter."""
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\n[ "$1 $2" = "-m nanochat.locks" ] && exec {sys.executable} "$@"\n'
                                         f'echo "$*" >> {tmp / "python_calls"}\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'PATH="{venv / "bin"}:$PATH"\n')
    # scripts/setup_env.sh's stamp: the install is current, so it installs nothing
    (venv / ".nanochat-installed").write_text(hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest())
    return {**os.environ, "PRESET": "tiny", "NANOCHAT_VENV": str(venv), "NANOCHAT_BASE_DIR": str(tmp / "base"),
            "NANOCHAT_DATA_DIR": str(tmp / "data"), "RESULTS_DIR": str(tmp / "results"), **extra}


def speedrun(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "speedrun.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_help_launches_nothing(tmp_path):
    env = speedrun_env(tmp_path)
    for flag in ("--help", "-h"):
        out = speedrun(env, flag)
        assert out.returncode == 0, out.stderr
        assert "PRESET=tiny bash speedrun.sh" in out.stdout and "FORCE=1" in out.stdout
        assert not out.stdout.startswith("#!")  # the header comment, as text
    assert not (tmp_path / "base").exists() and not (tmp_path / "results").exists()
    assert not (tmp_path / "python_calls").exists()


def test_unknown_argument_is_refused(tmp_path):
    for arg in ("--fast", "tiny", ""):
        out = speedrun(speedrun_env(tmp_path / arg.strip("-") if arg else tmp_path / "empty"), arg)
        assert out.returncode == 2 and f"unknown argument '{arg}'" in out.stderr, out.stderr
        assert "[speedrun]" not in out.stdout
    assert not list(tmp_path.glob("*/base")) and not list(tmp_path.glob("*/python_calls"))


def test_speedrun_reruns_stages_whose_outputs_are_missing_or_settings_changed(tmp_path):
    env = speedrun_env(tmp_path)
    results = tmp_path / "results"
    (results / "tiny_mhc").mkdir(parents=True)  # what the final line may point at: only what exists
    (results / "report.md").write_text("old report")
    first = speedrun(env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    calls = (tmp_path / "python_calls").read_text().splitlines()
    assert len(calls) == len(TINY_STAGES)
    assert all((tmp_path / "base" / "speedrun" / f"{s}.done").exists() for s in TINY_STAGES)
    final = first.stdout.splitlines()[-1]
    assert final == f"[speedrun] finished: {results / 'report.md'} {results / 'tiny_mhc'}", final
    # the stand-in wrote nothing: every stage warns at once, then reruns next time and names what is missing
    assert first.stderr.count("does not exist") >= len(TINY_STAGES) - 1  # (report.md was made by hand)

    again = speedrun({**env, "EXTRA_EVAL_ARGS": "--max-per-task 5"})
    assert again.returncode == 0
    assert "[speedrun] eval_baseline: rerunning: settings changed" in again.stdout  # a setting changed
    assert f"[speedrun] train_mhc: rerunning: {results / 'tiny_mhc' / 'config.json'} is missing" in again.stdout
    assert f"[speedrun] lm_eval_mhc: rerunning: {results / 'tiny_mhc' / 'lm_eval.json'} is missing" in again.stdout
    assert (f"[speedrun] rl_gsm8k_global: rerunning: {results / 'rl' / 'tiny_mhc_sft-gsm8k-global-dense'}"
            in again.stdout)
    assert f"[speedrun] tokenizer: rerunning: {tmp_path / 'base' / 'tokenizer' / 'tokenizer.json'} is missing" \
        in again.stdout
    assert "[speedrun] report: already done" in again.stdout  # its output exists, its settings did not change
    assert again.stdout.count("rerunning:") == len(TINY_STAGES) - 1


def test_speedrun_names_outputs_for_every_stage():
    """Every stage call in speedrun.sh declares at least one output: without one a marker can never be caught lying."""
    lines = (REPO / "speedrun.sh").read_text().splitlines()
    calls = [l.strip() for l in lines if l.strip().startswith("stage ")]
    assert len(calls) >= 15
    assert all("--out " in c for c in calls), [c for c in calls if "--out " not in c]


def wrapper(name: str, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_BASE_DIR", "CONFIG", "MODEL_TAG")}
    return subprocess.run(["bash", f"scripts/{name}.sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=30, env={**base, "HOME": str(tmp), **env})


def test_wrapper_help_documents_its_variables(tmp_path):
    for name in ("train_mhc", "train_baseline"):
        for flag in ("--help", "-h"):
            out = wrapper(name, tmp_path, flag)
            assert out.returncode == 0, out.stderr
            for var in ("CONFIG", "MODEL_TAG", "NANOCHAT_BASE_DIR", "NPROC_PER_NODE", "NNODES", "MASTER_ADDR"):
                assert var in out.stdout, (name, var)
            assert "torchrun:" not in out.stdout  # nothing launched
    assert not (tmp_path / ".cache").exists()


def test_wrapper_missing_config_is_one_line_before_torchrun(tmp_path):
    for how in ({"CONFIG": "nope"}, {}):
        args = () if how else ("--lr", "1", "--config", "nope")  # the flags' --config is the one base_train reads
        out = wrapper("train_mhc", tmp_path, *args, **how)
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr
        assert "CONFIG=nope: no such file" in out.stderr and "dynamic_mhc" in out.stderr  # names the real ones
        assert "torchrun:" not in out.stdout


def test_wrapper_agrees_with_speedrun_on_the_base_dir(tmp_path):
    """A tiny_* CONFIG uses speedrun's tiny base dir and tags; with no tokenizer there, one line says so."""
    out = wrapper("train_mhc", tmp_path, CONFIG="tiny_cpu_mhc")
    assert out.returncode == 2
    assert f"NANOCHAT_BASE_DIR={tmp_path / '.cache' / 'nanochat-tiny'} CONFIG=tiny_cpu_mhc MODEL_TAG=tiny_mhc" \
        in out.stdout
    assert out.stderr.strip().count("\n") == 0 and "no tokenizer in" in out.stderr and "Traceback" not in out.stderr
    out = wrapper("train_baseline", tmp_path)
    assert f"NANOCHAT_BASE_DIR={tmp_path / '.cache' / 'nanochat'} CONFIG=baseline MODEL_TAG=baseline" in out.stdout
    out = wrapper("train_baseline", tmp_path, NANOCHAT_BASE_DIR=str(tmp_path / "mine"), CONFIG="tiny_cpu")
    assert f"NANOCHAT_BASE_DIR={tmp_path / 'mine'} CONFIG=tiny_cpu MODEL_TAG=tiny_baseline" in out.stdout


def test_a_second_speedrun_on_the_same_base_dir_is_refused(tmp_path):
    """One speedrun per NANOCHAT_BASE_DIR (issue 21 item 2): while one holds the lock (a shell that took it with
    stage_lock, as speedrun.sh does, and is still running a stage), a second stops in one line naming its PID before
    any stage runs; once the first is killed with -9 (its stage too), the next one runs."""
    env = speedrun_env(tmp_path)
    markers = tmp_path / "base" / "speedrun"
    first = subprocess.Popen(["bash", "-c", 'set -e; source scripts/stage.sh; stage_lock "$1" "the speedrun on $2"; '
                              'echo locked; sleep 60', "bash", str(markers), str(tmp_path / "base")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert first.stdout.readline().strip() == "locked"  # the python that took the lock has exited by now
        second = speedrun(env)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the shell and its "stage"
        first.wait()
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stderr.splitlines()[-1] == (
        f"error: the speedrun on {tmp_path / 'base'} is in use by another run (PID {first.pid}, lock "
        f"{markers / '.lock'}): wait for it to finish or stop it, or choose another NANOCHAT_BASE_DIR")
    assert "[speedrun] preset=" not in second.stdout and not (tmp_path / "python_calls").exists()
    assert sorted(p.name for p in markers.iterdir()) == [".lock"]  # no stage ran
    after = speedrun(env)
    assert after.returncode == 0, after.stderr[-2000:]
    assert len((tmp_path / "python_calls").read_text().splitlines()) == len(TINY_STAGES)
