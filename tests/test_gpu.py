"""The CUDA paths, on a GPU (marker `gpu`: deselected by default and in CI, which has no GPU; scripts/gpu_check.sh
runs them). Each states its tolerance."""
from __future__ import annotations

import pytest
import torch

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]


def model_pair(mhc: bool, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, n_embd=256,
                    mhc=MHCConfig(enabled=mhc),
                    out_proj_init_scale=1.0, **kw)
    cpu = GPT(cfg)
    cpu.init_weights()
    gpu = GPT(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_fp32_gpu_matches_the_cpu(mhc):
    """--dtype float32 on a GPU is IEEE fp32 (TF32 off, nanochat.common.compute_init): loss and logits agree with
    the CPU's to 1e-4 relative (summation order differs)."""
    from nanochat.common import compute_init
    compute_init("cuda")
    assert not torch.backends.cuda.matmul.allow_tf32
    cpu, gpu = model_pair(mhc)
    idx = torch.randint(0, 4096, (4, 256))
    with torch.no_grad():
        a, b = cpu(idx), gpu(idx.cuda()).cpu()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_bf16_decode_caches_bf16_and_runs_on_the_flash_kernel(mhc):
    """Under bf16 autocast K and V are cached in bf16, and an unpadded decode step passes no mask, so it runs on the
    flash kernel (restricted to it here: a mask would raise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _, gpu = model_pair(mhc)
    cache = KVCache(2, gpu.config.n_layer, 40)
    ids = torch.randint(0, 4096, (2, 32), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        gpu(ids, kv_cache=cache, last_only=True)
        gpu(ids[:, :1], kv_cache=cache, last_only=True)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_compiled_bf16_training_step_with_varying_lengths(mhc):
    """torch.compile(dynamic=True) (fine-tuning's setting), bf16 autocast, two lengths: the step runs and its loss
    is within bf16 rounding of eager's."""
    _, gpu = model_pair(mhc)
    compiled = torch.compile(gpu, dynamic=True)
    for T in (128, 97):
        idx = torch.randint(0, 4096, (4, T), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(idx, idx)
            ref = gpu(idx, idx)
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 2e-2 * ref.item()


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_memory_estimate_within_15_percent_of_cuda_peak(mhc):
    """The pre-training estimate (fake tensors, CPU autocast standing in for CUDA's) against
    torch.cuda.max_memory_allocated of a real eager bf16 step."""
    from nanochat.memory import estimate_training_memory
    from nanochat.optim import setup_optimizers
    cfg = GPTConfig(sequence_len=512, vocab_size=32768, n_layer=6, n_head=3, n_kv_head=3, n_embd=384,
                    mhc=MHCConfig(enabled=mhc))
    est = estimate_training_memory(cfg, 16, 512, "bfloat16")
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    model.init_weights()
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0)
    idx = torch.randint(0, 32768, (16, 512), device="cuda")
    for step in range(2):
        if step == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated()
    assert abs(est["peak"] - measured) <= 0.15 * measured, (est, measured)


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
def test_compiled_decode_with_cuda_graphs_equals_eager(mhc):
    """Engine(compile=True) on CUDA: the decode step replays as CUDA graphs over the static cache; fp32 greedy
    tokens equal eager's and logits agree within 1e-4 relative, with left padding and per-example gates; a second
    call in the same bucket reuses the graphs (no recompile)."""
    from torch._dynamo.utils import counters
    from nanochat.common import compute_init
    from nanochat.engine import Engine
    compute_init("cuda")
    _, gpu = model_pair(mhc)
    gpu.eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (5, 17, 9)]
    if mhc:
        gpu.set_mhc_gates_per_layer(torch.rand(3, 4, generator=g))
    eager = Engine(gpu).generate(prompts, 24, return_logits=True)
    engine = Engine(gpu, compile=True)
    assert engine._compiled().cudagraphs
    compiled = engine.generate(prompts, 24, return_logits=True)
    assert [o.tokens for o in compiled] == [o.tokens for o in eager]
    for e, c in zip(eager, compiled):
        for a, b in zip(c.logits, e.logits):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    frames = counters["stats"]["unique_graphs"]
    engine.generate([p[:-1] for p in prompts], 20)
    assert counters["stats"]["unique_graphs"] == frames
