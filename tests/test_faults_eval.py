"""scripts.base_eval under faults: a signal mid-run keeps the finished tasks (eval.json is rewritten as each task
finishes, exit 130/143, no traceback); an empty, all-malformed or non-UTF-8 task file is counted or named, never
n = 0; --dtype bfloat16 on a CPU without native bf16 warns. Tiny random checkpoint, small local task files."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.common import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
ARC_EASY = "arc/ARC-Easy-test.jsonl"
ARC_CHALLENGE = "arc/ARC-Challenge-test.jsonl"


def task_dir(tmp_path: Path, shared: Path, files: dict) -> Path:
    """A NANOCHAT_DATA_DIR with the given files: rel path -> bytes, or None for a link to the shared copy."""
    data = tmp_path / "data"
    for rel, content in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            (data / rel).symlink_to(shared / rel)
        else:
            (data / rel).write_bytes(content)
    return data


def first_lines(shared: Path, rel: str, n: int) -> bytes:
    return ("\n".join((shared / rel).read_text().splitlines()[:n]) + "\n").encode()


def eval_args(checkpoint: Path, tasks: str, results: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--tasks", tasks, "--task-data", "local", "--device-type", "cpu",
            "--dtype", "float32", "--device-batch-size", "2", "--max-new-tokens", "8", "--results-dir", str(results),
            "--output-tag", "faults"]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # not there yet (it never is half-written: atomic replace)
        return None


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_eval_keeps_finished_tasks(tiny_baseline_checkpoint, shared_data_dir, tmp_path, sig, code):
    # a 3-row first task, then all of HellaSwag (10042 examples: minutes), so the signal lands in the second task
    data = task_dir(tmp_path, shared_data_dir, {ARC_EASY: first_lines(shared_data_dir, ARC_EASY, 3),
                                                "hellaswag/hellaswag_val.jsonl": None})
    results = tmp_path / "res"
    env = {**os.environ, "NANOCHAT_DATA_DIR": str(data), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "NANOCHAT_CI": "1"}
    cmd = [sys.executable, "-m", "scripts.base_eval"] + eval_args(tiny_baseline_checkpoint, "arc_easy,hellaswag,"
                                                                   "arc_challenge", results)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    eval_json = results / "faults" / "eval.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            record = read_json(eval_json)
            if record and record["finished"] == ["arc_easy"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "base_eval ended before the signal: " + proc.communicate()[1][-3000:]
        assert record and record["finished"] == ["arc_easy"], "the first task never appeared in eval.json"
        assert record["status"] == "running" and record["pending"] == ["hellaswag", "arc_challenge"]
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(sig).name
    message = [line for line in err.splitlines() if "interrupted" in line]
    assert message == [f"interrupted by {name}: finished arc_easy (saved in {eval_json}); not finished: hellaswag, "
                       f"arc_challenge"]
    record = json.loads(eval_json.read_text())
    assert record["status"] == f"interrupted ({name})"
    assert record["finished"] == ["arc_easy"] and record["pending"] == ["hellaswag", "arc_challenge"]
    assert set(record["results"]) == {"arc_easy"} and record["results"]["arc_easy"]["n"] == 3
    examples = [json.loads(line) for line in (results / "faults" / "eval_examples.jsonl").read_text().splitlines()]
    assert [r["task"] for r in examples] == ["arc_easy"] * 3  # nothing of the unfinished task
    assert not list((results / "faults").glob("*.tmp"))


def test_empty_or_unreadable_task_file_is_named(tiny_baseline_checkpoint, shared_data_dir, tmp_path, monkeypatch):
    from scripts.base_eval import main as eval_main
    results = tmp_path / "res"
    args = eval_args(tiny_baseline_checkpoint, "arc_easy,arc_challenge", results)
    good = first_lines(shared_data_dir, ARC_EASY, 2)
    cases = [(b"", r"ARC-Challenge-test.jsonl has no rows"),
             (b"\n  \n", r"ARC-Challenge-test.jsonl has no rows"),
             (b"{broken\n[1, 2]\n", r"none of the 2 rows of local:.*ARC-Challenge-test.jsonl is a valid example "
                                    r"\(first reasons: row 0: line 1 is not JSON"),
             (gzip.compress(good), r"rows of local:.*ARC-Challenge-test.jsonl is a valid example")]
    for i, (content, message) in enumerate(cases):
        data = task_dir(tmp_path / str(i), shared_data_dir, {ARC_EASY: good, ARC_CHALLENGE: content})
        monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data))
        with pytest.raises(UserError, match=message):
            eval_main(args)
        # the task that finished before the bad file is kept, and eval.json says the run failed where
        record = json.loads((results / "faults" / "eval.json").read_text())
        assert record["status"] == "failed" and record["finished"] == ["arc_easy"], i
        assert record["pending"] == ["arc_challenge"] and "ARC-Challenge-test.jsonl" in record["error"]
        assert record["results"]["arc_easy"]["n"] == 2


def test_non_utf8_rows_are_counted(tiny_baseline_checkpoint, shared_data_dir, tmp_path, monkeypatch):
    from nanochat.task_common import read_jsonl
    from scripts.base_eval import main as eval_main
    rows = (shared_data_dir / ARC_EASY).read_text().splitlines()[:3]
    latin1 = json.loads(rows[1])
    latin1["question"] += " caf\u00e9"
    content = b"\xef\xbb\xbf" + "\n".join([rows[0], json.dumps(latin1, ensure_ascii=False)]).encode("latin-1") \
        + b"\n\xff\xfe\x00garbage\n" + rows[2].encode() + b"\n"
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    parsed = read_jsonl(str(path))
    assert isinstance(parsed[0], dict)  # a leading BOM is not an error
    assert [type(r).__name__ for r in parsed] == ["dict", "MalformedRow", "MalformedRow", "dict"]
    assert str(parsed[1]).startswith("line 2 is not UTF-8 (byte 0xe9 at column ")
    assert str(parsed[2]).startswith("line 3 is not UTF-8 (byte 0xff at column 1)")

    data = task_dir(tmp_path, shared_data_dir, {ARC_EASY: content})
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data))
    eval_main(eval_args(tiny_baseline_checkpoint, "arc_easy", tmp_path / "res"))
    record = json.loads((tmp_path / "res" / "faults" / "eval.json").read_text())
    res = record["results"]["arc_easy"]
    assert record["status"] == "complete" and record["finished"] == ["arc_easy"] and record["pending"] == []
    assert (res["rows"], res["malformed"], res["n"]) == (4, 2, 2)
    assert "row 1: line 2 is not UTF-8" in res["malformed_reasons"][0]


def test_cpu_bf16_warning(monkeypatch, capsys):
    from nanochat import common
    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert common.cpu_bf16_support(avx2)[0] is False
    assert common.cpu_bf16_support(avx2.replace("avx2", "avx2 avx512f avx512_bf16"))[0] is True
    assert common.cpu_bf16_support("Features\t: fp asimd bf16 i8mm\n")[0] is True  # Arm

    monkeypatch.setattr(common, "_warned_cpu_bf16", False)
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: (False, "AVX2"))
    assert common.resolve_precision("cpu", "float32")[0] == "float32"
    assert common.resolve_precision("cpu", "auto")[0] == "float32"
    assert capsys.readouterr().err == ""
    assert common.resolve_precision("cpu", "bfloat16")[0] == "bfloat16"
    common.resolve_precision("cpu", "bfloat16")  # once per process
    err = capsys.readouterr().err
    assert err == ("warning: --dtype bfloat16 on a CPU without native bf16 (capability AVX2): expect ~30x slower "
                   "than float32\n")

    monkeypatch.setattr(common, "_warned_cpu_bf16", False)
    monkeypatch.setattr(common, "cpu_bf16_support", lambda: (True, "AVX512"))
    common.resolve_precision("cpu", "bfloat16")
    assert capsys.readouterr().err == ""


def test_a_full_results_disk_keeps_the_computed_scores(tiny_baseline_checkpoint, tmp_path, full_disk, capsys):
    """The disk fills after eval.json's first write: the bpb computed next goes to stdout, the error is one line
    naming the file and the errno (no double traceback), no .tmp is left, and eval.json stays the last consistent
    record ('running', nothing finished)."""
    from nanochat.common import run_main
    from scripts.base_eval import main as eval_main
    results = tmp_path / "res"
    out_dir = results / "faults"
    full_disk(results, after=1, name="eval.json.tmp")  # written, then renamed
    with pytest.raises(SystemExit) as e:
        run_main(lambda: eval_main(eval_args(tiny_baseline_checkpoint, "bpb", results) + ["--eval-tokens", "512"]))
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"error: cannot write {out_dir}/eval.json: [Errno 28] No space left on device"
    printed = {line.split(": ")[0]: float(line.split(": ")[1]) for line in out.splitlines()
               if line.startswith(("train bpb: ", "val bpb: "))}
    kept = [json.loads(line.split(": ", 1)[1]) for line in out.splitlines()
            if line.startswith(f"not written to {out_dir}/eval.json: ")]
    assert len(kept) == 1 and kept[0]["checkpoint"] == str(tiny_baseline_checkpoint)
    bpb = kept[0]["results"]["bpb"]
    assert bpb["train_bpb"] == pytest.approx(printed["train bpb"], abs=1e-4) and bpb["val_bpb"] > 0
    assert bpb["val_bpb"] == pytest.approx(printed["val bpb"], abs=1e-4)
    assert sorted(p.name for p in out_dir.iterdir()) == ["eval.json", "eval_examples.jsonl"]  # no .tmp
    record = json.loads((out_dir / "eval.json").read_text())
    assert record["status"] == "running" and record["finished"] == [] and record["pending"] == ["bpb"]


def test_an_unwritable_results_dir_is_refused_before_evaluating(tiny_baseline_checkpoint, tmp_path, full_disk,
                                                                monkeypatch):
    import scripts.base_eval as base_eval
    results = tmp_path / "res"
    full_disk(results, err=28)

    def no_compute(*args, **kwargs):
        raise AssertionError("evaluated although the results cannot be written")
    monkeypatch.setattr(base_eval, "run_bpb", no_compute)
    monkeypatch.setattr(base_eval, "evaluate_task", no_compute)
    with pytest.raises(UserError, match=rf"^cannot write {results}/faults: \[Errno 28\] No space left on device; the "
                                        rf"results go there: .*\(nothing was computed\)$"):
        base_eval.main(eval_args(tiny_baseline_checkpoint, "bpb,arc_easy", results))
    assert not results.exists()
