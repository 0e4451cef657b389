"""Newton–Schulz: the singular-value bands of docs/design.md (section 6), invariances, batching, and bad input."""
import contextlib
import math

import pytest
import torch

from nanochat.common import UserError
from nanochat.newton_schulz import (CUBIC, HANDOVER8, POLAR_EXPRESS5, PRESETS, QUINTIC, ns_schedule,
                                    odd_polynomial_iteration, resolve_ns_coeffs, zeropower_via_newtonschulz)


@contextlib.contextmanager
def one_thread():
    """torch's float64 LAPACK calls (qr, eigvalsh) take seconds on 2 threads here and milliseconds on one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def controlled_matrix(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U [m, k], V [n, k], built in float64 so the spectrum is exact."""
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    with one_thread():
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (U * s.double()) @ V.T


def singular_values(X: torch.Tensor) -> torch.Tensor:
    """Singular values of a wide matrix via the eigenvalues of X X^T in float64."""
    X = X.double()
    with one_thread():
        return torch.linalg.eigvalsh(X @ X.mT).clamp_min(0).sqrt()


# Input singular values after Frobenius normalisation lie in (0, 1]; the bands below are the composed maps over
# s in [1e-3, 1] (docs/design.md section 6, where they are quoted to 2-3 digits; computed here in float64 on a fine
# grid:
# quintic x5 [0.47054, 1.20237], cubic x5 [0.24110, 1.21045], cubic x8 [0.97205, 1.07059], handover8
# [0.99927, 1.00038], handover8 cut to 5 [0.45494, 1.83396], polar_express5 [0.85887, 1.14113]).
BANDS = {
    "quintic x5": ([QUINTIC] * 5, (0.4705, 1.2024)),
    "cubic x5": ([CUBIC] * 5, (0.2411, 1.2105)),
    "cubic x8": ([CUBIC] * 8, (0.9721, 1.0706)),
    "handover8": (HANDOVER8, (0.9993, 1.0004)),
    "handover8 cut to 5 (why slicing is refused)": (HANDOVER8[:5], (0.4549, 1.8340)),
    "polar_express5": (POLAR_EXPRESS5, (0.8589, 1.1411)),
}
BAND_SPECTRUM = torch.logspace(-3, 0, 256, dtype=torch.float64)  # dense enough to hit each map's interior extrema


@pytest.mark.parametrize("name", BANDS)
def test_singular_value_band_fp32(name):
    """The iteration maps input s in [1e-3, 1] into the band of docs/design.md section 6 (fp32, tolerance 1e-3), and
    reaches
    both ends of it (the band is tight, not just an upper bound)."""
    schedule, (lo, hi) = BANDS[name]
    X = controlled_matrix(BAND_SPECTRUM, 256, 1024).float()
    out = singular_values(odd_polynomial_iteration(X, schedule, dtype=torch.float32))
    assert out.min() > lo - 1e-3 and out.max() < hi + 1e-3
    assert out.min() < lo + 1e-3 and out.max() > hi - 1e-3


def test_handover8_band_bf16():
    """In bf16 (the GPU iteration dtype) the handover8 schedule stays within 5e-3 of 1 (fused ops: about 3.3e-3;
    unfused bf16 ops would give 6e-3, see odd_polynomial_iteration)."""
    X = controlled_matrix(BAND_SPECTRUM, 256, 1024).float()
    out = singular_values(odd_polynomial_iteration(X, HANDOVER8, dtype=torch.bfloat16))
    assert (out - 1).abs().max() < 5e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_public_function_within_band(preset):
    """Through zeropower_via_newtonschulz (normalisation included) a log-spaced spectrum ends inside the band."""
    schedule = ns_schedule(resolve_ns_coeffs(preset))
    lo, hi = next(band for sched, band in BANDS.values() if sched == schedule)
    s = torch.logspace(math.log10(2e-3), 0, 32, dtype=torch.float64)
    assert (s / s.norm()).min() >= 1e-3  # after Frobenius normalisation the spectrum is still inside [1e-3, 1]
    G = controlled_matrix(s, 32, 128).float() * 37.0  # any scale: normalised away
    out = singular_values(zeropower_via_newtonschulz(G, resolve_ns_coeffs(preset), dtype=torch.float32))
    assert out.min() > lo - 1e-3 and out.max() < hi + 1e-3


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_scale_invariance(c):
    G = torch.randn(3, 32, 96, generator=torch.Generator().manual_seed(1))
    ref = zeropower_via_newtonschulz(G, QUINTIC, dtype=torch.float32)
    assert torch.allclose(zeropower_via_newtonschulz(c * G, QUINTIC, dtype=torch.float32), ref, atol=1e-5)


@pytest.mark.parametrize("coeffs", [QUINTIC, HANDOVER8])
def test_transpose_consistency(coeffs):
    G = torch.randn(48, 20, generator=torch.Generator().manual_seed(2))
    tall = zeropower_via_newtonschulz(G, coeffs, dtype=torch.float32)
    wide = zeropower_via_newtonschulz(G.T, coeffs, dtype=torch.float32)
    assert tall.shape == G.shape
    assert torch.allclose(tall, wide.T, atol=1e-5)


def test_orthogonal_input_is_a_fixed_point():
    """A semi-orthogonal G (all s equal) normalises to s = 1/sqrt(k); a converging schedule returns G itself."""
    Q, _ = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)))
    out = zeropower_via_newtonschulz(Q.T, HANDOVER8, dtype=torch.float32)  # 16 x 64, rows orthonormal
    assert torch.allclose(out, Q.T, atol=2e-3)
    # the quintic only lands in its band: same singular vectors, s within [0.68, 1.14] of docs/design.md section 6
    cos = torch.nn.functional.cosine_similarity(zeropower_via_newtonschulz(Q.T, QUINTIC, dtype=torch.float32),
                                                Q.T, dim=1)
    assert cos.min() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_input_gives_zero(dtype):
    out = zeropower_via_newtonschulz(torch.zeros(2, 8, 12), HANDOVER8, dtype=dtype)
    assert torch.isfinite(out).all() and torch.all(out == 0)


def test_batched_equals_one_by_one():
    G = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    batched = zeropower_via_newtonschulz(G, POLAR_EXPRESS5, dtype=torch.float32)
    for i in range(2):
        for j in range(3):
            single = zeropower_via_newtonschulz(G[i, j], POLAR_EXPRESS5, dtype=torch.float32)
            assert torch.allclose(batched[i, j], single, atol=1e-6)


def test_output_dtype_and_bf16_iteration():
    G = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    out = zeropower_via_newtonschulz(G, QUINTIC, dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    s = singular_values(out)
    assert s.min() > 0.6 and s.max() < 1.25  # quintic band, with bf16 noise


def test_schedule_steps_mismatch_raises():
    G = torch.randn(8, 16)
    with pytest.raises(UserError, match="8 steps but steps=5"):
        zeropower_via_newtonschulz(G, HANDOVER8, steps=5)
    assert torch.equal(zeropower_via_newtonschulz(G, HANDOVER8, steps=8, dtype=torch.float32),
                       zeropower_via_newtonschulz(G, HANDOVER8, dtype=torch.float32))
    assert len(ns_schedule(QUINTIC)) == 5 and len(ns_schedule(QUINTIC, 3)) == 3


@pytest.mark.parametrize("bad, match", [
    ((1.0, 2.0), "3 finite numbers .*got 2 values"),
    ([(1.0, 2.0, 3.0), (1.0, 2.0)], "triple 1 must be 3 finite numbers .*got 2 values"),
    ((1.0, math.nan, 3.0), "finite"),
    ((1.0, math.inf, 3.0), "finite"),
    ([], "triple or a list"),
    ([1.0, (1.0, 2.0, 3.0)], "mix"),
    ((True, 1.0, 1.0), "mix numbers and triples"),  # a bool is not a coefficient
])
def test_malformed_coefficients_raise(bad, match):
    with pytest.raises(UserError, match=match):
        zeropower_via_newtonschulz(torch.randn(4, 4), bad)
    with pytest.raises(UserError, match=match):
        resolve_ns_coeffs(bad)


@pytest.mark.parametrize("steps", [0, -2, 2.5])
def test_bad_steps_raise(steps):
    with pytest.raises(UserError, match="steps must be a positive integer"):
        zeropower_via_newtonschulz(torch.randn(4, 4), QUINTIC, steps=steps)


def test_non_matrix_input_raises():
    with pytest.raises(UserError, match=r"matrix or a batch of matrices .*\(7,\)"):
        zeropower_via_newtonschulz(torch.randn(7))


def test_resolve_presets_and_literals():
    assert resolve_ns_coeffs("quintic") == QUINTIC
    assert resolve_ns_coeffs(" handover8 ") == HANDOVER8
    assert resolve_ns_coeffs("3.4445,-4.775,2.0315") == (3.4445, -4.775, 2.0315)
    assert resolve_ns_coeffs("[3, -3.2, 1.2]") == (3.0, -3.2, 1.2)
    assert resolve_ns_coeffs("[[3, -3.2, 1.2], [2, -1.5, 0.5]]") == [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert resolve_ns_coeffs([[3, -3.2, 1.2]]) == [(3.0, -3.2, 1.2)]
    with pytest.raises(UserError, match=r"unknown NS coefficient preset 'nanogpt_medium' \(known: quintic, cubic, "
                                        r"polar_express5, handover8"):
        resolve_ns_coeffs("nanogpt_medium")
    with pytest.raises(UserError, match="cannot parse NS coefficients"):
        resolve_ns_coeffs("3.4,x,2")
    with pytest.raises(UserError, match="cannot parse NS coefficients"):
        resolve_ns_coeffs("[[3, -3.2, 1.2]")


def test_generalised_iteration_matches_the_triple_form():
    """odd_polynomial_iteration with (a, b, c), with the terms summed in reverse, and with an adaptive callable
    returning (a, b, c) all give the same map; (a,) is plain scaling and (a, b) the cubic polynomial."""
    X = controlled_matrix(torch.logspace(-2, 0, 16), 16, 40).float()
    ref = odd_polynomial_iteration(X, [QUINTIC] * 3)
    assert torch.allclose(odd_polynomial_iteration(X, [QUINTIC] * 3, descending=True), ref, atol=1e-6)
    assert torch.allclose(odd_polynomial_iteration(X, [lambda A: QUINTIC] * 3), ref, atol=1e-6)
    assert torch.allclose(odd_polynomial_iteration(X, [(2.0,)]), 2 * X)
    s = singular_values(X)
    out = singular_values(odd_polynomial_iteration(X, [(1.5, -0.5)]))
    assert torch.allclose(out, 1.5 * s - 0.5 * s**3, atol=1e-5)
    iterates = []
    odd_polynomial_iteration(X, HANDOVER8, iterates=iterates)
    assert len(iterates) == 8


def test_train_flags():
    """--muon-ns-coeffs / --muon-ns-steps: presets and literals pass, mismatches fail naming both flags."""
    from nanochat.config import TrainConfig, build_config

    cfg, _ = build_config(TrainConfig, ["--muon-ns-coeffs", "handover8"], "test")
    assert cfg.muon_ns_coeffs == "handover8" and cfg.muon_ns_steps == 0
    build_config(TrainConfig, ["--muon-ns-coeffs", "3,-3.2,1.2", "--muon-ns-steps", "8"], "test")
    with pytest.raises(UserError, match=r"--muon-ns-coeffs 'handover8' / --muon-ns-steps 5: .*8 steps"):
        build_config(TrainConfig, ["--muon-ns-coeffs", "handover8", "--muon-ns-steps", "5"], "test")
    with pytest.raises(UserError, match="--muon-ns-coeffs 'quintik'.*unknown NS coefficient preset"):
        build_config(TrainConfig, ["--muon-ns-coeffs", "quintik"], "test")
    with pytest.raises(UserError, match="--muon-ns-steps must be >= 0"):
        build_config(TrainConfig, ["--muon-ns-steps", "-1"], "test")
