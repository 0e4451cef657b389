"""Newton–Schulz (NS) orthogonalisation: G -> approximately U V^T for G = U S V^T.

One implementation shared by Muon and (later) the orthostochastic mHC projection. Each NS step applies the odd
polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X, which pushes every singular value of a Frobenius-normalised
input towards 1 (the quintic below deliberately overshoots and never converges to exactly 1, see DESIGN.md §6).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from nanochat.common import UserError

Coeffs = tuple[float, float, float]

# Keller Jordan's quintic (Muon's default): fast growth of small singular values, output band about [0.7, 1.2].
QUINTIC: Coeffs = (3.4445, -4.7750, 2.0315)

NORM_EPS = 1e-7  # keeps f(0) = 0 without NaN; far below the Frobenius norm of any real gradient


def _validate_coeffs(coeffs, steps) -> list[Coeffs]:
    """Normalise `coeffs` (one triple, or a per-step schedule) into a list of `steps` triples."""
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) == 0:
        raise UserError(f"NS coefficients must be an (a, b, c) triple or a list of triples (got {coeffs!r})")
    is_single = all(isinstance(c, (int, float)) for c in coeffs)
    schedule = [tuple(coeffs)] if is_single else [tuple(c) for c in coeffs]
    for i, triple in enumerate(schedule):
        if len(triple) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in triple):
            raise UserError(f"NS coefficient triple {i} must be 3 finite numbers (got {triple!r})")
    if is_single:
        steps = 5 if steps is None else steps
        if steps <= 0:
            raise UserError(f"NS steps must be > 0 (got {steps})")
        return schedule * steps
    if steps is not None and steps != len(schedule):
        # slicing a tuned schedule gives a much worse map (DESIGN.md §5): refuse instead of guessing
        raise UserError(f"NS schedule has {len(schedule)} steps but steps={steps} was asked for")
    return schedule


def zeropower_via_newtonschulz(G: torch.Tensor, coeffs: Coeffs | Sequence[Coeffs] = QUINTIC,
                               steps: int | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Orthogonalise the last two dims of G ([..., m, n]), batched over leading dims.

    coeffs: one (a, b, c) triple applied `steps` times (default 5), or a schedule with one triple per step
    (then `steps` must be None or equal its length). The norm is taken in fp32; the iteration runs in `dtype`
    (bf16 on GPU as in modded-nanogpt; fp32 for exactness on the CPU). Returns a tensor of G's dtype.
    """
    if G.ndim < 2:
        raise UserError(f"Newton–Schulz needs a matrix or a batch of matrices (got shape {tuple(G.shape)})")
    schedule = _validate_coeffs(coeffs, steps)
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NORM_EPS)
    X = X.to(dtype)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


# The 8-step per-step schedule from the user's handover note (seed 000); it calls it "NanoGPT-medium", but it is not
# from modded-nanogpt, so it goes by a neutral name here.
HANDOVER8: list[Coeffs] = [
    (7.2086, -15.5131, 9.0178),
    (3.9623, -2.5813, 0.4542),
    (3.9466, -2.5765, 0.4544),
    (3.8991, -2.5671, 0.4566),
    (3.7186, -2.5308, 0.4653),
    (3.1390, -2.3073, 0.4733),
    (2.1715, -1.5246, 0.3885),
    (1.8648, -1.2224, 0.3577),
]
PRESETS = {"quintic": QUINTIC, "cubic": (3.0, -3.2, 1.2), "handover8": HANDOVER8}


def resolve_ns_coeffs(name_or_value):
    """A preset name ('quintic', 'handover8', ...) or a literal triple / schedule -> the coefficients."""
    if isinstance(name_or_value, str):
        if name_or_value not in PRESETS:
            raise UserError(f"unknown NS coefficient preset {name_or_value!r} (known: {', '.join(PRESETS)})")
        return PRESETS[name_or_value]
    _validate_coeffs(name_or_value, None)
    return name_or_value
