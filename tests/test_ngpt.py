"""nGPT (--arch ngpt): weights and hidden states on the unit sphere, the (lazy) projection and its count, training,
exact resume, evaluation, KV-cache decoding, FLOPs, bad input."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from nanochat.common import UserError
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig
from nanochat.optim import NGPT_OTHER_LR_FRAC, setup_ngpt_optimizers

# the tiny model of tests/test_train.py (depth 2, width 64, seq 64), as nGPT
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
        "4", "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--compile", "false", "--arch", "ngpt"]
VOCAB = 256


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # conftest.py: tiny models only lose from threads on a busy 2-core box
    yield


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, arch="ngpt")
    model = GPT(GPTConfig(**{**cfg, **overrides}))
    model.init_weights()
    return model


def max_row_drift(model: GPT) -> float:
    """max | ||row|| - 1 | over every vector nGPT keeps on the sphere."""
    return max((w.norm(dim=dim) - 1).abs().max().item() for w, dim in model.architecture.sphere_matrices(model))


def read_metrics(results, tag) -> list[dict]:
    with open(results / tag / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_train(argv):
    from scripts.base_train import main
    main(argv)


# --------------------------------------------------------------------------------------------------------------
# the sphere

def test_init_and_projection_put_every_row_on_the_sphere():
    model = make_model()
    # wte, lm_head; q, k, v, c_fc and the two output projections per layer
    assert len(model.architecture.sphere_matrices(model)) == 2 + 6 * 2
    assert max_row_drift(model) < 1e-5  # projected at init
    opts = setup_ngpt_optimizers(model, lr=1e-3)
    x = torch.randint(0, VOCAB, (4, 32))
    model(x, x).backward()
    for opt in opts:
        opt.step()
    assert max_row_drift(model) > 1e-4  # the step moved the rows off the sphere: the check below is not vacuous
    model.project_weights()
    assert max_row_drift(model) < 1e-5
    # output projections are normalised along d_model = their rows' axis 0, the others along axis 1
    c_proj = model.transformer.h[0].attn.c_proj.weight
    torch.testing.assert_close(c_proj.norm(dim=0), torch.ones(64), atol=1e-5, rtol=0)


# per-step bound on a row's change at width 64: AdamW lr * sqrt(C) = 1e-3 * 8; Muon lr * sqrt(4) = 0.02 * 2 (c_fc)
@pytest.mark.parametrize("optimizer, per_step", [("adamw", 1e-3 * 8), ("muon", 0.02 * 2)])
def test_lazy_projection_drift_is_bounded(optimizer, per_step):
    """Between projections the rows drift. Bound: AdamW moves every entry by at most ~lr per step, so a row of C
    entries moves by at most lr * sqrt(C) (triangle inequality); Muon's update has spectral norm
    lr * sqrt(max(1, rows/cols)) (2 for c_fc), which bounds each row's change. After k - 1 = 6 unprojected steps
    (lazy_proj_freq 7) at width 64 the drift must stay below 6 x that per-step bound; measured: AdamW 0.031
    (bound 0.048), Muon 0.058 (bound 0.24). Then one projection puts everything back within 1e-5."""
    model = make_model()
    opts = setup_ngpt_optimizers(model, lr=1e-3, optimizer=optimizer, matrix_lr=0.02, ns_dtype=torch.float32)
    x = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    drifts = []
    for _ in range(6):
        model(x, x).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        drifts.append(max_row_drift(model))
    assert 0 < drifts[-1] <= 6 * per_step, drifts
    assert drifts == sorted(drifts)  # it accumulates: the reason to project at all
    model.project_weights()
    assert max_row_drift(model) < 1e-5


def test_hidden_states_are_unit_after_every_block():
    model = make_model()
    with torch.no_grad():  # move the weights off the sphere, as between lazy projections
        for w, _ in model.architecture.sphere_matrices(model):
            w.mul_(1.3)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.transformer.h]
    x = torch.randint(0, VOCAB, (2, 32))
    h = model.hidden_states(x)
    for hk in hooks:
        hk.remove()
    assert len(outs) == model.config.n_layer
    for o in outs + [h]:
        torch.testing.assert_close(o.norm(dim=-1), torch.ones(2, 32), atol=1e-5, rtol=0)


def test_forward_backward_reaches_every_parameter_and_scales_reparametrised():
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 32))
    loss = model(x, x)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing
    # stored = scale, effective = init: alpha 0.05 per dimension, s_z = logit_scale, s_qk = s_u = 1
    block = model.transformer.h[0]
    torch.testing.assert_close(block.alpha_attn(), torch.full((64,), 0.05))
    torch.testing.assert_close(model.s_z(), torch.full((VOCAB,), 10.0))
    assert block.alpha_attn.weight[0].item() == pytest.approx(64 ** -0.5)
    assert not any("norm" in n for n, _ in model.named_parameters())
    # logits are s_z * cosines: bounded by s_z (no softcap)
    assert model(x).abs().max() <= 10.0 + 1e-4
    scalar = make_model(scalar_alpha=True)
    assert scalar.transformer.h[1].alpha_mlp().shape == (1,)


def test_optimizer_groups():
    model = make_model()
    adamw, = setup_ngpt_optimizers(model, lr=2e-3)
    lrs = sorted(g["lr"] for g in adamw.param_groups)
    assert lrs == pytest.approx([NGPT_OTHER_LR_FRAC * 2e-3, 2e-3])
    assert all(g["weight_decay"] == 0 for g in adamw.param_groups)
    adamw, muon = setup_ngpt_optimizers(model, lr=2e-3, optimizer="muon", matrix_lr=0.01)
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.transformer.wte.weight) not in on_muon and id(model.lm_head.weight) not in on_muon
    assert len(on_muon) == 6 * model.config.n_layer


def test_flops_estimate_equals_torch_flop_counter():
    """ReLU^2 is kept, so nGPT's matrix products are the baseline's; the scales are elementwise (not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = make_model()
    T = model.config.sequence_len
    x = torch.randint(0, VOCAB, (2, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x).backward()
    assert model.estimate_flops_per_token() == counter.get_total_flops() / (2 * T)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=64))
    assert gpt.estimate_flops_per_token() == model.estimate_flops_per_token()


@pytest.mark.parametrize("n_kv_head", [4, 2], ids=["mha", "gqa"])
def test_kv_cache_equals_full_forward(n_kv_head):
    model = make_model(n_kv_head=n_kv_head, logit_scale=30.0).eval()  # logits up to 30: cache bugs show
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    ids, ref_tokens, ref_logits = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(40):  # 47 positions: past the 32-token training context
            last = model(ids)[0, -1]
            ref_logits.append(last)
            ref_tokens.append(int(last.argmax()))
            ids = torch.cat([ids, torch.tensor([[ref_tokens[-1]]])], dim=1)
    out = Engine(model).generate([prompt], max_new_tokens=40, use_cache=True, return_logits=True)[0]
    assert out.tokens == ref_tokens
    for step, (a, b) in enumerate(zip(out.logits, ref_logits)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=f"step {step}")
    assert len(set(ref_tokens)) > 3


def test_old_configs_load_as_gpt():
    cfg = GPTConfig.from_dict(dict(sequence_len=8, vocab_size=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    assert cfg.arch == "gpt" and cfg.logit_scale > 0
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.project_weights()  # the baseline keeps no weights on a sphere: a no-op
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------------------------
# training

@pytest.mark.parametrize("freq, optimizer", [(1, "adamw"), (7, "adamw"), (7, "muon")])
def test_training_lowers_loss_and_counts_projections(tiny_base_dir, tmp_path, freq, optimizer):
    """20 steps; `projections` = 1 (init) + one per lazy_proj_freq-th step: 21 at freq 1, 1 + 2 = 3 at freq 7."""
    results = tmp_path / "results"
    tag = f"ngpt{freq}{optimizer}"
    run_train(TINY + ["--num-iterations", "20", "--lazy-proj-freq", str(freq), "--ngpt-optimizer", optimizer,
                      "--ngpt-lr", "3e-3", "--model-tag", tag, "--results-dir", str(results)])
    steps = [r for r in read_metrics(results, tag) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert [r["projections"] for r in steps] == [1 + s // freq for s in range(1, 21)]
    assert steps[-1]["projections"] == {1: 21, 7: 3}[freq]
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    config = json.loads((results / tag / "config.json").read_text())
    assert config["model"]["arch"] == "ngpt"
    # the final checkpoint: projected after step 20 at freq 1; 20 - 14 = 6 steps off the sphere at freq 7
    from nanochat.checkpoint import load_model
    model, _ = load_model(str(tiny_base_dir.base_dir / "checkpoints" / tag / "step_000020"), "cpu")
    drift = max_row_drift(model)
    assert drift < 1e-5 if freq == 1 else 1e-4 < drift < 6 * 3e-3 * 64 ** 0.5, drift


def test_resume_equals_straight_run_and_base_eval(tiny_base_dir, tmp_path):
    """6 straight steps == 3 + resume + 3, with lazy projection every 2 steps (the step-3 checkpoint holds weights
    one step off the sphere); then base_eval on the checkpoint agrees with the in-training val bpb."""
    results = tmp_path / "results"
    common = TINY + ["--num-iterations", "6", "--save-every", "3", "--keep-checkpoints", "3", "--lazy-proj-freq",
                     "2", "--results-dir", str(results), "--model-tag", "ngpt_resume"]
    run_train(common)
    straight = [r for r in read_metrics(results, "ngpt_resume") if "loss" in r]
    shutil.rmtree(tiny_base_dir.base_dir / "checkpoints" / "ngpt_resume" / "step_000006")
    run_train(common + ["--resume"])
    resumed = [r for r in read_metrics(results, "ngpt_resume") if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), a["step"]
        assert b["projections"] == a["projections"]
    assert resumed[-1]["projections"] == 1 + 6 // 2

    from scripts.base_eval import main as eval_main
    eval_main(["--model-tag", "ngpt_resume", "--eval-tokens", "1024", "--device-batch-size", "4",
               "--results-dir", str(results)])
    record = json.loads((results / "ngpt_resume" / "eval.json").read_text())
    last_val = [r["val_bpb"] for r in read_metrics(results, "ngpt_resume") if "val_bpb" in r][-1]
    assert record["results"]["bpb"]["val_bpb"] == pytest.approx(last_val, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("extra, match", [
    (["--lazy-proj-freq", "0"], "--lazy-proj-freq must be >= 1"),
    (["--logit-scale", "0"], "--logit-scale must be > 0"),
    (["--logit-scale", "-2"], "--logit-scale must be > 0"),
    (["--mhc-enabled"], "--arch ngpt with --mhc-enabled"),
    (["--weight-decay", "0.1"], "--weight-decay 0.1 with --arch ngpt"),
    (["--warmup-ratio", "0.1"], "--warmup-ratio 0.1 with --arch ngpt"),
    (["--matrix-lr", "0.05"], "--matrix-lr not used with --arch ngpt"),
    (["--embedding-lr", "0.1"], "--embedding-lr not used with --arch ngpt"),
    (["--ngpt-optimizer", "sgd"], "--ngpt-optimizer must be one of"),
])
def test_bad_flags(tmp_path, extra, match):
    with pytest.raises(UserError, match=match):
        run_train(TINY + ["--num-iterations", "1", "--results-dir", str(tmp_path)] + extra)


def test_ngpt_flags_without_arch_and_bad_model_configs(tmp_path):
    gpt_argv = [a for a in TINY if a not in ("--arch", "ngpt")]
    with pytest.raises(UserError, match="--lazy-proj-freq set but --arch is 'gpt'"):
        run_train(gpt_argv + ["--num-iterations", "1", "--results-dir", str(tmp_path), "--lazy-proj-freq", "7"])
    with pytest.raises(UserError, match="--arch must be one of"):
        run_train(gpt_argv + ["--num-iterations", "1", "--results-dir", str(tmp_path), "--arch", "mamba"])
    base = dict(sequence_len=8, vocab_size=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=64, arch="ngpt")
    with pytest.raises(UserError, match="arch ngpt cannot be combined with mHC"):
        GPT(GPTConfig(**base, mhc=MHCConfig(enabled=True)))
    with pytest.raises(UserError, match="logit_scale"):
        GPT(GPTConfig(**base, logit_scale=0.0))


def test_gpt_optimizer_recipe_refuses_ngpt():
    """sft_train and the other gpt-recipe users would train nGPT's scales as scalars and never project."""
    from nanochat.optim import setup_optimizers
    with pytest.raises(UserError, match="nGPT model"):
        setup_optimizers(make_model(), embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0)
