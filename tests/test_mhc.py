"""Dynamic mHC: manifold invariants, the initialisation (near identity *and* learning), gates, equivalences."""
import math

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, Block, GPTConfig
from nanochat.mhc import DynamicMHC, orthostochastic_project, sinkhorn_log

SMALL = dict(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def mhc_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, "mhc_enabled": True, **overrides}))
    model.init_weights()
    return model


def row_col_error(H):
    return max((H.sum(-1) - 1).abs().max().item(), (H.sum(-2) - 1).abs().max().item())


# -- the manifold ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_doubly_stochastic(dtype):
    torch.manual_seed(0)
    logits = torch.randn(256, 4, 4).to(dtype)  # well-scaled logits (DESIGN.md §6)
    H = sinkhorn_log(logits, num_iters=20)
    assert H.dtype == torch.float32  # coefficient math in fp32 whatever the input
    assert (H >= 0).all() and row_col_error(H) < 1e-3


def test_sinkhorn_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 1e4, -1e4]]).expand(2, 3, 3)
    H = sinkhorn_log(logits, num_iters=20)
    assert torch.isfinite(H).all() and (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-3  # rows (the last normalisation) are exact


def test_orthostochastic_handover8():
    torch.manual_seed(0)
    logits = torch.randn(128, 4, 4)
    H = orthostochastic_project(logits, "handover8")
    assert (H >= 0).all() and row_col_error(H) < 2e-3


# -- the initialisation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint", ["sinkhorn", "orthostochastic"])
def test_init_near_identity_and_every_parameter_learns(constraint):
    model = mhc_model(mhc_constraint=constraint)
    x = torch.randint(0, 256, (4, 32))
    model.capture_mhc(True)
    model(x, x).backward()
    diag = torch.stack([c["H_res"].diagonal(dim1=-2, dim2=-1).mean() for c in model.captured_mhc()])
    assert diag.mean() >= 0.9 and diag.min() > 0.85  # near the identity ...
    grads = {}
    for name, p in model.named_parameters():
        if "mhc" in name or "stream_embed" in name:
            kind = name.split(".")[-1]
            grads[kind] = min(grads.get(kind, math.inf), p.grad.abs().max().item())
    assert set(grads) == {"phi", "alpha", "b_pre", "b_post", "b_res", "gate_logit", "stream_embed"}
    for kind in ("phi", "alpha", "b_pre", "b_post", "b_res", "stream_embed"):  # ... and far from saturation
        assert grads[kind] > 1e-8, (kind, grads[kind])
    # the gate scales the (small, 5%) departure of H_res from I, so its step-0 gradient is second order
    assert grads["gate_logit"] > 0


def test_public_repo_init_has_zero_gradient_ours_does_not():
    """tau = 0.05 with -8 off-diagonal logits underflows to exactly I with exactly zero gradient (DESIGN.md §5)."""
    bad = torch.full((4, 4), -8.0).fill_diagonal_(0.0).requires_grad_()
    H = sinkhorn_log(bad, num_iters=20, tau=0.05)
    (H * torch.randn(4, 4)).sum().backward()
    assert torch.equal(H, torch.eye(4)) and bad.grad.abs().max() == 0
    m = DynamicMHC(8, num_streams=4)
    H = sinkhorn_log(m.b_res, 20, m.sinkhorn_tau)
    (H * torch.randn(4, 4)).sum().backward()
    assert H.diagonal().mean() > 0.9 and m.b_res.grad.abs().max() > 1e-3


def test_mhc_model_moves_h_res_when_trained():
    from nanochat.optim import setup_optimizers
    model = mhc_model()
    fixed = torch.randint(0, 256, (4, 32))
    model.capture_mhc(True)
    model(fixed)
    before = [c["H_res"].clone() for c in model.captured_mhc()]
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.float32)
    torch.manual_seed(1)
    for _ in range(50):
        x = torch.randint(0, 256, (4, 32))
        loss = model(x, torch.roll(x, 1, dims=1))  # a learnable task: predict the previous token
        assert torch.isfinite(loss)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad()
    model(fixed)
    moved = max((c["H_res"] - b).abs().max().item() for c, b in zip(model.captured_mhc(), before))
    assert moved > 1e-2
    # once the streams differ, the gate's gradient is first order and the learned gates leave their init
    x = torch.randint(0, 256, (4, 32))
    model(x, torch.roll(x, 1, dims=1)).backward()
    assert min(m.gate_logit.grad.abs().item() for m in model.mhc_modules()) > 1e-8
    assert max(abs(g - 0.9) for g in model.get_mhc_gates()) > 1e-3


# -- gates -------------------------------------------------------------------------------------------------------

def test_gate_semantics_and_noise_keep_doubly_stochastic():
    m = DynamicMHC(16, num_streams=4, gate_noise=0.2)
    assert m.gate().item() == pytest.approx(0.9)  # the documented initial gate
    x = torch.randn(2, 5, 64)
    m.train()
    torch.manual_seed(0)
    for g in torch.rand(20).tolist() + [0.0, 1.0]:
        m.set_gate(g)
        H, _, _ = m.get_matrices(x)
        assert (H >= 0).all() and row_col_error(H) < 1e-3
    m.eval()
    m.set_gate(0.0)
    H, _, _ = m.get_matrices(x)
    assert torch.equal(H, torch.eye(4).expand_as(H))  # g = 0: identity mixing exactly
    m.clear_gate()
    assert m.gate().item() == pytest.approx(0.9)


def test_gpt_gate_api():
    model = mhc_model()
    assert model.get_mhc_gates() == pytest.approx([0.9] * 4)
    model.set_mhc_gate(0.25)
    assert model.get_mhc_gates() == pytest.approx([0.25] * 4)
    model.set_mhc_gates_per_layer([0.0, 1.0])
    assert model.get_mhc_gates() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    model.set_mhc_gates_per_sublayer([0.1, 0.2, 0.3, 0.4])
    assert model.get_mhc_gates() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    model.clear_mhc_gates()
    assert model.get_mhc_gates() == pytest.approx([0.9] * 4)
    for bad, match in [(1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]"), (float("nan"), "nan")]:
        with pytest.raises(UserError, match=match):
            model.set_mhc_gate(bad)
    with pytest.raises(UserError, match="expected 2 gate values, got 3"):
        model.set_mhc_gates_per_layer([0.5, 0.5, 0.5])
    with pytest.raises(UserError, match="expected 4 gate values, got 2"):
        model.set_mhc_gates_per_sublayer([0.5, 0.5])
    with pytest.raises(UserError, match=r"gate\[1\]"):
        model.set_mhc_gates_per_layer([0.5, 2.0])
    baseline = GPT(GPTConfig(**SMALL))
    with pytest.raises(UserError, match="no mHC"):
        baseline.set_mhc_gate(0.5)


def test_capture_is_off_by_default():
    model = mhc_model()
    model(torch.randint(0, 256, (1, 8)))
    assert all(not m.captured for m in model.mhc_modules())
    model.capture_mhc(True)
    model(torch.randint(0, 256, (1, 8)))
    shapes = [tuple(c["H_res"].shape) for c in model.captured_mhc()]
    assert shapes == [(1, 8, 4, 4)] * 4


# -- equivalences ------------------------------------------------------------------------------------------------

def test_one_stream_block_equals_plain_residual_block():
    cfg = GPTConfig(**SMALL, mhc_enabled=True, mhc_num_streams=1)
    torch.manual_seed(0)
    plain = Block(GPTConfig(**SMALL), 0)
    wrapped = Block(cfg, 0)
    wrapped.load_state_dict(plain.state_dict(), strict=False)
    for m in (wrapped.mhc_attn, wrapped.mhc_mlp):
        with torch.no_grad():
            m.alpha.zero_()  # the dynamic part off: H_post = 2 sigmoid(0) = 1
        m.set_gate(0.0)
    for lin in (plain.attn.c_proj, plain.mlp.c_proj):
        torch.nn.init.normal_(lin.weight, std=0.05)
    wrapped.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 16, 64)
    head_dim = 32
    inv = 1 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(16).float(), inv)
    cos_sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]
    assert torch.allclose(wrapped(x, cos_sin), plain(x, cos_sin), atol=1e-6)


def test_gpt_with_one_stream_equals_baseline():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**SMALL))
    base.init_weights()
    mhc = GPT(GPTConfig(**SMALL, mhc_enabled=True, mhc_num_streams=1))
    mhc.init_weights()
    mhc.load_state_dict(base.state_dict(), strict=False)
    for m in mhc.mhc_modules():
        with torch.no_grad():
            m.alpha.zero_()
    mhc.set_mhc_gate(0.0)
    idx = torch.randint(0, 256, (2, 32))
    assert torch.allclose(mhc(idx), base(idx), atol=1e-6)


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = DynamicMHC(3, num_streams=3, sinkhorn_iters=5).double()
    with torch.no_grad():
        m.alpha.fill_(0.5)  # make the dynamic path matter
    W = torch.randn(3, 3, dtype=torch.float64)
    x = torch.randn(1, 2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: m(x, lambda h: torch.tanh(h @ W)), (x,), eps=1e-6, atol=1e-5)
    # and with respect to every parameter (phi, alpha, biases, gate), through a functional call
    from torch.func import functional_call
    names = [n for n, _ in m.named_parameters()]

    def g(*ps):
        return functional_call(m, dict(zip(names, ps)), (x.detach(), lambda h: torch.tanh(h @ W)))

    inputs = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(g, inputs, eps=1e-6, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_streams=0), "mhc_num_streams"),
    (dict(sinkhorn_iters=0), "mhc_sinkhorn_iters"),
    (dict(sinkhorn_tau=0.0), "mhc_sinkhorn_tau"),
    (dict(constraint="birkhoff"), "mhc_constraint"),
    (dict(gate_init=1.0), "mhc_gate_init"),
    (dict(gate_noise=1.5), "mhc_gate_noise"),
    (dict(constraint="orthostochastic", ns_coeffs="nanogpt-medium"), "nanogpt-medium"),
    (dict(constraint="orthostochastic", ns_coeffs=[(1.0, 2.0)]), "3 finite numbers"),
])
def test_bad_mhc_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        DynamicMHC(8, **kwargs)
