"""Statistics for reported numbers, from statsmodels and scipy (not hand-written): every accuracy with n and a 95%
Wilson interval, every paired comparison of two arms on the same examples with a test and the difference's CI.

- wilson_interval(k, n), accuracy(correct)   n, k, acc, Wilson 95% CI
- mcnemar_paired(a, b)               McNemar's exact test on paired 0/1 outcomes, and the accuracy difference b - a
                                     with the Wald 95% interval of a paired difference of proportions
- mean_ci(x), paired_mean(a, b)      mean with a t interval; paired t-test of b - a (scipy)
- tost_paired(a, b, margin)          equivalence of b and a within +-margin: two one-sided paired t-tests
                                     (statsmodels' ttost_paired); the only way a tie is declared
- iqm(x), seeds_summary(x)           interquartile mean; mean, IQM and bootstrap CIs over seeds
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.weightstats import ttost_paired
from statsmodels.stats.proportion import proportion_confint

ALPHA = 0.05


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n (statsmodels); (nan, nan) when n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    lo, hi = proportion_confint(k, n, alpha=ALPHA, method="wilson")
    return (float(lo), float(hi))


def accuracy(correct) -> dict:
    c = np.asarray(correct, dtype=bool)
    n, k = int(c.size), int(c.sum())
    if n == 0:
        return dict(n=0, correct=0, acc=None, ci95=None, ci_method="wilson")
    return dict(n=n, correct=k, acc=k / n, ci95=list(wilson_interval(k, n)), ci_method="wilson")


def mcnemar_paired(a, b) -> dict:
    """Arm b against arm a on the same examples (0/1 outcomes). McNemar's exact (binomial) test on the discordant
    pairs; the difference b - a with the Wald interval of a paired difference of proportions."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in length ({a.size} vs {b.size})")
    n = int(a.size)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    table = [[int((a & b).sum()), only_a], [only_b, int((~a & ~b).sum())]]
    p = float(mcnemar(table, exact=True).pvalue) if n else None
    diff = (only_b - only_a) / n if n else None
    ci = None
    if n:
        var = ((only_a + only_b) / n - diff ** 2) / n
        half = sps.norm.ppf(1 - ALPHA / 2) * math.sqrt(max(var, 0.0))
        ci = [diff - half, diff + half]
    return dict(test="mcnemar_exact", n=n, b_only=only_b, a_only=only_a, diff=diff, diff_ci95=ci, p_value=p)


def mean_ci(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return dict(n=0, mean=None, ci95=None)
    m = float(x.mean())
    if n < 2 or x.std() == 0:
        return dict(n=n, mean=m, ci95=[m, m])
    lo, hi = sps.t.interval(1 - ALPHA, n - 1, loc=m, scale=sps.sem(x))
    return dict(n=n, mean=m, ci95=[float(lo), float(hi)], ci_method="t")


def paired_mean(a, b) -> dict:
    """Mean of b - a over paired examples with a t interval, and the paired t-test's p-value."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length ({a.size} vs {b.size})")
    d = b - a
    out = mean_ci(d)
    p = None
    if d.size >= 2 and d.std() > 0:
        p = float(sps.ttest_rel(b, a).pvalue)
    elif d.size:
        p = 1.0 if not d.any() else 0.0  # identical differences: no variance to test against
    return dict(test="paired_t", n=out["n"], diff=out["mean"], diff_ci95=out["ci95"], p_value=p)


def tost_paired(a, b, margin: float) -> dict:
    """Is b equivalent to a within +-margin? Two one-sided paired t-tests of b - a against -margin and +margin
    (statsmodels); equivalent when p < 0.05. For 0/1 outcomes this is the paired t approximation on the
    differences."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length ({a.size} vs {b.size})")
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be > 0 (got {margin})")
    d = b - a
    if d.size < 2:
        return dict(test="tost_paired", margin=margin, n=int(d.size), p_value=None, equivalent=False)
    if d.std() == 0:   # no spread: equivalent exactly when the constant difference lies inside the margin
        p = 0.0 if abs(d[0]) < margin else 1.0
    else:
        p = float(ttost_paired(b, a, -margin, margin)[0])
    return dict(test="tost_paired", margin=margin, n=int(d.size), diff=float(d.mean()), p_value=p,
                equivalent=bool(p < ALPHA))


def iqm(x) -> float:
    """Interquartile mean (the mean of the middle 50%, Agarwal et al. 2021): robust to one odd seed."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = x.size
    lo, hi = int(np.floor(0.25 * n)), int(np.ceil(0.75 * n))
    return float(x[lo:hi].mean()) if hi > lo else float(x.mean())


def seeds_summary(x, seed: int = 0, n_boot: int = 2000) -> dict:
    """Mean and IQM of one figure over seeds, each with a percentile bootstrap 95% CI over the seeds."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = x[rng.integers(0, x.size, size=(n_boot, x.size))]
    iqms = np.array([iqm(d) for d in draws])
    return dict(n_seeds=int(x.size), values=x.tolist(), mean=float(x.mean()),
                mean_ci=[float(np.percentile(draws.mean(1), 2.5)), float(np.percentile(draws.mean(1), 97.5))],
                iqm=iqm(x), iqm_ci=[float(np.percentile(iqms, 2.5)), float(np.percentile(iqms, 97.5))])
