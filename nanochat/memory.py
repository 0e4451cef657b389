"""Peak memory of a training step, estimated before training.

The model's forward, backward and optimizer step run once on fake tensors (torch's FakeTensorMode: shapes,
dtypes and devices, no storage, so a d12 step at 64 x 1024 tokens takes seconds on any machine), and PyTorch's own
MemTracker (torch.distributed._tools.mem_tracker) follows every tensor's storage as it is created and freed:
parameters, gradients, optimizer state, the activations saved for backward and the temporaries alive at the
peak. The step runs eagerly on the CPU with CPU autocast standing in for CUDA's (the same dtypes for every matrix
product), so the figure is the eager step's. Measured on the CPU against the allocator's own record
(tests/test_memory.py), it agrees within a few percent.

What it does not see (docs/performance.md):
- torch.compile: inductor's partitioner keeps what eager keeps or less (the issue's measurements at d12: 30 vs
  43.5 GiB baseline, 51 vs 68 mHC), so the eager figure is an upper bound for a compiled run;
- GPU-only allocations: the CUDA context, NCCL's and cuBLAS's buffers (GPU_RESERVE_GIB) and the caching
  allocator's fragmentation (FRAGMENTATION).
"""
from __future__ import annotations

import dataclasses

import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig

GIB = 2 ** 30
# Not seen by the estimate on a GPU: the CUDA context (~0.5 GiB), NCCL's and cuBLAS's buffers and workspaces. An
# allowance, not a measurement (no GPU has run this code yet).
GPU_RESERVE_GIB = 3.0
# The caching allocator rounds and splits blocks; PyTorch's docs put the resulting overhead in the few-percent range.
FRAGMENTATION = 0.05


def _tracker():
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # torch is pinned (pyproject.toml); a different build may lack these private tools
        raise UserError(f"the memory estimate needs torch's FakeTensorMode and MemTracker ({e}); run with "
                        f"--memory-check false to skip it") from None
    return FakeTensorMode, MemTracker


def _warm_init_caches(config: GPTConfig):
    """Init values computed with .item() (the orthostochastic start) cannot run on fake tensors: compute them
    here, on real ones, so that the fake construction finds them cached."""
    if config.mhc.enabled and config.mhc.constraint == "orthostochastic":
        from nanochat.mhc import _ortho_init_logits
        _ortho_init_logits(config.mhc.num_streams, config.mhc.res_init_diag)


def _optimizers(model: GPT, ns_dtype: torch.dtype) -> list:
    """The optimizers training builds, for their state (the learning rates do not matter here)."""
    from nanochat.optim import Muon, setup_ngpt_optimizers, setup_optimizers
    if model.config.arch == "ngpt":
        optimizers = setup_ngpt_optimizers(model, lr=1e-3, optimizer="muon", ns_dtype=ns_dtype)
    else:
        optimizers = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                                      weight_decay=0.0, ns_dtype=ns_dtype)
    for opt in optimizers:  # under torchrun, Muon would all_gather its fake updates: each rank estimates alone
        if isinstance(opt, Muon):
            opt.distributed = False
    return optimizers


def estimate_training_memory(config: GPTConfig, batch_size: int, seq_len: int | None = None,
                             dtype: str = "bfloat16", activation_checkpointing: str = "off") -> dict:
    """Peak bytes of one training step (forward, backward, optimizer step) of GPT(config) on a [batch_size,
    seq_len] batch (seq_len: the config's sequence_len) under `dtype` (bfloat16 = autocast, as on a GPU).
    Returns {peak, parameters, gradients, optimizer, activations, temporaries, buffers} in bytes, the components
    as they stood at the peak."""
    FakeTensorMode, MemTracker = _tracker()
    seq_len = seq_len or config.sequence_len
    _warm_init_caches(config)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
                else torch.autocast("cpu", enabled=False))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = GPT(dataclasses.replace(config, sequence_len=max(config.sequence_len, seq_len)))
        model.set_activation_checkpointing(activation_checkpointing)
        optimizers = _optimizers(model, torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)

        def step():
            with autocast:
                loss = model(idx, idx)
            loss.backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)

        step()  # the first step creates the optimizer state; the tracked one is a step of a running loop
        tracker = MemTracker()
        tracker.track_external(model, *optimizers, idx)
        with tracker:
            step()
        snapshot = tracker.get_tracker_snapshot("peak")
    (device_snapshot,) = snapshot.values()
    names = dict(Parameter="parameters", Gradient="gradients", Optstate="optimizer", Activation="activations",
                 Temp="temporaries", Buffer="buffers", Other="other")
    out = {names.get(getattr(k, "value", k), "peak" if k == "Total" else str(k)): int(v)
           for k, v in device_snapshot.items()}
    return dict(peak=out.pop("peak"), **out)


_CACHE: dict = {}


def _estimate_cached(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: str) -> dict:
    key = (tuple(sorted(config.to_dict().items())), batch_size, seq_len, dtype, checkpointing)
    if key not in _CACHE:
        _CACHE[key] = estimate_training_memory(config, batch_size, seq_len, dtype, checkpointing)
    return _CACHE[key]


def largest_fitting_batch(config: GPTConfig, seq_len: int, dtype: str, checkpointing: str, budget: float,
                          upto: int) -> int:
    """The largest device batch <= upto whose estimated peak fits `budget` bytes (0 if not even one row fits): the
    peak grows linearly in the batch (activations), so two estimates fix the line."""
    one = _estimate_cached(config, 1, seq_len, dtype, checkpointing)["peak"]
    two = _estimate_cached(config, 2, seq_len, dtype, checkpointing)["peak"]
    per_row = max(two - one, 1)
    fits = int((budget - (one - per_row)) // per_row)
    return max(0, min(upto, fits))


def gpu_budget(total_bytes: int) -> float:
    """The bytes a training step may use on a card of total_bytes (GPU_RESERVE_GIB and FRAGMENTATION set aside)."""
    return (total_bytes - GPU_RESERVE_GIB * GIB) / (1 + FRAGMENTATION)


def describe(est: dict) -> str:
    parts = ("parameters", "gradients", "optimizer", "activations", "temporaries")
    return f"{est['peak'] / GIB:.1f} GiB (" + ", ".join(f"{p} {est.get(p, 0) / GIB:.1f}" for p in parts) + ")"


def check_fits(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: str,
               total_bytes: int, flag_hint: str = "--device-batch-size") -> dict:
    """Estimate the step and refuse, naming the numbers, when it cannot fit a card of total_bytes. Returns the
    estimate."""
    est = _estimate_cached(config, batch_size, seq_len, dtype, checkpointing)
    budget = gpu_budget(total_bytes)
    if est["peak"] <= budget:
        return est
    best = largest_fitting_batch(config, seq_len, dtype, checkpointing, budget, batch_size - 1)
    hints = []
    if best:
        hints.append(f"{flag_hint} {best} fits (gradient accumulation keeps the total batch)")
    if checkpointing != "full":
        full = _estimate_cached(config, batch_size, seq_len, dtype, "full")
        if full["peak"] <= budget:
            hints.append(f"--activation-checkpointing full fits at {full['peak'] / GIB:.1f} GiB")
    hints.append("--memory-check false skips this check")
    raise UserError(f"a training step of {batch_size} x {seq_len} tokens per GPU needs about {describe(est)} in "
                    f"eager mode, more than the {budget / GIB:.1f} GiB this {total_bytes / GIB:.0f} GiB card leaves "
                    f"after {GPU_RESERVE_GIB:.0f} GiB for CUDA/NCCL and {100 * FRAGMENTATION:.0f}% fragmentation. "
                    + "; ".join(hints))


def memory_check(config: GPTConfig, batch_size: int, seq_len: int, dtype: str, checkpointing: str, mode: str,
                 device: torch.device, compiled: bool, flag_hint: str = "--device-batch-size") -> dict | None:
    """The entry points' --memory-check: auto = on CUDA only, true = also on the CPU (printed, never refused),
    false = skip. On CUDA a step that cannot fit the card is refused (check_fits). Prints one line and returns the
    estimate (None when skipped)."""
    from nanochat.common import print0
    if mode == "false" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        est = check_fits(config, batch_size, seq_len, dtype, checkpointing, total, flag_hint)
        where = f"of the {total / GIB:.0f} GiB GPU (budget {gpu_budget(total) / GIB:.1f} GiB)"
    else:
        est = _estimate_cached(config, batch_size, seq_len, dtype, checkpointing)
        where = "(CPU: not checked against a budget)"
    print0(f"memory: a step of {batch_size} x {seq_len} tokens needs about {describe(est)} eager"
           f"{' (a compiled step needs at most that)' if compiled else ''} {where}")
    return dict(est, dtype=dtype, activation_checkpointing=checkpointing, batch_size=batch_size, seq_len=seq_len)
