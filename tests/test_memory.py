"""Memory: the pre-training estimate against the allocator's own record, activation checkpointing (same numbers,
lower peak), the refusal of a batch that cannot fit, bf16 where fp32 is not needed."""
from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import GIB, check_fits, estimate_training_memory, largest_fitting_batch
from nanochat.optim import setup_optimizers

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def config(depth, width, seq, mhc, **kw):
    return GPTConfig.from_dict(dict(sequence_len=seq, vocab_size=512, n_layer=depth, n_head=width // 32,
                                    n_kv_head=width // 32, n_embd=width, mhc_enabled=mhc, **kw))


def build(cfg, checkpointing="off"):
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    model.set_activation_checkpointing(checkpointing)
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.float32)
    return model, opts


def train_step(model, opts, idx, dtype="float32"):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = model(idx, idx)
    loss.backward()
    for o in opts:
        o.step()
    model.zero_grad(set_to_none=True)
    return loss


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def measured_peak(model, opts, idx, dtype="float32") -> int:
    """Bytes alive at the peak of one training step, from the CPU allocator's own events (torch.profiler's memory
    profile): what lives before the step (weights, buffers, optimizer state; counted from their storages) plus
    the highest running sum of the allocations and frees the profiler records during the step."""
    train_step(model, opts, idx, dtype)  # the optimizer state exists from here on, as in a running loop
    state = [t for o in opts for s in o.state.values() for t in s.values() if torch.is_tensor(t)]
    static = storage_bytes(list(model.parameters()) + list(model.buffers()) + state)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, opts, idx, dtype)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    assert events, "the profiler recorded no allocation"
    return static + peak


@pytest.mark.parametrize("mhc", [False, True], ids=["baseline", "mhc"])
@pytest.mark.parametrize("size, dtype", [((2, 64, 64, 4), "float32"), ((3, 128, 128, 4), "float32"),
                                         ((2, 64, 64, 4), "bfloat16")], ids=["small", "larger", "small-bf16"])
def test_estimate_is_within_15_percent_of_the_measured_peak(mhc, size, dtype):
    """Two sizes (and bf16 autocast, the GPU's dtypes), baseline and mHC: the estimate against the allocator."""
    depth, width, seq, batch = size
    cfg = config(depth, width, seq, mhc)
    est = estimate_training_memory(cfg, batch, seq, dtype)
    model, opts = build(cfg)
    measured = measured_peak(model, opts, torch.randint(0, 512, (batch, seq)), dtype)
    assert abs(est["peak"] - measured) <= 0.15 * measured, (est, measured)
    assert est["parameters"] == sum(p.numel() * 4 for p in model.parameters())  # fp32 weights, counted exactly


@pytest.mark.parametrize("mhc, modes", [(True, ["off", "mhc", "full"]), (False, ["off", "full"])],
                         ids=["mhc", "baseline"])
def test_activation_checkpointing_keeps_loss_and_gradients_and_lowers_the_peak(mhc, modes):
    """Same loss and gradients with recomputation as without (gate sampling included: the recomputed forward draws
    the same gates), and a lower measured peak for each stronger mode."""
    extra = dict(mhc_gate_sample_frac=0.5) if mhc else {}
    cfg = config(3, 128, 128, mhc, **extra)
    idx = torch.randint(0, 512, (4, 128))
    ref_loss, ref_grads, peaks = None, None, {}
    for mode in modes:
        model, opts = build(cfg, mode)
        torch.manual_seed(1)
        loss = model(idx, idx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if ref_loss is None:
            ref_loss, ref_grads = loss.item(), grads
        else:
            assert loss.item() == pytest.approx(ref_loss, rel=1e-6), mode
            for n, g in grads.items():
                assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-7), (mode, n)
        model.zero_grad(set_to_none=True)
        peaks[mode] = measured_peak(model, opts, idx)
    ordered = [peaks[m] for m in modes]
    assert all(a > b for a, b in zip(ordered, ordered[1:])), peaks


def test_a_batch_that_cannot_fit_is_refused_with_the_numbers():
    cfg = config(2, 64, 64, True)
    one = estimate_training_memory(cfg, 1, 64, "float32")["peak"]
    eight = estimate_training_memory(cfg, 8, 64, "float32")["peak"]
    assert eight > one
    # a card that holds the reserve plus room for about 3 rows: batch 8 is refused, and the error names a batch
    # that fits and the flag to skip the check
    from nanochat.memory import FRAGMENTATION, GPU_RESERVE_GIB
    per_row = (eight - one) / 7
    total = int(GPU_RESERVE_GIB * GIB + (one + 2.5 * per_row) * (1 + FRAGMENTATION))
    with pytest.raises(UserError) as e:
        check_fits(cfg, 8, 64, "float32", "off", total)
    fits = largest_fitting_batch(cfg, 64, "float32", "off", (total - GPU_RESERVE_GIB * GIB) / (1 + FRAGMENTATION), 7)
    assert fits == 3
    msg = str(e.value)
    assert "8 x 64 tokens per GPU" in msg and "--device-batch-size 3 fits" in msg and "--memory-check false" in msg
    assert check_fits(cfg, 3, 64, "float32", "off", total)["peak"] <= total


def test_train_states_its_memory_estimate(tiny_base_dir, tmp_path, capsys):
    from scripts.base_train import main
    main(["--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2",
          "--total-batch-size", "128", "--data-source", "local", "--eval-tokens", "128", "--eval-every", "-1",
          "--device-type", "cpu", "--dtype", "float32", "--compile", "false", "--num-iterations", "1",
          "--model-tag", "mem_est", "--results-dir", str(tmp_path), "--memory-check", "true", "--mhc-enabled",
          "--activation-checkpointing", "mhc"])
    out = capsys.readouterr().out
    assert "memory: a step of 2 x 64 tokens needs about" in out
    record = json.loads((tmp_path / "mem_est" / "config.json").read_text())["memory_estimate"]
    assert record["activation_checkpointing"] == "mhc" and record["peak"] > record["parameters"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--activation-checkpointing", "mhc"], "recomputes the mHC connections: add --mhc-enabled"),
    (["--activation-checkpointing", "some"], "--activation-checkpointing must be one of off, mhc, full"),
    (["--memory-check", "maybe"], "--memory-check must be one of auto, true, false"),
    (["--peak-flops", "-1"], "--peak-flops must be >= 0"),
])
def test_bad_memory_flags_are_named(argv, match):
    from nanochat.config import TrainConfig, build_config
    with pytest.raises(UserError, match=match):
        build_config(TrainConfig, argv, "test")


def test_bf16_streams_halve_the_stream_state_and_keep_the_loss():
    """mhc_bf16_streams under bf16 autocast: the streams between sub-layers are bf16 (the estimate's activations
    drop), the loss stays within bf16 rounding of the fp32-stream model's, and every gradient is finite."""
    cfg32, cfg16 = config(2, 64, 32, True), config(2, 64, 32, True, mhc_bf16_streams=True)
    m32, _ = build(cfg32)
    m16, _ = build(cfg16)
    idx = torch.randint(0, 512, (2, 32))
    seen = []
    hook = m16.transformer.h[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l32, l16 = m32(idx, idx), m16(idx, idx)
    hook.remove()
    assert seen == [torch.bfloat16]
    assert abs(l16.item() - l32.item()) < 0.02 * l32.item()
    l16.backward()
    assert all(torch.isfinite(p.grad).all() for p in m16.parameters())
    a32 = estimate_training_memory(cfg32, 4, 32, "bfloat16")["activations"]
    a16 = estimate_training_memory(cfg16, 4, 32, "bfloat16")["activations"]
    assert a16 < 0.9 * a32
