"""Muon, the AdamW/Muon split, LR and momentum schedules."""
import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.newton_schulz import QUINTIC, zeropower_via_newtonschulz
from nanochat.optim import Muon, lr_multiplier, muon_momentum, setup_optimizers


def reference_muon_update(grad, buf, momentum, lr, wd, param):
    """Muon written out plainly for one matrix: Nesterov momentum, 5 quintic NS steps, shape scale, decay."""
    buf = momentum * buf + (1 - momentum) * grad
    g = (1 - momentum) * grad + momentum * buf
    X = g / (g.norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    a, b, c = QUINTIC
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.T
    scale = max(1.0, param.shape[0] / param.shape[1]) ** 0.5
    return param * (1 - lr * wd) - lr * scale * X, buf


@pytest.mark.parametrize("shape", [(16, 32), (48, 16)])
def test_muon_two_steps_match_reference(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(torch.randn(shape))  # same shape: exercises the batched path
    opt = Muon([p, q], lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    ref_p, buf = p.detach().clone(), torch.zeros(shape)
    for _ in range(2):
        grad = torch.randn(shape)
        p.grad, q.grad = grad.clone(), torch.randn(shape)
        opt.step()
        ref_p, buf = reference_muon_update(grad, buf, 0.9, 0.05, 0.1, ref_p)
        assert torch.allclose(p.detach(), ref_p, atol=1e-5)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_parameter_split():
    model = GPT(GPTConfig(sequence_len=8, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    adamw, muon = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                                   weight_decay=0.0)
    adam_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert adam_ids == {id(model.transformer.wte.weight), id(model.lm_head.weight)}
    assert adam_ids.isdisjoint(muon_ids)
    assert adam_ids | muon_ids == {id(p) for p in model.parameters()}
    # AdamW LRs scale with 1/sqrt(width/768): width 32 -> x sqrt(24)
    assert adamw.param_groups[1]["lr"] == pytest.approx(0.2 * (32 / 768) ** -0.5)


def test_lr_schedule_shape():
    n = 100
    lrm = [lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n + 1)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(v == 1.0 for v in lrm[10:81])                             # constant
    assert lrm[100] == pytest.approx(0.1)                                # warmdown ends at final_lr_frac
    assert all(a >= b for a, b in zip(lrm[80:], lrm[81:]))               # monotone warmdown


def test_muon_momentum_ramp():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(10_000) == pytest.approx(0.95)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    G = torch.randn(3, 32, 64)
    X = zeropower_via_newtonschulz(G, dtype=torch.float32)
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic's band (DESIGN.md §6)
    assert torch.all(zeropower_via_newtonschulz(torch.zeros(8, 8), dtype=torch.float32) == 0)
