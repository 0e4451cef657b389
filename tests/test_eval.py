"""scripts.base_eval end to end on a tiny checkpoint and small subsets of the real data: eval.json and
eval_examples.jsonl, 2 gloo ranks == 1 process, bad input (unknown task, missing checkpoint, malformed rows)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.common import UserError
from nanochat.stats import wilson_interval

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "256", "--device-batch-size",
         "2", "--total-batch-size", "512", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
         "--device-type", "cpu", "--dtype", "float32", "--compile", "false", "--num-iterations", "3"]
TASKS = "gsm8k,gsm8k_8shot,hellaswag,arc_easy,arc_challenge"
# 4 examples a task in batches of 2: two batches per task, so each of 2 ranks has work; 12 new tokens keep it fast
EVAL = ["--tasks", TASKS, "--max-per-task", "4", "--device-batch-size", "2", "--max-new-tokens", "12",
        "--task-data", "local", "--device-type", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def evalme(tiny_base_dir, tmp_path_factory):
    """A 3-step tiny checkpoint (model tag 'evaltasks') in the session's base dir."""
    from scripts.base_train import main as train_main
    results = tmp_path_factory.mktemp("train_results")
    train_main(TRAIN + ["--model-tag", "evaltasks", "--results-dir", str(results)])
    return tiny_base_dir


def read_examples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(evalme, tmp_path_factory):
    """One in-process evaluation on one thread (as each torchrun rank below), shared by two tests."""
    import torch
    from scripts.base_eval import main as eval_main
    out = tmp_path_factory.mktemp("eval_single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eval_main(EVAL + ["--model-tag", "evaltasks", "--results-dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    return (json.loads((out / "evaltasks" / "eval.json").read_text()),
            read_examples(out / "evaltasks" / "eval_examples.jsonl"))


def test_tiny_checkpoint_end_to_end(single_run):
    record, examples = single_run
    assert set(record["results"]) == set(TASKS.split(","))
    for name, res in record["results"].items():
        assert res["n"] == 4 and res["malformed"] == 0 and res["skipped"] == 0, name
        k = round(res["score"] * res["n"])
        assert res["ci95"] == pytest.approx(list(wilson_interval(k, res["n"])))  # the reported interval is k/n's
        assert res["data_source"].startswith("local:") and res["style"] and res["examples_per_s"] > 0
        assert res["metric"] in res["metrics"]
    assert record["results"]["hellaswag"]["rows"] == 10042 and record["results"]["arc_easy"]["rows"] == 2376
    # the context rule: 8 exemplars (~900 tokens) never fit 256 - 12 positions, so every 8-shot prompt drops its
    # earliest exemplars, and eval.json counts them; the 0-shot prompts fit whole
    shot8 = record["results"]["gsm8k_8shot"]
    assert shot8["cut"] == 4 and record["results"]["gsm8k"]["cut"] == 0
    assert shot8["context"]["trained_context"] == 256 and "earliest exemplars" in shot8["context"]["rule"]
    kept = [r["exemplars"] for r in examples if r["task"] == "gsm8k_8shot"]
    assert all(0 <= k < 8 for k in kept) and all(r["cut"] for r in examples if r["task"] == "gsm8k_8shot")
    assert len(examples) == 20
    for r in examples:
        assert {"task", "id", "prediction", "correct"} <= set(r)
    # the per-task scores are the means of the per-example records
    for name, res in record["results"].items():
        rs = [r for r in examples if r["task"] == name]
        assert res["score"] == sum(r["correct"] for r in rs) / len(rs)
    gen = [r for r in examples if r["task"] == "gsm8k"]
    assert all(r["new_tokens"] <= 12 and isinstance(r["completion"], str) for r in gen)


def run_eval_subprocess(args: list[str], nproc: int, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "scripts.base_eval", "--"] + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_ranks_equal_one_process(single_run, tmp_path):
    # one thread in every process (torchrun's default per rank), so even the floating-point reductions match
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = run_eval_subprocess(EVAL + ["--model-tag", "evaltasks", "--results-dir", str(tmp_path)], 2, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "evaltasks" / "eval.json").read_text())
    ex2 = read_examples(tmp_path / "evaltasks" / "eval_examples.jsonl")
    one, ex1 = single_run
    assert two["world_size"] == 2 and one["world_size"] == 1
    for name in TASKS.split(","):
        for key in ("score", "n", "ci95", "metrics", "malformed", "skipped", "truncated", "cut"):
            assert one["results"][name][key] == two["results"][name][key], (name, key)
    assert len(ex1) == len(ex2) == 20
    for a, b in zip(ex1, ex2):
        assert (a["task"], a["id"], a["prediction"], a["correct"]) == (b["task"], b["id"], b["prediction"],
                                                                       b["correct"])
        assert a.get("completion") == b.get("completion")
        assert a.get("lls", []) == pytest.approx(b.get("lls", []), abs=1e-5)


def test_bad_input(evalme, tmp_path, monkeypatch):
    from scripts.base_eval import main as eval_main
    with pytest.raises(UserError, match="unknown task.*mmlu"):
        eval_main(["--model-tag", "evaltasks", "--tasks", "gsm8k,mmlu"])
    with pytest.raises(UserError, match="no checkpoint for model tag 'nothere'"):
        eval_main(["--model-tag", "nothere", "--tasks", "gsm8k"])
    with pytest.raises(UserError, match="does not exist"):
        eval_main(["--checkpoint", str(tmp_path / "no_ckpt"), "--tasks", "gsm8k"])
    with pytest.raises(UserError, match="--max-per-task must be > 0 or -1"):
        eval_main(["--model-tag", "evaltasks", "--max-per-task", "0"])

    # a data dir with malformed rows: counted in eval.json, fatal with --strict
    data = tmp_path / "data"
    shutil.copytree(evalme.data_dir / "gsm8k", data / "gsm8k", ignore=shutil.ignore_patterns("train.jsonl"))
    (data / "arc").mkdir()
    arc_rows = (evalme.data_dir / "arc" / "ARC-Easy-test.jsonl").read_text().splitlines()[:5]
    bad_arc = json.loads(arc_rows[0])
    bad_arc["answerKey"] = "Q"
    (data / "arc" / "ARC-Easy-test.jsonl").write_text("\n".join(arc_rows + [json.dumps(bad_arc)]) + "\n")
    gsm = (data / "gsm8k" / "test.jsonl")
    gsm.write_text("\n".join(gsm.read_text().splitlines()[:6] + ['{"question": "q", "answer": "no final line"}',
                                                                 "{broken"]) + "\n")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data))
    args = ["--model-tag", "evaltasks", "--tasks", "gsm8k,arc_easy", "--max-new-tokens", "4", "--task-data", "local",
            "--results-dir", str(tmp_path / "res")]
    eval_main(args)
    res = json.loads((tmp_path / "res" / "evaltasks" / "eval.json").read_text())["results"]
    assert (res["gsm8k"]["rows"], res["gsm8k"]["malformed"], res["gsm8k"]["n"]) == (8, 2, 6)
    assert "row 6: the answer has no '#### <number>'" in res["gsm8k"]["malformed_reasons"][0]
    assert "row 7: line 8 is not JSON" in res["gsm8k"]["malformed_reasons"][1]
    assert (res["arc_easy"]["rows"], res["arc_easy"]["malformed"], res["arc_easy"]["n"]) == (6, 1, 5)
    assert "answerKey 'Q' is not among the labels" in res["arc_easy"]["malformed_reasons"][0]
    with pytest.raises(UserError, match="malformed row 6: the answer has no '####"):
        eval_main(args + ["--strict"])


def test_val_bpb_rows_and_gates(tiny_base_dir, tiny_mhc_checkpoint, tiny_baseline_checkpoint, tmp_path):
    """Per-row val records add up to val_bpb (the pairing unit of compare_results' bootstrap); --mhc-gates evaluates
    the model at other gates, and is recorded; --mhc-gates-from reads an RL eval.json; --inference-sinkhorn-iters."""
    import math
    from scripts.base_eval import main as eval_main
    common = ["--checkpoint", str(tiny_mhc_checkpoint), "--tasks", "bpb", "--eval-tokens", "1024",
              "--device-batch-size", "2", "--results-dir", str(tmp_path)]
    eval_main(common + ["--output-tag", "learned"])
    eval_main(common + ["--output-tag", "gate1", "--mhc-gates", "1"])
    rl = tmp_path / "rl_eval.json"
    rl.write_text(json.dumps({"arms": {"rl_policy": {"chosen_gates": {"mean": [1.0, 1.0]}}}}))
    eval_main(common + ["--output-tag", "from_rl", "--mhc-gates-from", str(rl)])
    rec = {t: json.loads((tmp_path / t / "eval.json").read_text()) for t in ("learned", "gate1", "from_rl")}
    rows = read_examples(tmp_path / "learned" / "eval_examples.jsonl")
    assert [r["id"] for r in rows] == [f"val-{i}" for i in range(8)] and all(r["task"] == "bpb" for r in rows)
    bpb = sum(r["nats"] for r in rows) / (math.log(2) * sum(r["bytes"] for r in rows))
    assert bpb == pytest.approx(rec["learned"]["results"]["bpb"]["val_bpb"], rel=1e-9)
    assert rec["learned"]["mhc_gates"] is None and rec["gate1"]["mhc_gates"]["per_sublayer"] == [1.0] * 4
    assert rec["gate1"]["results"]["bpb"]["val_bpb"] != rec["learned"]["results"]["bpb"]["val_bpb"]
    assert rec["from_rl"]["results"]["bpb"]["val_bpb"] == rec["gate1"]["results"]["bpb"]["val_bpb"]  # per layer
    with pytest.raises(UserError, match="3 gate values; this model takes 1 .global., 2 .per layer. or 4"):
        eval_main(common + ["--mhc-gates", "0.1,0.2,0.3"])
    with pytest.raises(UserError, match="--mhc-gates must be comma-separated numbers"):
        eval_main(common + ["--mhc-gates", "2"])
    with pytest.raises(UserError, match="not an RL eval.json"):
        eval_main(common + ["--mhc-gates-from", str(tmp_path / "learned" / "eval.json")])
    with pytest.raises(UserError, match="has no mHC"):
        eval_main(["--checkpoint", str(tiny_baseline_checkpoint), "--tasks", "bpb", "--mhc-gates", "0.5"])
    # --inference-sinkhorn-iters: fewer iterations move the bpb (the trained H_res has not converged at 1), and the
    # setting is recorded; a count above the trained one, or a model without mHC, is refused by name
    eval_main(common + ["--output-tag", "sinkhorn1", "--inference-sinkhorn-iters", "1"])
    one = json.loads((tmp_path / "sinkhorn1" / "eval.json").read_text())
    assert one["eval_config"]["inference_sinkhorn_iters"] == 1
    assert one["results"]["bpb"]["val_bpb"] != rec["learned"]["results"]["bpb"]["val_bpb"]
    with pytest.raises(UserError, match=r"integer in \[1, 20\].*got 50"):
        eval_main(common + ["--inference-sinkhorn-iters", "50"])
    with pytest.raises(UserError, match="no mHC"):
        eval_main(["--checkpoint", str(tiny_baseline_checkpoint), "--tasks", "bpb", "--inference-sinkhorn-iters", "5"])
