"""Bits per byte: a tokenizer-independent validation loss."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, autocast_ctx, rows: list | None = None) -> float:
    """bpb = sum(nats) / (ln 2 * sum(bytes)) over target tokens, skipping special tokens (0 bytes) and
    ignored targets (-1). `batches` yields (x, y) [B, T]; sums are all-reduced across ranks. With `rows` (a list),
    each row's (nats, bytes) is appended, in this rank's order, for paired comparisons of two models on the same
    rows."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in batches:
        with autocast_ctx:
            loss = model(x, y, loss_reduction="none")          # [B, T] nats
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)  # [B, T]
        counted = nbytes > 0
        row_nats = (loss.double() * counted).sum(1)            # [B]
        total_nats += row_nats.sum()
        total_bytes += nbytes.sum()
        if rows is not None:
            rows += list(zip(row_nats.tolist(), nbytes.sum(1).tolist()))
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes.item())
