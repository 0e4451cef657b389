"""Checkpoints saved before the issue-18 redesign (tests/data/legacy_132bf44, written by commit 132bf44) load with
today's code, compute the logits they computed then, and resume their optimizer state."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import load_checkpoint, load_model

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_132bf44"


@pytest.mark.parametrize("name", ["baseline", "mhc", "ngpt"])
def test_a_checkpoint_from_before_the_redesign_loads_and_computes_the_same(name):
    expected = load_file(LEGACY / "expected_logits.safetensors")
    model, meta = load_model(str(LEGACY / name / "step_000001"), torch.device("cpu"))
    assert meta["step"] == 1
    idx = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        assert torch.allclose(model(idx), expected[name], atol=1e-5, rtol=1e-5)
        assert torch.allclose(model(idx, idx).reshape(1), expected[f"{name}_loss"], atol=1e-6)
    if name == "mhc":
        assert model.config.mhc.enabled and model.config.mhc.gate_sample_frac == 0.25


@pytest.mark.parametrize("name", ["baseline", "mhc"])
def test_its_optimizer_state_resumes(name):
    from nanochat.optim import setup_optimizers
    model, _ = load_model(str(LEGACY / name / "step_000001"), torch.device("cpu"))
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.float32)
    _, payload, _ = load_checkpoint(str(LEGACY / name / "step_000001"), device="cpu")
    for opt, state in zip(opts, payload["optimizers"]):
        opt.load_state_dict(state)
    assert all(len(opt.state) > 0 for opt in opts)
