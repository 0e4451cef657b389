"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import time

import torch


def timed_train_step(model, optimizers, x, y, ctx, device_type: str) -> float:
    """One training step (forward, backward, every optimizer), synchronised; returns its wall time in seconds."""
    t0 = time.perf_counter()
    with ctx:
        loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
