"""Inference-time Sinkhorn (GPT.set_inference_sinkhorn_iters): the trained count is exact, fewer iterations act only
in eval mode under no_grad (and under torch.compile), bad settings are refused, and the benchmark runs on a tiny
checkpoint."""
import json

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
# the resolution of the checks: fp32 logits of O(1) and sums of four fp32 entries agree to ~1e-7
TOL = 1e-6


def unconverged_model(seed=0, **overrides) -> GPT:
    """An mHC model in eval mode whose b_res is pushed off the symmetric init (on which one Sinkhorn iteration is
    already exact), so a single iteration leaves the column sums visibly off."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict({**SMALL, "mhc_enabled": True, **overrides}))
    model.init_weights()
    with torch.no_grad():
        for conn in model.mhc_modules():
            conn.b_res.add_(2 * torch.randn_like(conn.b_res))
    return model.eval()


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, SMALL["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def inference_logits(model, idx):
    with torch.no_grad():
        return model(idx)


def test_the_trained_count_is_the_default_bit_for_bit():
    model, idx = unconverged_model(), tokens()
    exact = inference_logits(model, idx)
    model.set_inference_sinkhorn_iters(model.config.mhc.sinkhorn_iters)
    assert torch.equal(inference_logits(model, idx), exact)
    model.set_inference_sinkhorn_iters(None)
    assert torch.equal(inference_logits(model, idx), exact)


def test_one_iteration_changes_inference_only():
    model, idx = unconverged_model(), tokens()
    exact = inference_logits(model, idx)
    model.set_inference_sinkhorn_iters(1)
    model.capture_mhc(True)
    approx = inference_logits(model, idx)
    H = torch.cat([c["H_res"].reshape(-1, 4, 4) for c in model.captured_mhc()]).double()
    model.capture_mhc(False)
    assert (approx - exact).abs().max() > TOL
    # the last step is the row step: rows sum to 1, the columns are where one iteration falls short
    assert (H.sum(-2) - 1).abs().max() > TOL
    assert (H.sum(-1) - 1).abs().max() < TOL
    # with grad enabled (eval mode) the setting is ignored
    assert torch.equal(model(idx).detach(), exact)
    # in training mode, with or without grad, too (no gate noise or sampling: training mode is deterministic)
    model.train()
    model.set_inference_sinkhorn_iters(None)
    train_exact = inference_logits(model, idx)
    model.set_inference_sinkhorn_iters(1)
    assert torch.equal(inference_logits(model, idx), train_exact)
    assert torch.equal(model(idx).detach(), train_exact)


def test_compiled_forward_follows_the_setting():
    """The count is a Python int read in forward: Dynamo guards on it, so a change recompiles instead of reusing a
    graph built for another count (dynamic=True, as the RL and SFT forwards compile: the int is not made symbolic)."""
    model, idx = unconverged_model(), tokens()
    exact = inference_logits(model, idx)
    model.set_inference_sinkhorn_iters(1)
    one = inference_logits(model, idx)
    model.set_inference_sinkhorn_iters(None)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    torch._dynamo.reset()
    try:
        assert torch.equal(inference_logits(compiled, idx), exact)
        model.set_inference_sinkhorn_iters(1)
        assert torch.equal(inference_logits(compiled, idx), one)
        model.set_inference_sinkhorn_iters(None)
        assert torch.equal(inference_logits(compiled, idx), exact)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("k", [0, -1, 21, 2.5, True, "3"])
def test_bad_iteration_counts_are_refused_with_the_value(k):
    model = unconverged_model()
    model.set_inference_sinkhorn_iters(3)
    with pytest.raises(UserError, match=repr(k).replace(".", r"\.")):
        model.set_inference_sinkhorn_iters(k)
    assert all(c.inference_sinkhorn_iters == 3 for c in model.mhc_modules())  # the setting before stays


def test_integer_types_are_accepted_as_python_ints():
    model = unconverged_model()
    model.set_inference_sinkhorn_iters(np.int64(5))
    assert all(type(c.inference_sinkhorn_iters) is int and c.inference_sinkhorn_iters == 5
               for c in model.mhc_modules())


def test_orthostochastic_and_the_baseline_are_refused():
    ortho = unconverged_model(mhc_constraint="orthostochastic")
    with pytest.raises(UserError, match="orthostochastic"):
        ortho.set_inference_sinkhorn_iters(5)
    ortho.set_inference_sinkhorn_iters(None)  # exact is always allowed
    torch.manual_seed(0)
    baseline = GPT(GPTConfig(**SMALL))
    with pytest.raises(UserError, match="no mHC"):
        baseline.set_inference_sinkhorn_iters(5)


def test_the_setting_is_run_state_never_saved():
    model = unconverged_model()
    model.set_inference_sinkhorn_iters(2)
    assert not any("inference" in key for key in model.state_dict())
    fresh = unconverged_model(seed=1)
    fresh.load_state_dict(model.state_dict())
    assert all(c.inference_sinkhorn_iters is None for c in fresh.mhc_modules())


def test_benchmark_runs_on_a_tiny_checkpoint(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from benchmarks import sinkhorn_inference
    out = tmp_path / "si.json"
    sinkhorn_inference.main(["--checkpoint", str(tiny_mhc_checkpoint), "--iters", "1,2,20,50", "--sequences", "2",
                             "--seq-len", "32", "--repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results["per_k"]) == {"1", "2", "20"}  # 50 > the trained 20: skipped
    exact = results["per_k"]["20"]
    assert exact["max_abs_dlogits"] == 0 and exact["mean_kl"] == 0 and exact["greedy_agreement"] == 1
    assert exact["h_res_raw"] == results["exact"]["h_res_raw"]
    for r in results["per_k"].values():
        assert r["h_res_raw"]["row_max"] < TOL and r["h_res_applied"]["row_max"] < TOL
        assert 0 <= r["greedy_agreement"] <= 1 and r["mean_kl"] >= 0 and r["sinkhorn_ms"] > 0
        assert r["time_ratio_range"][0] == r["time_ratio"] == r["time_ratio_range"][1]  # one repeat
    negligible = [int(k) for k, r in results["per_k"].items()
                  if r["max_abs_dlogits"] < results["negligible_max_abs_dlogits"]]
    assert results["recommended_k"] == min(negligible)
