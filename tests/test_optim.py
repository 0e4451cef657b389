"""Muon (single process and distributed), the AdamW/Muon split, LR and momentum schedules."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.common import UserError

from nanochat.gpt import GPT, GPTConfig
from nanochat.newton_schulz import HANDOVER8, QUINTIC, zeropower_via_newtonschulz
from nanochat.optim import Muon, lr_multiplier, muon_momentum, setup_optimizers

REPO = Path(__file__).resolve().parents[1]


def reference_muon_update(grad, buf, momentum, lr, wd, param, schedule=(QUINTIC,) * 5):
    """Muon written out plainly for one matrix: Nesterov momentum, NS over `schedule`, shape scale, decay."""
    buf = momentum * buf + (1 - momentum) * grad
    g = (1 - momentum) * grad + momentum * buf
    X = g / (g.norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for a, b, c in schedule:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    if tall:
        X = X.T
    scale = max(1.0, param.shape[0] / param.shape[1]) ** 0.5
    return param * (1 - lr * wd) - lr * scale * X, buf


# (Muon's ns_coeffs, ns_steps) -> the per-step triples the reference runs
NS_CASES = {
    "quintic x5 (default)": ((QUINTIC, None), [QUINTIC] * 5),
    "cubic x3": (("cubic", 3), [(3.0, -3.2, 1.2)] * 3),
    "handover8 schedule": (("handover8", None), HANDOVER8),
}


@pytest.mark.parametrize("case", NS_CASES)
@pytest.mark.parametrize("shape", [(16, 32), (48, 16)])
def test_muon_two_steps_match_reference(shape, case):
    (ns_coeffs, ns_steps), schedule = NS_CASES[case]
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(torch.randn(shape))  # same shape: exercises the batched path
    opt = Muon([p, q], lr=0.05, momentum=0.9, weight_decay=0.1, ns_coeffs=ns_coeffs, ns_steps=ns_steps,
               ns_dtype=torch.float32)
    ref_p, buf = p.detach().clone(), torch.zeros(shape)
    for _ in range(2):
        grad = torch.randn(shape)
        p.grad, q.grad = grad.clone(), torch.randn(shape)
        opt.step()
        ref_p, buf = reference_muon_update(grad, buf, 0.9, 0.05, 0.1, ref_p, schedule)
        assert torch.allclose(p.detach(), ref_p, atol=1e-5)


def test_muon_rejects_bad_ns_settings():
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(UserError, match="8 steps but steps=5"):
        Muon(p, ns_coeffs="handover8", ns_steps=5)
    with pytest.raises(UserError, match="unknown NS coefficient preset 'quintik'"):
        Muon(p, ns_coeffs="quintik")


def test_distributed_muon_equals_single_process(tmp_path):
    """2 gloo processes: each orthogonalises its share and all_gathers; must equal the one-process optimizer."""
    out = tmp_path / "dist_muon.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "dist_muon_worker.py"), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["moved"] > 1e-3                 # the optimizer did update every matrix
    assert result["param_diff"] < 1e-6            # sharded == single-process
    assert result["buf_diff"] < 1e-6
    assert result["rank_diff"] == 0.0             # and the two ranks hold identical parameters


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
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic's band (docs/design.md, section 6)
    assert torch.all(zeropower_via_newtonschulz(torch.zeros(8, 8), dtype=torch.float32) == 0)
