"""Model behaviour: causality, shapes, GQA, the depth dial, config errors."""
import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig, model_dims_from_depth


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = GPTConfig.from_dict({**dict(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=4, n_embd=64),
                               **overrides})
    model = GPT(cfg)
    model.init_weights()
    # the output projections start at 1% of the hidden-matrix init (out_proj_init_scale), so every block is near
    # the identity at init; perturb them so the test exercises attention and the MLP
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_causality(n_kv_head):
    model = tiny_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, 300, (2, 32))
    logits = model(idx)
    for t in (0, 10, 30):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 300
        logits2 = model(changed)
        assert torch.allclose(logits[:, : t + 1], logits2[:, : t + 1], atol=1e-6)
        assert not torch.allclose(logits[:, t + 1], logits2[:, t + 1])  # the change is visible at t+1


def test_loss_matches_cross_entropy_and_reductions():
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 16))
    y = torch.randint(0, 300, (2, 16))
    y[0, 3] = -1  # ignored
    logits = model(idx)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 300), y.view(-1), ignore_index=-1)
    assert torch.allclose(model(idx, y), ref, atol=1e-6)
    per_token = model(idx, y, loss_reduction="none")
    assert per_token.shape == (2, 16) and per_token[0, 3] == 0
    assert torch.allclose(per_token.sum() / 31, ref, atol=1e-5)


def test_logit_softcap_bounds_logits():
    model = tiny_model(logit_softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 10.0)
    logits = model(torch.randint(0, 300, (1, 8)))
    assert logits.abs().max() <= 2.0 + 1e-5


def test_depth_dial():
    assert model_dims_from_depth(12) == (768, 6)          # the plan's baseline: 768 wide, 6 heads of 128
    assert model_dims_from_depth(20) == (1280, 10)
    assert model_dims_from_depth(4, 64, 64) == (256, 4)   # the tiny CPU preset
    with pytest.raises(UserError, match="--depth"):
        model_dims_from_depth(0)


def test_no_biases_and_untied():
    model = tiny_model()
    assert all("bias" not in name for name, _ in model.named_parameters())
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("overrides", [dict(), dict(mhc_enabled=True), dict(mhc_enabled=True, mhc_readout="sum")],
                         ids=["baseline", "mhc", "mhc-sum-readout"])
def test_flops_estimate_equals_torch_flop_counter(overrides):
    """The formula against a count made another way: torch's FLOP counter over one forward + backward at the
    training context (SDPA's math backend, which the counter sees as matrix products)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(**overrides)
    T = model.config.sequence_len
    x, y = torch.randint(0, 300, (2, T)), torch.randint(0, 300, (2, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    assert model.estimate_flops_per_token() == counter.get_total_flops() / (2 * T)


@pytest.mark.parametrize("bad, match", [
    (dict(n_head=3), "divisible by n_head"),
    (dict(n_kv_head=3), "divisible by n_kv_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
])
def test_config_errors(bad, match):
    with pytest.raises(UserError, match=match):
        GPT(GPTConfig(**{**dict(sequence_len=8, vocab_size=16, n_layer=1, n_head=4, n_kv_head=4, n_embd=64),
                         **bad}))


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(UserError, match="n_lyer"):
        GPTConfig.from_dict({"n_lyer": 3})


@pytest.mark.parametrize("cap", [0.0, 15.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cross_entropy_equals_the_plain_form(cap, dtype, monkeypatch):
    """The chunked fp32 loss with its hand-written backward against F.cross_entropy on softcap(logits.float()), for
    every reduction, with ignored targets, over several chunks (one partial)."""
    import torch.nn.functional as F

    from nanochat.gpt import _SoftcapCrossEntropy, softcap, softcap_cross_entropy
    B, T, V = 3, 7, 50
    monkeypatch.setattr(_SoftcapCrossEntropy, "CHUNK_ELEMENTS", 4 * V)  # 4 rows a chunk: 21 rows -> 6 chunks
    torch.manual_seed(0)
    raw = (torch.randn(B, T, V) * 20).to(dtype)
    targets = torch.randint(0, V, (B, T))
    targets[0, :3] = -1
    for reduction in ("mean", "sum", "none"):
        logits = raw.clone().requires_grad_()
        ref_logits = raw.clone().requires_grad_()
        got = softcap_cross_entropy(logits, targets, cap, reduction)
        ref = F.cross_entropy(softcap(ref_logits.float(), cap).view(-1, V), targets.view(-1), ignore_index=-1,
                              reduction=reduction)
        ref = ref.view(B, T) if reduction == "none" else ref
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), reduction
        upstream = torch.rand_like(ref)
        (got * upstream).sum().backward()
        (ref * upstream).sum().backward()
        assert logits.grad.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(logits.grad.float(), ref_logits.grad.float(), atol=tol), reduction
        assert logits.grad[0, :3].abs().max() == 0  # ignored targets send no gradient


def test_eager_training_keeps_no_fp32_vocabulary_tensor_for_backward():
    """Under bf16 autocast the loss saves the bf16 logits and one log-sum-exp per token: no [B, T, V] fp32 tensor
    (the fp32 logits, the tanh, the log-softmax) is kept for backward."""
    model = tiny_model()
    idx = torch.randint(0, 300, (2, 32))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, idx)
    vocab_sized = [s for s in saved if s[0] and s[0][-1] == 300 and len(s[0]) >= 2 and s[0][0] != 300]
    assert vocab_sized and all(dtype == torch.bfloat16 for _, dtype in vocab_sized), vocab_sized
