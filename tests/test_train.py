"""Training end to end: overfitting, exact resume, SIGTERM, DDP == accumulation, bad input, evaluation."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers

REPO = Path(__file__).resolve().parents[1]

# a model small enough for a step in ~10 ms on 2 cores: depth 2, width 64, seq 64
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
        "4", "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--compile", "false"]


def read_metrics(results_dir: Path, tag: str) -> list[dict]:
    with open(results_dir / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(results_dir, tag) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(results_dir, tag) if "loss" in r}


def run_train(argv):
    from scripts.base_train import main
    main(argv)


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.float32)
    x, y = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
    first = None
    for _ in range(80):
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first


def test_resume_equals_straight_run(tiny_base_dir, tmp_path):
    """6 straight steps == 3 steps + resume from the step-3 checkpoint + 3 steps (fp32 CPU, 1e-5)."""
    common = TINY + ["--num-iterations", "6", "--save-every", "3", "--keep-checkpoints", "3",
                     "--results-dir", str(tmp_path / "results")]
    run_train(common + ["--model-tag", "straight"])
    straight = train_losses(tmp_path / "results", "straight")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]

    # simulate a run that died after step 3: drop the later checkpoint, resume
    root = tiny_base_dir.base_dir / "checkpoints" / "straight"
    shutil.rmtree(root / "step_000006")
    run_train(common + ["--model-tag", "straight", "--resume"])
    resumed = train_losses(tmp_path / "results", "straight")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # metrics.jsonl has no duplicated steps after the resume
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-5), step
    assert len([r for r in read_metrics(tmp_path / "results", "straight") if "val_bpb" in r and r["step"] == 6]) == 1


def test_sigterm_saves_and_resume_continues(tiny_base_dir, tmp_path):
    """A real SIGTERM mid-run: the process saves a checkpoint and exits 143; --resume finishes with the same
    losses as an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    base = TINY + ["--num-iterations", "60", "--save-every", "-1", "--results-dir", str(results)]
    cmd = [sys.executable, "-m", "scripts.base_train"] + base
    subprocess.run(cmd + ["--model-tag", "ref"], cwd=REPO, env=env, check=True, capture_output=True)
    reference = train_losses(results, "ref")

    proc = subprocess.Popen(cmd + ["--model-tag", "killed"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = results / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "saved checkpoint" in out
    stopped_at = max(train_losses(results, "killed"))
    assert 0 < stopped_at < 60

    subprocess.run(cmd + ["--model-tag", "killed", "--resume"], cwd=REPO, env=env, check=True, capture_output=True)
    resumed = train_losses(results, "killed")
    assert sorted(resumed) == list(range(1, 61))
    for step in range(1, 61):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_ddp_two_ranks_equal_gradient_accumulation(tiny_base_dir, tmp_path, mhc):
    """torchrun with 2 gloo ranks (accumulation 1) gives the losses of 1 process with accumulation 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = tmp_path / "results"
    args = TINY + ["--num-iterations", "5", "--total-batch-size", "512", "--results-dir", str(results)]
    args += ["--mhc-enabled"] if mhc else []
    args += ["--memory-check", "true"]  # the estimate also runs on every rank under torchrun
    single_tag, ddp_tag = ("single_mhc", "ddp_mhc") if mhc else ("single", "ddp")  # checkpoints share a base dir
    subprocess.run([sys.executable, "-m", "scripts.base_train"] + args + ["--model-tag", single_tag], cwd=REPO,
                   env=env, check=True, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "scripts.base_train", "--"] + args + ["--model-tag", ddp_tag], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "2 ranks x 1 accumulation" in ddp.stdout
    single, double = train_losses(results, single_tag), train_losses(results, ddp_tag)
    assert sorted(single) == sorted(double) == [1, 2, 3, 4, 5]
    for step in single:
        assert double[step] == pytest.approx(single[step], abs=1e-5), step
    vals = [r["val_bpb"] for r in read_metrics(results, ddp_tag) if "val_bpb" in r]
    ref_vals = [r["val_bpb"] for r in read_metrics(results, single_tag) if "val_bpb" in r]
    assert vals == pytest.approx(ref_vals, abs=1e-5)


def test_base_eval_writes_eval_json(tiny_base_dir, tmp_path):
    results = tmp_path / "results"
    run_train(TINY + ["--num-iterations", "3", "--model-tag", "evalme", "--results-dir", str(results)])
    from scripts.base_eval import main as eval_main
    eval_main(["--model-tag", "evalme", "--eval-tokens", "1024", "--device-batch-size", "4", "--results-dir",
               str(results)])  # the in-training evaluation's tokens and batches (TINY)
    record = json.loads((results / "evalme" / "eval.json").read_text())
    assert record["step"] == 3
    bpb = record["results"]["bpb"]
    assert 0 < bpb["val_bpb"] < 20 and 0 < bpb["train_bpb"] < 20
    # the val bpb at the last training step and the standalone evaluation agree (same tokens, same model)
    last_val = [r["val_bpb"] for r in read_metrics(results, "evalme") if "val_bpb" in r][-1]
    assert last_val == pytest.approx(bpb["val_bpb"], abs=1e-6)
    with pytest.raises(UserError, match="no checkpoint for model tag 'missing'"):
        eval_main(["--model-tag", "missing"])
    with pytest.raises(UserError, match="unknown task"):
        eval_main(["--model-tag", "evalme", "--tasks", "bpb,mmlu"])


# --------------------------------------------------------------------------------------------------------------
# bad input: a clear error that names the problem

@pytest.mark.parametrize("extra, match", [
    (["--depth", "0"], "--depth must be > 0"),
    (["--total-batch-size", "300"], "--total-batch-size 300 is not divisible"),
    (["--dtype", "float16"], "--dtype must be one of"),
    (["--warmup-ratio", "0.7", "--warmdown-ratio", "0.7"], "warmup-ratio"),
    (["--config", "no_such_config"], "no_such_config"),
    (["--mhc-enabled", "--mhc-num-streams", "0"], "mhc_num_streams must be an integer >= 1"),
    (["--mhc-enabled", "--mhc-sinkhorn-iters", "0"], "mhc_sinkhorn_iters"),
    (["--mhc-enabled", "--mhc-sinkhorn-tau", "0"], "mhc_sinkhorn_tau must be a finite number > 0"),
    (["--mhc-enabled", "--mhc-constraint", "birkhoff"], "mhc_constraint must be one of"),
    (["--mhc-enabled", "--mhc-readout", "mean"], "mhc_readout must be one of"),
    (["--mhc-enabled", "--mhc-gate-init", "1.5"], "mhc_gate_init"),
    (["--mhc-enabled", "--mhc-constraint", "orthostochastic", "--mhc-ns-coeffs", "[[3, -3.2]]"], "3 finite numbers"),
    (["--mhc-num-streams", "2"], "--mhc-num-streams set but mHC is off"),
])
def test_bad_flags(tiny_base_dir, tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        run_train(TINY + ["--num-iterations", "1", "--results-dir", str(tmp_path)] + extra)


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        run_train(["--dept", "3"])
    assert exc.value.code == 2
    assert "--dept" in capsys.readouterr().err


def test_config_file_keys_and_types(tiny_base_dir, tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text('depth = 2\nlearning_rate = 0.1\n')
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        run_train(["--config", str(bad_key)])
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('depth = "two"\n')
    with pytest.raises(UserError, match="key 'depth' expects a int"):
        run_train(["--config", str(bad_type)])
    # precedence: flags override the file, which overrides the dataclass defaults
    good = tmp_path / "good.toml"
    good.write_text('depth = 3\nnum_iterations = 1\n')
    from nanochat.config import TrainConfig, build_config
    cfg, _ = build_config(TrainConfig, ["--config", str(good), "--depth", "2"], "test")
    assert cfg.depth == 2 and cfg.num_iterations == 1 and cfg.matrix_lr == TrainConfig.matrix_lr


def test_named_configs_load():
    from nanochat.config import TrainConfig, build_config
    cfg, _ = build_config(TrainConfig, ["--config", "baseline"], "test")
    assert (cfg.depth, cfg.max_seq_len, cfg.total_batch_size) == (12, 1024, 524288)
    from nanochat.gpt import model_dims_from_depth
    assert model_dims_from_depth(cfg.depth, cfg.aspect_ratio, cfg.head_dim) == (768, 6)
    cfg, _ = build_config(TrainConfig, ["--config", "tiny_cpu"], "test")
    assert (cfg.depth, cfg.max_seq_len, cfg.device_batch_size, cfg.num_iterations) == (4, 256, 8, 150)
    cfg, _ = build_config(TrainConfig, ["--config", "dynamic_mhc"], "test")  # extends = "baseline"
    assert cfg.mhc.enabled and cfg.mhc.num_streams == 4 and cfg.depth == 12 and cfg.total_batch_size == 524288
    cfg, _ = build_config(TrainConfig, ["--config", "tiny_cpu_mhc", "--mhc-num-streams", "2"], "test")
    assert cfg.mhc.enabled and cfg.mhc.num_streams == 2 and cfg.num_iterations == 150


def test_existing_run_needs_resume_and_config_must_match(tiny_base_dir, tmp_path):
    args = TINY + ["--num-iterations", "2", "--model-tag", "guard", "--results-dir", str(tmp_path)]
    run_train(args)
    with pytest.raises(UserError, match="pass --resume"):
        run_train(args)
    with pytest.raises(UserError, match="n_layer: checkpoint 2 vs now 3"):
        run_train([a if a != "2" or i != 1 else "3" for i, a in enumerate(args)] + ["--resume"])


def test_missing_data_dir_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "nowhere"))
    from nanochat.dataset import build_local
    with pytest.raises(UserError, match="nowhere"):
        build_local()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(empty))
    with pytest.raises(UserError, match="empty"):
        build_local()


def test_mhc_log_every_records_h_res_over_training_and_resumes(tiny_base_dir, tmp_path):
    """--mhc-log-every N: at steps 0, N, 2N, ... and the end, one record per sub-layer (the numbers of
    GPT.mhc_connection_stats on a fixed val batch); a resume redoes the resumed step's record without a duplicate."""
    common = TINY + ["--mhc-enabled", "--mhc-log-every", "2", "--num-iterations", "5", "--save-every", "2",
                     "--keep-checkpoints", "5", "--results-dir", str(tmp_path / "results")]
    run_train(common + ["--model-tag", "logged"])
    recs = [r for r in read_metrics(tmp_path / "results", "logged") if "mhc" in r]
    assert [r["step"] for r in recs] == [0, 2, 4, 5]
    first, last = recs[0]["mhc"], recs[-1]["mhc"]
    assert [s["sublayer"] for s in first] == [0, 1, 2, 3]  # depth 2: attention and MLP of two layers
    for s in first:  # at init: gate 0.2 on a 0.6-diagonal Sinkhorn, so diag(H_res) = 1 - 0.2 * 0.4 = 0.92
        assert s["gate"] == pytest.approx(0.2) and s["h_res_mean_diag"] == pytest.approx(0.92, abs=0.01)
        assert s["h_res_max_sum_error"] < 1e-3 and len(s["h_pre_mean"]) == 4 and len(s["h_post_mean"]) == 4
    assert any(abs(a["h_res_dist_identity"] - b["h_res_dist_identity"]) > 1e-6 for a, b in zip(first, last))
    shutil.rmtree(tiny_base_dir.base_dir / "checkpoints" / "logged" / "step_000005")
    run_train(common + ["--model-tag", "logged", "--resume"])
    again = [r for r in read_metrics(tmp_path / "results", "logged") if "mhc" in r]
    assert [r["step"] for r in again] == [0, 2, 4, 5]
    for a, b in zip(recs[-1]["mhc"], again[-1]["mhc"]):
        assert a["h_res_dist_identity"] == pytest.approx(b["h_res_dist_identity"], abs=1e-6)
    with pytest.raises(UserError, match="--mhc-log-every set but mHC is off"):
        run_train(TINY + ["--mhc-log-every", "2", "--model-tag", "off", "--results-dir", str(tmp_path)])


def test_derived_horizon_gives_baseline_and_mhc_the_same_tokens(tiny_base_dir, tmp_path):
    """--num-iterations -1 scales with the baseline architecture's parameters for both models (the mHC model's own
    extra parameters would buy it ~4% more tokens at this size)."""
    common = TINY + ["--num-iterations", "-1", "--target-param-data-ratio", "0.02", "--results-dir", str(tmp_path)]
    run_train(common + ["--model-tag", "budget_base"])
    run_train(common + ["--model-tag", "budget_mhc", "--mhc-enabled"])
    base, mhc = (json.loads((tmp_path / t / "config.json").read_text()) for t in ("budget_base", "budget_mhc"))
    assert mhc["num_params"] > 1.02 * base["num_params"]  # mHC really is bigger
    assert mhc["budget_params"] == base["budget_params"] == base["num_params"]
    assert mhc["num_iterations"] == base["num_iterations"] == round(0.02 * base["num_params"] / 256)
    assert mhc["tokens"] == base["tokens"]


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_peak_follows_the_card(name, peak):
    """PCIe and NVL cards have lower bf16 peaks than the SXM part their names contain; an unknown card has none
    (no MFU unless --peak-flops says it)."""
    from nanochat.common import peak_bf16_flops
    assert peak_bf16_flops(name) == peak
