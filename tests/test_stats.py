"""nanochat/stats.py against values computed by hand from the definitions."""
import math

import pytest

from nanochat.stats import accuracy, mcnemar_paired, mean_ci, paired_mean


def test_wilson_interval_matches_its_formula():
    k, n, z = 7, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    r = accuracy([1] * k + [0] * (n - k))
    assert (r["n"], r["correct"], r["acc"]) == (20, 7, 0.35)
    assert r["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-9)
    assert accuracy([])["acc"] is None


def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs():
    # 6 problems only b solves, 1 only a solves, 13 agree: two-sided binomial p = 2 * P(X <= 1 | 7, 1/2) = 16/128
    a = [1] * 1 + [0] * 6 + [1] * 5 + [0] * 8
    b = [0] * 1 + [1] * 6 + [1] * 5 + [0] * 8
    r = mcnemar_paired(a, b)
    assert (r["a_only"], r["b_only"], r["n"]) == (1, 6, 20)
    assert r["p_value"] == pytest.approx(16 / 128)
    assert r["diff"] == pytest.approx(5 / 20)
    lo, hi = r["diff_ci95"]
    assert lo < 0.25 < hi
    assert mcnemar_paired(a, a)["p_value"] == 1.0 and mcnemar_paired(a, a)["diff"] == 0
    with pytest.raises(ValueError, match="length"):
        mcnemar_paired(a, b[:-1])


def test_paired_t_and_mean_interval():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [1.5, 2.5, 3.0, 5.0]  # differences 0.5, 0.5, 0, 1: mean 0.5, sd sqrt(1/6)
    r = paired_mean(a, b)
    d_mean, d_sd = 0.5, math.sqrt(1 / 6)
    t = d_mean / (d_sd / 2)
    assert r["diff"] == pytest.approx(0.5) and r["n"] == 4
    # two-sided p of t = 2.449 with 3 degrees of freedom
    from scipy import stats
    assert r["p_value"] == pytest.approx(2 * stats.t.sf(t, 3))
    half = stats.t.ppf(0.975, 3) * d_sd / 2
    assert r["diff_ci95"] == pytest.approx([0.5 - half, 0.5 + half])
    assert mean_ci([2.0])["ci95"] == [2.0, 2.0]
