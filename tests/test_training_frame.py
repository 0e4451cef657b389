"""The run frame every training script shares (nanochat.training.Run): each script killed with SIGKILL mid-run and
resumed ends bit-identical to a straight run; resumable settings come from field metadata; --extend-to trains a
finished run longer, with the change recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import latest_checkpoint
from nanochat.common import UserError

REPO = Path(__file__).resolve().parents[1]
BASE = ["--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2",
        "--total-batch-size", "128", "--data-source", "local", "--eval-tokens", "256", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--compile", "false"]


def script_args(kind: str, tag: str, results: Path, ckpt: Path | None) -> tuple[str, list[str], str]:
    """(module, arguments, the checkpoint folder it writes) of a run long enough to be killed mid-way."""
    if kind == "base":
        return "scripts.base_train", BASE + ["--num-iterations", "300", "--save-every", "25", "--model-tag", tag,
                                             "--results-dir", str(results)], f"checkpoints/{tag}"
    if kind == "sft":
        return "scripts.sft_train", ["--checkpoint", str(ckpt), "--output-tag", tag, "--results-dir", str(results),
                                     "--data", "synthetic", "--synthetic-count", "300", "--synthetic-steps", "1",
                                     "--synthetic-max-value", "10", "--val-problems", "16", "--device-batch-size",
                                     "4", "--num-iterations", "200", "--save-every", "20", "--eval-every", "-1",
                                     "--mhc-gate-sample-frac", "0.5"], f"checkpoints/{tag}"
    return "scripts.train_rl", ["--checkpoint", str(ckpt), "--tag", tag, "--results-dir", str(results),
                                "--problems", "synthetic", "--synthetic-steps", "1", "--synthetic-max-value", "10",
                                "--train-problems", "32", "--eval-problems", "8", "--reward", "dense",
                                "--max-new-tokens", "8", "--num-envs", "8", "--n-steps", "16", "--batch-size", "8",
                                "--n-epochs", "2", "--total-timesteps", "1024", "--save-every", "64",
                                "--no-progress", "--score-batch-size", "16", "--baselines", "none"], \
        f"checkpoints/rl/{tag}"


def final_weights(base_dir: Path, folder: str) -> dict:
    return load_file(f"{latest_checkpoint(str(base_dir / folder))}/model.safetensors")


@pytest.mark.parametrize("kind", ["base", "sft", "rl"])
def test_kill_9_mid_run_then_resume_equals_a_straight_run(kind, tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module, straight, folder = script_args(kind, f"frame_{kind}_straight", tmp_path, tiny_mhc_checkpoint)
    subprocess.run([sys.executable, "-m", module, *straight], cwd=REPO, env=env, check=True, capture_output=True)
    module, killed, killed_folder = script_args(kind, f"frame_{kind}_killed", tmp_path, tiny_mhc_checkpoint)
    proc = subprocess.Popen([sys.executable, "-m", module, *killed], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    root = tiny_base_dir.base_dir / killed_folder
    deadline = time.time() + 180
    while latest_checkpoint(str(root)) is None or latest_checkpoint(str(root)).endswith("000000"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler runs: whatever is on disk is what a crash leaves
    proc.wait()
    resumed = subprocess.run([sys.executable, "-m", module, *killed, "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a, b = final_weights(tiny_base_dir.base_dir, folder), final_weights(tiny_base_dir.base_dir, killed_folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_extend_to_trains_a_finished_run_longer_and_records_it(tiny_base_dir, tmp_path):
    """A run of 6 steps extended to 10 ends where a 10-step run with the same schedule would be on the steps it
    shares from the resume on (the LR schedule is recomputed for the new horizon: docs/design.md); the change is
    in metrics.jsonl and config.json; shrinking or extending without --resume is refused."""
    from scripts.base_train import main
    args = BASE + ["--save-every", "-1", "--results-dir", str(tmp_path)]
    main(args + ["--num-iterations", "6", "--model-tag", "extend"])
    main(args + ["--num-iterations", "6", "--model-tag", "extend", "--resume", "--extend-to", "10"])
    records = [json.loads(line) for line in open(tmp_path / "extend" / "metrics.jsonl")]
    assert {"step": 6, "config_change": {"resume": [False, True], "extend_to": [0, 10],
                                         "num_iterations": [6, 10]}} in records
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert json.loads((tmp_path / "extend" / "config.json").read_text())["num_iterations"] == 10
    with pytest.raises(UserError, match="must be beyond the checkpoint's step 10"):
        main(args + ["--num-iterations", "6", "--model-tag", "extend", "--resume", "--extend-to", "8"])
    with pytest.raises(UserError, match="needs --resume"):
        main(args + ["--num-iterations", "6", "--model-tag", "extend2", "--extend-to", "8"])
    # a resume without --extend-to keeps the extended horizon (the checkpoint's), it does not shrink back to 6
    main(args + ["--num-iterations", "6", "--model-tag", "extend", "--resume"])
    assert json.loads((tmp_path / "extend" / "config.json").read_text())["num_iterations"] == 10


def test_resumable_settings_are_declared_on_the_fields():
    from nanochat.config import RLConfig, SFTConfig, TrainConfig
    from nanochat.training import resumable_settings
    train = resumable_settings(TrainConfig)
    assert {"log_every", "save_every", "compile", "extend_to", "device_batch_size"} <= train
    assert not train & {"matrix_lr", "seed", "depth", "mhc_gate_sample_frac", "num_iterations"}
    assert {"eval_every", "extend_to"} <= resumable_settings(SFTConfig) and "lr_scale" not in resumable_settings(
        SFTConfig)
    assert {"total_timesteps", "eval_only"} <= resumable_settings(RLConfig)
    assert "action_space" not in resumable_settings(RLConfig)
