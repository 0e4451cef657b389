"""Newton–Schulz (NS) orthogonalisation: G -> approximately U V^T for G = U S V^T.

One implementation, shared by Muon (nanochat/optim.py) and the orthostochastic mHC projection (nanochat/mhc.py).
Each NS step applies an odd matrix polynomial to the iterate X (A = X X^T):

    X <- a X + b A X + c A^2 X          (one (a, b, c) triple per step)

which acts on every singular value independently, s <- p(s) = a s + b s^3 + c s^5. After Frobenius normalisation
every input singular value lies in (0, 1], so the quality of a coefficient set is the band [min, max] of the
composed map over s in [1e-3, 1] (docs/design.md, section 6; computed in float64 and re-measured by
tests/test_newton_schulz.py):

    preset           steps  band over s in [1e-3, 1]   notes
    quintic            5    [0.4705, 1.2024]           Keller Jordan's Muon set; overshoots on purpose, never -> 1
    cubic              5    [0.2411, 1.2105]           (3.0, -3.2, 1.2): p(1) = 1, converges, but slowly
    cubic              8    [0.9721, 1.0706]
    polar_express5     5    [0.8589, 1.1411]           modded-nanogpt / nanochat's Polar Express set
    handover8          8    [0.9993, 1.0004]           the 8-step schedule of the user's notes; near-exact orthogonality
    handover8[:5]      5    [0.4549, 1.8340]           why a schedule is never sliced

Coefficients are given as a preset name, one triple (applied `steps` times, default 5) or a schedule (a list of
triples, one per step; `steps` must then be None or its length -- a tuned schedule is never sliced or repeated,
because a truncated schedule is a much worse map, see the table).

The open questions of the user's notes on NS coefficients, answered with the ablation's numbers (docs/results.md):
  1. Default coefficients. Muon keeps `quintic` x5. Muon only needs the update's singular values in a band around
     1: in the tiny-preset ablation (scripts/ns_ablation.py, 3 seeds) handover8 and polar_express5 land within
     -0.017 ... +0.010 nats of the quintic's val loss, inside the seed-to-seed noise, while
     handover8 costs 1.5-1.6x the time per call (benchmarks/ns_speed.py, 768 x 3072 on the CPU). The orthostochastic
     mHC projection defaults to `handover8` (GPTConfig.mhc_ns_coeffs): there the NS output is squared elementwise
     into a doubly stochastic matrix whose row/column sums are off by up to max|s^2 - 1| -- 0.78 for quintic x5,
     1.5e-3 for handover8 over s in [1e-3, 1] -- and on n x n = 4 x 4 matrices the 3 extra steps cost nothing.
  2. A schedule whose length differs from `steps` is an error, never sliced (and no repeat-last policy: no caller
     needs one, and a silent extension would hide a typo just as slicing would).
  3. Tests hold each preset to its own band (fp32 tolerance 1e-3; handover8 in bf16 to 5e-3), so the schedule gets
     the tight check and the quintic the loose one it actually satisfies.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Sequence, Union

import torch

from nanochat.common import UserError

Coeffs = tuple[float, float, float]
# A generalised step: polynomial coefficients (k0, k1, ..., kd) of X <- sum_j k_j A^j X, or a function of the
# current Gram matrix A that returns them (for adaptive schemes). Used by the ablation; triples are the common case.
PolyStep = Union[Sequence[float], Callable[[torch.Tensor], Sequence[float]]]

# Keller Jordan's quintic (Muon's default): maximal slope at 0 so small singular values grow fast; band above.
QUINTIC: Coeffs = (3.4445, -4.7750, 2.0315)
# The classic convergent choice the user's notes start from (p(1) = 1, p'(1) = 0.2).
CUBIC: Coeffs = (3.0, -3.2, 1.2)
# The 8-step per-step schedule from the user's notes. The notes call it "NanoGPT-medium", but it is not from
# modded-nanogpt (docs/design.md, section 5), so it goes by a neutral name.
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
# Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932), 5 steps "computed for num_iters=5,
# safety_factor=2e-2, cushion=2", as used by karpathy/nanochat (nanochat/optim.py, polar_express_coeffs) and
# KellerJordan/modded-nanogpt (train_gpt.py). Those repos also shrink the input by 1.01-1.02 before iterating; we
# keep plain Frobenius normalisation for every preset, which leaves the band above unchanged (the rescale only guards
# against bf16 rounding pushing s slightly above 1).
POLAR_EXPRESS5: list[Coeffs] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
PRESETS: dict[str, Coeffs | list[Coeffs]] = {
    "quintic": QUINTIC, "cubic": CUBIC, "polar_express5": POLAR_EXPRESS5, "handover8": HANDOVER8,
}

DEFAULT_STEPS = 5  # steps for a single triple when none are given (Muon's choice)
NORM_EPS = 1e-7  # keeps f(0) = 0 without NaN; far below the Frobenius norm of any real gradient


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ns_schedule(coeffs, steps: int | None = None) -> list[Coeffs]:
    """Validate `coeffs` (one triple or a schedule) and `steps`; return the per-step list of triples."""
    if isinstance(coeffs, str):
        raise UserError(f"NS coefficients {coeffs!r} are a string: pass them through resolve_ns_coeffs first")
    if not isinstance(coeffs, (list, tuple)) or len(coeffs) == 0:
        raise UserError(f"NS coefficients must be an (a, b, c) triple or a list of triples (got {coeffs!r})")
    is_single = all(_is_number(c) for c in coeffs)
    if not is_single and not all(isinstance(c, (list, tuple)) for c in coeffs):
        raise UserError(f"NS coefficients mix numbers and triples (got {coeffs!r})")
    schedule = [tuple(coeffs)] if is_single else [tuple(c) for c in coeffs]
    for i, triple in enumerate(schedule):
        where = "" if is_single else f" {i}"
        if len(triple) != 3:
            raise UserError(f"NS coefficient triple{where} must be 3 finite numbers (a, b, c), got {len(triple)} "
                            f"values: {triple!r}")
        if not all(_is_number(v) and math.isfinite(v) for v in triple):
            raise UserError(f"NS coefficient triple{where} must be 3 finite numbers (got {triple!r})")
    schedule = [tuple(float(v) for v in t) for t in schedule]
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise UserError(f"NS steps must be a positive integer (got {steps!r})")
    if is_single:
        return schedule * (DEFAULT_STEPS if steps is None else steps)
    if steps is not None and steps != len(schedule):
        # slicing a tuned schedule gives a much worse map (module docstring): refuse instead of guessing
        raise UserError(f"NS schedule has {len(schedule)} steps but steps={steps} was asked for; leave steps "
                        f"unset (0 on the command line) to run the whole schedule")
    return schedule


def resolve_ns_coeffs(name_or_value) -> Coeffs | list[Coeffs]:
    """A preset name, a literal string or a value -> a validated triple or schedule.

    Accepted: a preset name ('quintic', 'cubic', 'polar_express5', 'handover8'); a string "a,b,c"; a JSON string
    "[a, b, c]" or "[[a, b, c], ...]"; a tuple/list triple; a list of triples.
    """
    value = name_or_value
    if isinstance(value, str):
        text = value.strip()
        if text in PRESETS:
            return PRESETS[text]
        try:
            if text.startswith("["):
                value = json.loads(text)
            elif "," in text:
                value = [float(v) for v in text.split(",")]
            else:
                raise UserError(f"unknown NS coefficient preset {text!r} (known: {', '.join(PRESETS)}; or a "
                                f"literal such as '3.4445,-4.775,2.0315' or a JSON list of triples)")
        except (ValueError, json.JSONDecodeError) as e:
            raise UserError(f"cannot parse NS coefficients {text!r}: {e}") from e
    schedule = ns_schedule(value, None)
    is_single = all(_is_number(v) for v in value)
    return schedule[0] if is_single else schedule


def odd_polynomial_iteration(X: torch.Tensor, schedule: Sequence[PolyStep], *, dtype: torch.dtype = torch.float32,
                             descending: bool = False, iterates: list | None = None) -> torch.Tensor:
    """The raw NS loop, without normalisation: for each step, X <- sum_j k_j (X X^T)^j X. Batched over leading dims.

    Each schedule entry is a coefficient tuple (k0, ..., kd) of any length >= 1 -- (a, b, c) is the usual quintic
    step -- or a callable that maps the Gram matrix A = X X^T to such a tuple. The caller puts the input's singular
    values in (0, 1] (zeropower_via_newtonschulz does). Runs in `dtype`, returns that dtype.

    The sums are fused into baddbmm (B = b A + c A A, X = a X + B X), as modded-nanogpt does: in bf16 every separate
    op rounds, and the fused form halves the error of handover8 (max |s - 1| 6e-3 -> 3e-3 on a 256 x 1024 matrix).
    `descending` instead evaluates the terms literally from the highest power down, (c A^2 + b A) X + a X, with
    unfused ops (the ablation's "reordered" variant; same polynomial, different rounding). `iterates`, if a list,
    receives X after every step (fp32 copies) for diagnostics.
    """
    shape = X.shape
    X = X.to(dtype).reshape(-1, shape[-2], shape[-1])  # baddbmm wants exactly one batch dim
    for step in schedule:
        A = X @ X.mT if callable(step) or len(step) > 1 else None
        k = [float(v) for v in (step(A) if callable(step) else step)]
        if len(k) == 1:
            X = k[0] * X
        elif descending:
            powers = [A]
            for _ in k[2:]:
                powers.append(powers[-1] @ A)
            B = k[-1] * powers[-1]
            for kj, P in zip(reversed(k[1:-1]), reversed(powers[:-1])):
                B = B + kj * P
            X = B @ X + k[0] * X
        else:
            if len(k) == 2:
                B = k[1] * A
            elif len(k) == 3:
                B = torch.baddbmm(A, A, A, beta=k[1], alpha=k[2])
            else:  # B = k1 A + k2 A^2 + ... + kd A^d, the last product fused into the sum
                B, P = k[1] * A, A
                for kj in k[2:-1]:
                    P = P @ A
                    B = B + kj * P
                B = torch.baddbmm(B, P, A, alpha=k[-1])
            X = torch.baddbmm(X, B, X, beta=k[0], alpha=1.0)
        if iterates is not None:
            iterates.append(X.float().reshape(shape).clone())
    return X.reshape(shape)


def zeropower_via_newtonschulz(G: torch.Tensor, coeffs: Coeffs | Sequence[Coeffs] = QUINTIC,
                               steps: int | None = None, dtype: torch.dtype = torch.bfloat16,
                               eps: float = NORM_EPS) -> torch.Tensor:
    """Orthogonalise the last two dims of G ([..., m, n]), batched over leading dims.

    coeffs: one (a, b, c) triple applied `steps` times (default 5), or a schedule with one triple per step (then
    `steps` must be None or equal its length); preset names go through resolve_ns_coeffs first. The Frobenius norm
    is taken in fp32 (G / (||G||_F + eps), so f(0) = 0 and f(cG) = f(G) while ||cG||_F >> eps); the iteration runs
    in `dtype` (bf16 on GPU as in modded-nanogpt; fp32 for exactness on the CPU). Tall inputs are transposed so the
    Gram matrix X X^T is the smaller one. Returns a tensor of G's dtype and shape.
    """
    if not isinstance(G, torch.Tensor) or G.ndim < 2:
        shape = tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__
        raise UserError(f"Newton–Schulz needs a matrix or a batch of matrices [..., m, n] (got {shape})")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"Newton–Schulz iteration dtype must be a floating torch dtype (got {dtype!r})")
    return polynomial_orthogonalize(G, ns_schedule(coeffs, steps), dtype=dtype, eps=eps)


def polynomial_orthogonalize(G: torch.Tensor, schedule: Sequence[PolyStep], *, dtype: torch.dtype = torch.bfloat16,
                             eps: float = NORM_EPS, descending: bool = False) -> torch.Tensor:
    """zeropower_via_newtonschulz for any schedule of odd_polynomial_iteration (general polynomial steps, adaptive
    callables), without the triple validation: fp32 Frobenius normalisation, wide orientation, iterate, restore."""
    X = G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    X = odd_polynomial_iteration(X, schedule, dtype=dtype, descending=descending)
    if transposed:
        X = X.mT
    return X.to(G.dtype)
