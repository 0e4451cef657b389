"""Dynamic mHC: manifold invariants, the fast Sinkhorn, the initialisation (near identity *and* learning), gates,
the stream read-out, equivalences and bad input."""
import math

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, Block, GPTConfig
from nanochat.mhc import (DynamicMHC, MHCConfig, StreamReadout, _sinkhorn_diag_logit, orthostochastic_project,
                          sinkhorn, sinkhorn_log)

SMALL = dict(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
MHC_PARAM_KINDS = {"phi", "alpha", "b_pre", "b_post", "b_res", "gate_logit", "stream_embed", "readout_phi",
                   "readout_alpha", "readout_b"}


def mhc_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict({**SMALL, "mhc_enabled": True, **overrides}))
    model.init_weights()
    return model


def row_col_error(H):
    return max((H.sum(-1) - 1).abs().max().item(), (H.sum(-2) - 1).abs().max().item())


def rotary(T, head_dim):
    inv = 1 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(T).float(), inv)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def mhc_grads(model):
    """Largest |grad| of each kind of mHC parameter, minimised over sub-layers (a parameter kind passes only if it
    learns in every sub-layer)."""
    grads = {}
    for name, p in model.named_parameters():
        if not ("mhc" in name or "stream" in name):
            continue
        kind = name.split(".")[-1]
        kind = f"readout_{kind}" if name.startswith("stream_ends.readout") else kind
        kind = "stream_embed" if name == "stream_ends.embed" else kind
        grads[kind] = min(grads.get(kind, math.inf), p.grad.abs().max().item())
    return grads


# -- the manifold ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("project", [sinkhorn_log, sinkhorn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_doubly_stochastic(project, dtype):
    torch.manual_seed(0)
    logits = torch.randn(256, 4, 4).to(dtype)  # well-scaled logits (docs/design.md, section 6)
    H = project(logits, num_iters=20)
    assert H.dtype == torch.float32  # coefficient math in fp32 whatever the input
    assert (H >= 0).all() and row_col_error(H) < 1e-3


@pytest.mark.parametrize("project", [sinkhorn_log, sinkhorn])
def test_sinkhorn_extreme_logits_stay_finite(project):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 1e4, -1e4]]).expand(2, 3, 3)
    H = project(logits, num_iters=20)
    assert torch.isfinite(H).all() and (H >= 0).all()
    assert (H.sum(-1) - 1).abs().max() < 1e-3  # rows (the last normalisation) are exact


@pytest.mark.parametrize("n, scale, tau", [(2, 1.0, 1.0), (3, 3.0, 1.0), (4, 1.0, 1.0), (4, 8.0, 1.0),
                                           (5, 2.0, 0.5), (4, 0.3, 2.0)])
def test_fast_sinkhorn_equals_log_space_reference(n, scale, tau):
    """The scaling form with its hand-written backward computes the same function and gradient as autograd through
    the log-space reference, including badly converged (large-logit) cases."""
    torch.manual_seed(n)
    logits = (scale * torch.randn(64, n, n) + 2 * torch.eye(n)).requires_grad_()
    upstream = torch.randn(64, n, n)
    ref = sinkhorn_log(logits, 20, tau)
    fast = sinkhorn(logits, 20, tau)
    assert (fast - ref).abs().max() < 2e-6
    g_ref, = torch.autograd.grad(ref, logits, upstream)
    g_fast, = torch.autograd.grad(fast, logits, upstream)
    assert (g_fast - g_ref).abs().max() < 1e-5 * max(1.0, g_ref.abs().max().item())


def test_fast_sinkhorn_gradcheck_float64():
    torch.manual_seed(0)
    logits = (torch.randn(3, 4, 4, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert sinkhorn(logits, 7).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda L: sinkhorn(L, 7, 0.7), (logits,))


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
    # near the identity, at the documented value: diag = 1 - g(1 - d) = 1 - 0.2 * 0.4 = 0.92, give or take the
    # ~1% dynamic perturbation
    assert diag.min() > 0.915 and diag.max() < 0.925, diag
    grads = mhc_grads(model)
    assert set(grads) == MHC_PARAM_KINDS
    for kind, g in grads.items():                     # ... and every parameter, in every sub-layer, learns
        assert g > 1e-8, (kind, g)


def test_public_repo_init_has_zero_gradient_ours_does_not():
    """tau = 0.05 with -8 off-diagonal logits underflows to exactly I with exactly zero gradient (docs/design.md,
    section 5)."""
    bad = torch.full((4, 4), -8.0).fill_diagonal_(0.0).requires_grad_()
    H = sinkhorn_log(bad, num_iters=20, tau=0.05)
    (H * torch.randn(4, 4)).sum().backward()
    assert torch.equal(H, torch.eye(4)) and bad.grad.abs().max() == 0
    m = DynamicMHC(8, num_streams=4)
    (m.get_matrices(torch.randn(1, 3, 32))[0] * torch.randn(4, 4)).sum().backward()
    assert m.b_res.grad.abs().max() > 1e-3 and m.gate_logit.grad.abs() > 1e-3


def test_learned_sinkhorn_starts_well_conditioned():
    """Why the near-identity comes from the gate: Sinkhorn(b_res) at diagonal 0.6 converges in 20 iterations for
    perturbed logits (as the dynamic part makes them), a 0.95 diagonal does not (columns off by > 1e-3)."""
    torch.manual_seed(0)
    noise = 0.1 * torch.randn(1000, 4, 4)
    errors = {d: row_col_error(sinkhorn(torch.eye(4) * _sinkhorn_diag_logit(4, d) + noise, 20)) for d in (0.6, 0.95)}
    assert errors[0.6] < 1e-5 and errors[0.95] > 1e-3


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
    assert max(abs(g - 0.2) for g in model.get_mhc_gates()) > 1e-3  # the learned gates left their init


# -- gates -------------------------------------------------------------------------------------------------------

def test_gate_semantics_and_noise_keep_doubly_stochastic():
    m = DynamicMHC(16, num_streams=4, gate_noise=0.2)
    assert m.gate().item() == pytest.approx(0.2)  # the documented initial gate
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
    m.set_gate(1.0)
    H1, _, _ = m.get_matrices(x)
    m.clear_gate()
    assert m.gate().item() == pytest.approx(0.2)
    H, _, _ = m.get_matrices(x)
    assert torch.allclose(H, 0.8 * torch.eye(4) + 0.2 * H1, atol=1e-6)  # (1 - g) I + g H_res


def test_gpt_gate_api():
    model = mhc_model()
    assert model.get_mhc_gates() == pytest.approx([0.2] * 4)
    model.set_mhc_gate(0.25)
    assert model.get_mhc_gates() == pytest.approx([0.25] * 4)
    model.set_mhc_gates_per_layer([0.0, 1.0])
    assert model.get_mhc_gates() == pytest.approx([0.0, 0.0, 1.0, 1.0])
    model.set_mhc_gates_per_sublayer([0.1, 0.2, 0.3, 0.4])
    assert model.get_mhc_gates() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    model.clear_mhc_gates()
    assert model.get_mhc_gates() == pytest.approx([0.2] * 4)
    for bad, match in [(1.5, r"\[0, 1\]"), (-0.1, r"\[0, 1\]"), (float("nan"), "nan"), (True, "True"),
                       ("0.5", "'0.5'")]:
        with pytest.raises(UserError, match=match):
            model.set_mhc_gate(bad)
    with pytest.raises(UserError, match="expected 2 gate values per layer, got 3"):
        model.set_mhc_gates_per_layer([0.5, 0.5, 0.5])
    with pytest.raises(UserError, match="expected 4 gate values per sub-layer, got 2"):
        model.set_mhc_gates_per_sublayer([0.5, 0.5])
    with pytest.raises(UserError, match=r"gate\[1\]"):
        model.set_mhc_gates_per_layer([0.5, 2.0])
    assert model.get_mhc_gates() == pytest.approx([0.2] * 4)  # a rejected vector changes nothing
    baseline = GPT(GPTConfig(**SMALL))
    for call in (lambda: baseline.set_mhc_gate(0.5), lambda: baseline.set_mhc_gates_per_layer([0.5, 0.5]),
                 lambda: baseline.set_mhc_gates_per_sublayer([0.5] * 4), baseline.get_mhc_gates):
        with pytest.raises(UserError, match="no mHC"):
            call()


def relative_change(model, idx, ref, gates):
    model.set_mhc_gates_per_sublayer(gates)
    return ((model(idx) - ref).abs().max() / ref.abs().max()).item()


def test_gate_changes_the_model_output_at_every_sublayer():
    """Each of the 2L gates is a live knob for the controller (with the learned read-out, the last one too)."""
    model = mhc_model().eval()
    idx = torch.randint(0, 256, (2, 32))
    ref = model(idx)
    for j in range(4):
        assert relative_change(model, idx, ref, [1.0 if i == j else 0.2 for i in range(4)]) > 1e-3, j


def test_capture_is_off_by_default():
    model = mhc_model()
    model(torch.randint(0, 256, (1, 8)))
    assert all(not m.captured for m in model.mhc_modules())
    model.capture_mhc(True)
    model(torch.randint(0, 256, (1, 8)))
    shapes = [tuple(c["H_res"].shape) for c in model.captured_mhc()]
    assert shapes == [(1, 8, 4, 4)] * 4


# -- the stream read-out ---------------------------------------------------------------------------------------

def test_sum_readout_makes_the_last_h_res_inert():
    """The reason for the learned read-out: under HC's plain sum, sum_i (H x)_i = sum_j x_j for any
    column-stochastic H, so the last sub-layer's H_res and gate cannot change the output (or get a gradient)."""
    model = mhc_model(mhc_readout="sum").eval()
    assert not hasattr(model, "stream_readout")
    idx = torch.randint(0, 256, (2, 32))
    ref = model(idx)
    assert relative_change(model, idx, ref, [0.2, 0.2, 0.2, 1.0]) < 1e-5   # fp32 rounding only
    assert relative_change(model, idx, ref, [0.2, 0.2, 1.0, 0.2]) > 1e-4   # earlier sub-layers still matter


def test_learned_readout_starts_as_a_weighted_sum():
    torch.manual_seed(0)
    r = StreamReadout(8, 4, index=6)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        r.alpha.zero_()
    w = torch.sigmoid(torch.tensor([0.0, 0.0, 1.0, 0.0]))  # preference on stream 6 mod 4 = 2
    assert torch.allclose(r(x), (w[:, None] * x.view(2, 3, 4, 8)).sum(-2), atol=1e-6)


# -- equivalences ------------------------------------------------------------------------------------------------

def test_one_stream_block_equals_plain_residual_block():
    cfg = GPTConfig(**SMALL, mhc=MHCConfig(enabled=True, num_streams=1))
    torch.manual_seed(0)
    plain = Block(GPTConfig(**SMALL), 0)
    wrapped = Block(cfg, 0)
    for lin in (plain.attn.c_proj, plain.mlp.c_proj):
        torch.nn.init.normal_(lin.weight, std=0.05)
    wrapped.load_state_dict(plain.state_dict(), strict=False)
    for m in (wrapped.mhc_attn, wrapped.mhc_mlp):
        with torch.no_grad():
            m.alpha.zero_()  # the dynamic part off: H_post = 2 sigmoid(0) = 1
        m.set_gate(0.0)
    x = torch.randn(2, 16, 64)
    cos_sin = rotary(16, 32)
    assert torch.allclose(wrapped(x, cos_sin), plain(x, cos_sin), atol=1e-6)


def test_gpt_with_one_stream_equals_baseline():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**SMALL))
    base.init_weights()
    mhc = GPT(GPTConfig(**SMALL, mhc=MHCConfig(enabled=True, num_streams=1)))
    mhc.init_weights()
    mhc.load_state_dict(base.state_dict(), strict=False)
    for m in mhc.mhc_modules():
        with torch.no_grad():
            m.alpha.zero_()
    mhc.set_mhc_gate(0.0)
    idx = torch.randint(0, 256, (2, 32))
    assert torch.allclose(mhc(idx), base(idx), atol=1e-6)


def test_static_variant_matches_its_own_definition():
    """dynamic=False: one set of matrices from the biases alone, shared by every token."""
    torch.manual_seed(0)
    m = DynamicMHC(8, num_streams=4, dynamic=False)
    assert m.phi is None and m.alpha is None
    x = torch.randn(2, 5, 32)
    H_res, H_pre, H_post = m.get_matrices(x)
    expected_res = 0.8 * torch.eye(4) + 0.2 * sinkhorn_log(m.b_res.detach(), 20)
    assert torch.allclose(H_res, expected_res.expand(2, 5, 4, 4), atol=1e-6)
    assert torch.allclose(H_pre, torch.sigmoid(m.b_pre.detach()).expand(2, 5, 4))
    W = torch.randn(8, 8)
    out = m(x, lambda h: h @ W)
    xs = x.view(2, 5, 4, 8)
    y = torch.einsum("btic,bti->btc", xs, H_pre) @ W
    ref = torch.einsum("btij,btjc->btic", H_res, xs) + H_post[..., None] * y[..., None, :]
    assert torch.allclose(out, ref.reshape(2, 5, 32), atol=1e-5)


def test_dynamic_forward_matches_the_paper_equations():
    """The fast forward (norm after the projection, scaling-form Sinkhorn, batched matmuls) against Eq. 7-9 written
    out directly with einsum, the log-space Sinkhorn and F.rms_norm."""
    torch.manual_seed(0)
    n, C = 4, 8
    m = DynamicMHC(C, num_streams=n, layer_idx=3)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([0.5, -0.3, 0.7]))
        m.b_res.add_(0.3 * torch.randn(n, n))
    x = torch.randn(2, 5, n * C)
    W = torch.randn(C, C)
    v = torch.nn.functional.rms_norm(x, (n * C,))
    logits = v @ m.phi.detach()
    H_pre = torch.sigmoid(0.5 * logits[..., :n] + m.b_pre.detach())
    H_post = 2 * torch.sigmoid(-0.3 * logits[..., n:2 * n] + m.b_post.detach())
    H_res = sinkhorn_log(0.7 * logits[..., 2 * n:].reshape(2, 5, n, n) + m.b_res.detach(), 20)
    H_res = 0.8 * torch.eye(n) + 0.2 * H_res
    xs = x.view(2, 5, n, C)
    y = torch.einsum("btic,bti->btc", xs, H_pre) @ W
    ref = torch.einsum("btij,btjc->btic", H_res, xs) + H_post[..., None] * y[..., None, :]
    with torch.no_grad():
        out = m(x, lambda h: h @ W)
    assert torch.allclose(out, ref.reshape(2, 5, n * C), atol=1e-5)
    got = m.get_matrices(x)
    for a, b in zip(got, (H_res, H_pre, H_post)):
        assert torch.allclose(a, b, atol=1e-5)


def test_bf16_autocast_keeps_streams_and_coefficients_fp32():
    model = mhc_model()
    idx = torch.randint(0, 256, (2, 16))
    model.capture_mhc(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    for c in model.captured_mhc():
        assert c["H_res"].dtype == torch.float32 and row_col_error(c["H_res"]) < 1e-3
    assert all(torch.isfinite(p.grad).all() for p in model.mhc_parameters())


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
    r = StreamReadout(3, 3, index=1).double()
    with torch.no_grad():
        r.alpha.fill_(0.5)
    assert torch.autograd.gradcheck(r, (x,), eps=1e-6, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_streams=0), "mhc_num_streams"),
    (dict(num_streams=2.5), "mhc_num_streams"),
    (dict(sinkhorn_iters=0), "mhc_sinkhorn_iters"),
    (dict(sinkhorn_tau=0.0), "mhc_sinkhorn_tau"),
    (dict(sinkhorn_tau=-1.0), "mhc_sinkhorn_tau"),
    (dict(sinkhorn_tau=float("inf")), "mhc_sinkhorn_tau"),
    (dict(constraint="birkhoff"), "mhc_constraint"),
    (dict(res_init_diag=0.2), "mhc_res_init_diag"),
    (dict(gate_init=1.0), "mhc_gate_init"),
    (dict(gate_noise=1.5), "mhc_gate_noise"),
    (dict(constraint="orthostochastic", ns_coeffs="nanogpt-medium"), "nanogpt-medium"),
    (dict(constraint="orthostochastic", ns_coeffs=[(1.0, 2.0)]), "3 finite numbers"),
])
def test_bad_mhc_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        DynamicMHC(8, **kwargs)


@pytest.mark.parametrize("overrides, match", [
    (dict(mhc_readout="mean"), "mhc_readout"),
    (dict(mhc_num_streams=0), "mhc_num_streams"),
    (dict(mhc_stream_embed_std=-1.0), "mhc_stream_embed_std"),
    (dict(mhc_constraint="orthostochastic", mhc_ns_coeffs="[[3, -3.2]]"), "3 finite numbers"),
])
def test_bad_mhc_model_config(overrides, match):
    with pytest.raises(UserError, match=match):
        GPT(GPTConfig.from_dict({**SMALL, "mhc_enabled": True, **overrides}))


@pytest.mark.slow
def test_torch_compile_matches_eager_without_graph_breaks(tmp_path, monkeypatch):
    """The GPU path compiles the model: the custom autograd functions (Sinkhorn, read-out, mixing) must trace into
    one graph and give eager's loss and gradients. ~2 min on a 2-core CPU (inductor's C++ backend)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    import torch._dynamo
    torch._dynamo.reset()
    eager, compiled = mhc_model(), mhc_model()
    idx = torch.randint(0, 256, (2, 32))
    explanation = torch._dynamo.explain(eager)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    loss_eager = eager(idx, idx)
    loss_eager.backward()
    loss_compiled = torch.compile(compiled)(idx, idx)
    loss_compiled.backward()
    assert abs(loss_eager.item() - loss_compiled.item()) < 1e-5
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        ref = grads[name].grad
        assert (p.grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-9, name


# -- the gate API an RL actor calls, per-example gates, gate-range training ------------------------------------

def test_gate_api_takes_numpy_and_tensor_values():
    """A gymnasium Box action is a numpy float32 array; 0-d arrays, numpy scalars and 0-d tensors are numbers too."""
    import gymnasium
    import numpy as np
    model = mhc_model()
    for value in (np.float32(0.3), np.array(0.3, dtype=np.float32), torch.tensor(0.3), np.float64(0.3), 0.3):
        model.set_mhc_gate(value)
        assert model.get_mhc_gates() == pytest.approx([0.3] * 4), type(value)
    box = gymnasium.spaces.Box(0, 1, shape=(2,), dtype=np.float32)
    box.seed(0)
    action = box.sample()
    model.set_mhc_gates_per_layer(action)
    assert model.get_mhc_gates() == pytest.approx([action[0], action[0], action[1], action[1]])
    model.set_mhc_gates_per_sublayer(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert model.get_mhc_gates() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    for bad, match in [(np.array([0.5, np.nan], np.float32), r"gate\[1\]"), (np.float32(1.5), r"\[0, 1\]"),
                       (torch.tensor([0.5, -1.0]), r"gate\[1\]"), (np.array([True, False]), "number")]:
        with pytest.raises(UserError, match=match):
            model.set_mhc_gates_per_layer(bad)
    with pytest.raises(UserError, match="per layer, got 3"):
        model.set_mhc_gates_per_layer(np.zeros(3, np.float32))
    with pytest.raises(UserError, match=r"shape \(2, 2, 2\)"):
        model.set_mhc_gate(np.zeros((2, 2, 2)))


def test_per_example_gates_equal_each_example_alone():
    """One batch with a gate vector per row == each row run alone with its own gates (forward and per layer)."""
    model = mhc_model(out_proj_init_scale=1.0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # O(1) logits: a 1e-5 agreement then means something
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    gates = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    model.set_mhc_gates_per_sublayer(gates)
    batched = model(idx)
    assert model.mhc_gate_tensor().shape == (3, 4)
    for b in range(3):
        model.set_mhc_gates_per_sublayer(gates[b])
        alone = model(idx[b:b + 1])
        assert (batched[b] - alone[0]).abs().max() < 1e-5
    # the rows really differ: one shared gate vector gives another result for at least one row
    model.set_mhc_gates_per_sublayer(gates[0])
    assert (model(idx) - batched).abs().max() > 1e-3
    # per-example global gates ([B]) and per-layer vectors ([B, L]) take the same path
    g = torch.tensor([0.0, 0.5, 1.0])
    model.set_mhc_gate(g)
    batched = model(idx)
    for b in range(3):
        model.set_mhc_gate(float(g[b]))
        assert (batched[b] - model(idx[b:b + 1])[0]).abs().max() < 1e-5
    model.set_mhc_gate(g)
    with pytest.raises(UserError, match="3 gates set for a batch of 2 rows"):
        model(idx[:2])


@pytest.mark.parametrize("dynamic", [True, False])
def test_per_example_gates_with_kv_cache_generation(dynamic):
    """Batched generation (left padding + KV cache) with per-example gates == each prompt generated alone."""
    from nanochat.engine import Engine
    model = mhc_model(out_proj_init_scale=1.0, mhc_dynamic=dynamic).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # O(1) logits so that the gates visibly change the tokens
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    gates = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.1, 0.6]])
    engine = Engine(model)
    model.set_mhc_gates_per_sublayer(gates)
    batched = engine.generate(prompts, 12, return_logits=True)
    for b, p in enumerate(prompts):
        model.set_mhc_gates_per_sublayer(gates[b])
        alone = engine.generate([p], 12, return_logits=True)[0]
        assert batched[b].tokens == alone.tokens
        assert max((x - y).abs().max().item() for x, y in zip(batched[b].logits, alone.logits)) < 1e-5


def test_gate_override_is_run_state_never_saved(tmp_path):
    from nanochat.checkpoint import load_model, save_checkpoint
    model = mhc_model()
    model.set_mhc_gates_per_sublayer([0.9, 0.9, 0.9, 0.9])
    sd = model.state_dict()
    assert not any("gate_override" in k for k in sd)
    meta = dict(model_config=model.config.to_dict())
    path = save_checkpoint(str(tmp_path), 1, model, [], meta)
    loaded, _ = load_model(path)
    assert loaded.get_mhc_gates() == pytest.approx([0.2] * 4)  # the learned gates, not the override
    # a checkpoint written when the override was a buffer still loads (the stale entry is dropped)
    legacy = {**sd, "transformer.h.0.mhc_attn.gate_override": torch.tensor(0.9)}
    fresh = mhc_model(seed=1)
    fresh.load_state_dict(legacy)
    assert fresh.get_mhc_gates() == pytest.approx([0.2] * 4)


def test_gate_sampling_covers_the_range_and_keeps_the_gate_learning():
    """gate_sample_frac f: a fraction f of the rows draws g ~ U[0, 1]; the others keep the learned gate, which
    still gets a gradient from them. Eval mode never samples."""
    torch.manual_seed(0)
    m = DynamicMHC(8, num_streams=4, gate_sample_frac=0.5).train()
    g = m._row_gates(4000)
    sampled = (g - 0.2).abs() > 1e-6
    assert 0.45 < sampled.float().mean().item() < 0.55
    assert g.min().item() < 0.01 and g.max().item() > 0.99 and (0 <= g).all() and (g <= 1).all()
    x = torch.randn(64, 3, 32)
    out = m(x, lambda h: h)
    out.square().sum().backward()
    assert m.gate_logit.grad.abs().item() > 0  # learned from the unsampled rows
    every = DynamicMHC(8, num_streams=4, gate_sample_frac=1.0).train()
    every(x, lambda h: h).square().sum().backward()
    assert every.gate_logit.grad.item() == 0.0  # every row sampled: the learned gate is out of the graph
    m.eval()
    assert m._row_gates(10).dim() == 0  # eval: the learned gate, one for the batch
    # in a GPT: the flag reaches every sub-layer; a bad value is named
    model = mhc_model(mhc_gate_sample_frac=0.25)
    assert all(mod.gate_sample_frac == 0.25 for mod in model.mhc_modules())
    with pytest.raises(UserError, match="mhc_gate_sample_frac"):
        mhc_model(mhc_gate_sample_frac=1.5)


def test_bf16_autocast_saves_no_fp32_branch_tensors():
    """Under bf16 autocast an mHC sub-layer keeps, of the [B, T, C] branch-sized tensors, only bf16 ones for
    backward: the read-out is normalised in place of the branch's pre-norm and never stored, the branch output y
    is saved in its own dtype. fp32 is kept where the math needs it: the streams, the coefficients (Sinkhorn), and
    once per model the embedding and the read-out before the final norm (the inputs of the two RMSNorms)."""
    model = mhc_model()
    idx = torch.randint(0, 256, (2, 16))
    N, C = 2 * 16, model.config.n_embd
    saved = []

    def pack(t):
        saved.append((t.numel(), t.shape[-1] if t.dim() else 0, t.dtype, t.untyped_storage().data_ptr()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    branch_sized = [dtype for numel, last, dtype, _ in dict.fromkeys(saved) if numel == N * C and last == C]
    assert branch_sized.count(torch.float32) == 2, branch_sized  # the embedding and the final read-out
    assert branch_sized.count(torch.bfloat16) >= 2 * model.config.n_layer  # the branch inputs / outputs, in bf16
