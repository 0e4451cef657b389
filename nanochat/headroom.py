"""How much a context-dependent gate policy could gain over the best fixed gate, measured before any learner runs.

The input is a reward table per replicate: rewards[i, g] of problem i under gate set g, measured twice with
independent noise (replicates A and B; analysis/gate_oracle.py builds them from a model: the dense reward's even and
odd answer tokens, or two sampled decodes). Every estimate here picks on one replicate and scores on the other, so
noise that favours a gate on one problem cannot be counted as headroom.

- headroom(a, b): the naive estimate mean_i max_g r - max_g mean_i r (on the mean of both replicates: biased
  upwards by noise, it is > 0 even when every problem has the same best gate) and the *split* estimate: pick each
  problem's gate on A and score it on B, minus the best fixed gate picked on A and scored on B, then swap A and B and
  average. The split estimate is conservative (a noisy pick loses reward), so it is a lower bound in expectation; a
  paired bootstrap over problems gives its CI.
- interaction_test(a, b): the problem x gate interaction F-test of a two-way ANOVA with the two replicates as the
  error (each problem's per-replicate level removed first: the dense reward's even and odd halves differ by a
  per-problem offset that is no interaction). Closed form for a balanced table; tests/test_gate_oracle.py checks it
  against statsmodels' anova_lm.
- cross_fitted(a, b, obs, types): contextual baselines, cross-fitted over K folds of problems: each policy is fit on
  the other folds' replicate A, chooses a gate for every held-out problem, and is scored with replicate B (then the
  roles swap). Policies: the best fixed gate, ridge regression of the reward on whitened features per gate, k-NN,
  a per-cluster grid (k-means) and a per-type grid. Each gets V_pi - V_fix with a paired bootstrap CI and the closed
  gap (V_pi - V_fix) / (V_orc - V_fix), V_orc being the split oracle (None when the split oracle does not beat
  the fixed gate: per-problem picks then drown in noise, while a policy pooled over problems may still gain).
"""
from __future__ import annotations

import numpy as np
from scipy import stats as sps

from nanochat.common import UserError

BOOTSTRAP = 2000            # resamples for every CI here (the 2.5/97.5 percentiles are stable to ~1e-2 of a CI width)
POLICIES = ("fixed", "ridge", "knn", "cluster", "type")
MAX_FEATURES = 32           # whitened principal components the ridge / k-NN / k-means policies read


def check_tables(rewards_a, rewards_b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(rewards_a, dtype=np.float64), np.asarray(rewards_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise UserError(f"reward tables must be 2-D [problems, gates]; got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise UserError(f"the two replicate tables differ in shape: {a.shape} vs {b.shape} (both must be "
                        f"[problems, gates] over the same problems and gates)")
    if a.shape[1] < 2:
        raise UserError(f"a grid of {a.shape[1]} gate has no headroom to measure: score at least 2 gates")
    if a.shape[0] < 2:
        raise UserError(f"{a.shape[0]} problem is too few to estimate headroom (need at least 2)")
    bad = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
    if bad:
        raise UserError(f"the reward tables hold {bad} non-finite value(s)")
    return a, b


def _resample_weights(n: int, seed: int, n_boot: int = BOOTSTRAP) -> np.ndarray:
    """[n_boot, n] multinomial counts: row r says how often each problem appears in bootstrap sample r."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_mean_ci(x, seed: int = 0, n_boot: int = BOOTSTRAP, alpha: float = 0.05) -> list[float]:
    """Percentile (1 - alpha) CI of the mean of x over problems."""
    x = np.asarray(x, dtype=np.float64)
    means = _resample_weights(x.size, seed, n_boot) @ x / x.size
    return [float(np.percentile(means, 50 * alpha)), float(np.percentile(means, 100 - 50 * alpha))]


def headroom(rewards_a, rewards_b, seed: int = 0) -> dict:
    """Naive and split headroom of a per-problem gate choice over the best fixed gate; see the module docstring.
    Returns naive, split, split_ci (lo, hi), best_fixed (column index), the values behind them and the per-problem
    best gates (of the mean table)."""
    a, b = check_tables(rewards_a, rewards_b)
    P, G = a.shape
    mean = (a + b) / 2
    best_fixed = int(np.argmax(mean.mean(0)))
    naive = float(mean.max(1).mean() - mean.mean(0).max())
    pick_a, pick_b = a.argmax(1), b.argmax(1)           # [P] each problem's gate on one replicate
    rows = np.arange(P)
    own_ab, own_ba = b[rows, pick_a], a[rows, pick_b]   # [P] scored on the other replicate
    fix_a, fix_b = int(np.argmax(a.mean(0))), int(np.argmax(b.mean(0)))
    gain = 0.5 * ((own_ab - b[:, fix_a]) + (own_ba - a[:, fix_b]))   # [P]
    # the bootstrap redraws problems and re-picks the fixed gates on each resample (the per-problem picks stay)
    w = _resample_weights(P, seed)                       # [n_boot, P]
    fa, fb = np.argmax(w @ a, 1), np.argmax(w @ b, 1)    # [n_boot]
    boot = 0.5 * ((w @ own_ab - (w @ b)[np.arange(len(w)), fa]) + (w @ own_ba - (w @ a)[np.arange(len(w)), fb])) / P
    counts = np.bincount(mean.argmax(1), minlength=G)
    return dict(naive=naive, split=float(gain.mean()),
                split_ci=(float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))),
                best_fixed=best_fixed, best_fixed_value=float(mean.mean(0)[best_fixed]),
                oracle_value=float(mean.max(1).mean()), split_oracle_value=float(0.5 * (own_ab + own_ba).mean()),
                split_fixed_value=float(0.5 * (b[:, fix_a] + a[:, fix_b]).mean()),
                best_gate_counts=counts.tolist(), n_problems=P, n_gates=G)


def interaction_test(rewards_a, rewards_b) -> dict:
    """Problem x gate interaction: F = MS_interaction / MS_error, with each problem's level removed per replicate.
    Interaction SS: 2 sum (m_ig - m_.g)^2 over the row-centred mean table m, df (P-1)(G-1); error SS: the
    replicates' disagreement, sum (a'_ig - b'_ig)^2 / 2 over the row-centred tables, df P(G-1)."""
    a, b = check_tables(rewards_a, rewards_b)
    P, G = a.shape
    ca, cb = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    m = (ca + cb) / 2
    ss_int = 2 * ((m - m.mean(0, keepdims=True)) ** 2).sum()
    ss_err = ((ca - cb) ** 2).sum() / 2
    df_int, df_err = (P - 1) * (G - 1), P * (G - 1)
    if ss_err <= 0:
        return dict(test="two-way ANOVA, problem x gate", F=None, df=[df_int, df_err], p_value=None,
                    note="the replicates agree exactly: no error variance to test against")
    F = (ss_int / df_int) / (ss_err / df_err)
    return dict(test="two-way ANOVA, problem x gate", F=float(F), df=[df_int, df_err],
                p_value=float(sps.f.sf(F, df_int, df_err)))


# -- contextual baselines, cross-fitted ---------------------------------------------------------------------------

def _whiten(train_obs: np.ndarray, test_obs: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA-whitened features (fit on the training problems only), at most MAX_FEATURES components."""
    from sklearn.decomposition import PCA
    k = max(1, min(MAX_FEATURES, train_obs.shape[0] - 1, train_obs.shape[1]))
    pca = PCA(n_components=k, whiten=True, random_state=seed).fit(train_obs)
    return pca.transform(train_obs), pca.transform(test_obs)


def _choose(policy: str, rewards: np.ndarray, obs_tr, obs_te, types_tr, types_te, seed: int) -> np.ndarray:
    """Gate indices for the held-out problems, from a policy fit on (obs_tr, rewards [n, G], types_tr)."""
    n_te = len(obs_te) if obs_te is not None else len(types_te)
    fixed = int(np.argmax(rewards.mean(0)))
    centred = rewards - rewards.mean(1, keepdims=True)   # a problem's level does not change its best gate
    if policy == "fixed":
        return np.full(n_te, fixed)
    if policy == "type":
        out = np.full(n_te, fixed)
        for t in set(types_te):
            seen = types_tr == t
            if seen.any():
                out[types_te == t] = int(np.argmax(centred[seen].mean(0)))
        return out
    x_tr, x_te = _whiten(obs_tr, obs_te, seed)
    if policy == "ridge":
        from sklearn.linear_model import RidgeCV
        model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_tr, centred)
        return np.argmax(model.predict(x_te), 1)
    if policy == "knn":
        from sklearn.neighbors import NearestNeighbors
        k = int(np.clip(round(np.sqrt(len(x_tr))), 3, len(x_tr)))
        idx = NearestNeighbors(n_neighbors=k).fit(x_tr).kneighbors(x_te, return_distance=False)   # [n_te, k]
        return np.argmax(centred[idx].mean(1), 1)
    if policy == "cluster":
        from sklearn.cluster import KMeans
        k = int(np.clip(len(x_tr) // 20, 2, 8))            # ~20+ problems per cluster to pick a gate on
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(x_tr)
        best = [int(np.argmax(centred[km.labels_ == c].mean(0))) if (km.labels_ == c).any() else fixed
                for c in range(k)]
        return np.asarray(best)[km.predict(x_te)]
    raise UserError(f"unknown contextual policy {policy!r} (known: {', '.join(POLICIES)})")


def cross_fitted(rewards_a, rewards_b, obs=None, types=None, folds: int = 5, seed: int = 0,
                 policies=POLICIES, learners: dict | None = None) -> dict:
    """Each policy's cross-fitted per-problem value and its gain over the best fixed gate (see the module
    docstring). obs: [P, C] observations (None skips ridge, k-NN and clusters); types: [P] labels (None skips the
    per-type grid). learners: name -> fit(rewards [n, G], obs_tr, obs_te, seed) -> gate indices of the held-out
    problems, scored in the same folds (analysis/gate_oracle.py passes RL learners trained on the table)."""
    a, b = check_tables(rewards_a, rewards_b)
    P, G = a.shape
    if obs is not None:
        obs = np.asarray(obs, dtype=np.float64)
        if obs.ndim != 2 or len(obs) != P:
            raise UserError(f"observations must be [problems, features] with {P} problems; got shape {obs.shape}")
    if types is not None:
        types = np.asarray(types)
        if types.shape != (P,):
            raise UserError(f"types must hold one label per problem ({P}); got shape {types.shape}")
    if folds < 2:
        raise UserError(f"cross-fitting needs at least 2 folds (got {folds})")
    if P < 5 * folds:
        raise UserError(f"{P} problems are too few for {folds} folds (need at least {5 * folds}, five per fold)")
    wanted = [p for p in policies if (p not in ("ridge", "knn", "cluster") or obs is not None)
              and (p != "type" or types is not None)]
    learners = dict(learners or {})
    if learners and obs is None:
        raise UserError("learners on the table need observations")
    wanted += list(learners)
    fold = np.random.default_rng(seed).permutation(P) % folds
    rows = np.arange(P)
    values = {p: np.zeros(P) for p in wanted}
    for f in range(folds):
        te, tr = fold == f, fold != f
        for p in wanted:
            if p in learners:
                pick_a = learners[p](a[tr], obs[tr], obs[te], seed)
                pick_b = learners[p](b[tr], obs[tr], obs[te], seed)
                values[p][te] = 0.5 * (b[rows[te], pick_a] + a[rows[te], pick_b])
                continue
            args = (obs[tr] if obs is not None else None, obs[te] if obs is not None else None,
                    types[tr] if types is not None else None, types[te] if types is not None else None, seed)
            pick_a = _choose(p, a[tr], *args)            # fit on A, score on B
            pick_b = _choose(p, b[tr], *args)            # and the other way round
            values[p][te] = 0.5 * (b[rows[te], pick_a] + a[rows[te], pick_b])
    oracle = 0.5 * (b[rows, a.argmax(1)] + a[rows, b.argmax(1)])
    v_fix = values["fixed"] if "fixed" in values else None
    out = dict(folds=folds, n_problems=P, oracle_value=float(oracle.mean()), policies={},
               per_problem={p: v.tolist() for p, v in values.items()} | dict(oracle=oracle.tolist()))
    m = max(1, len([p for p in values if p != "fixed"]))   # contextual policies compared with the fixed gate
    for p, v in values.items():
        rec = dict(value=float(v.mean()))
        if v_fix is not None and p != "fixed":
            d = v - v_fix
            gap = float(oracle.mean() - v_fix.mean())
            # gain_ci_adjusted: Bonferroni over the m policies, for "does the best of them beat the fixed gate"
            rec.update(gain=float(d.mean()), gain_ci=bootstrap_mean_ci(d, seed),
                       gain_ci_adjusted=bootstrap_mean_ci(d, seed, alpha=0.05 / m),
                       closed_gap=float(d.mean() / gap) if gap > 0 else None)
        out["policies"][p] = rec
    if v_fix is not None:
        out["fixed_value"] = float(v_fix.mean())
        out["oracle_gain"] = float((oracle - v_fix).mean())
        out["oracle_gain_ci"] = bootstrap_mean_ci(oracle - v_fix, seed)
    return out


def per_type_grid(rewards_a, rewards_b, types, seed: int = 0) -> dict:
    """The stratified grid: per type, the mean reward curve (both replicates averaged) with a bootstrap CI at its
    best gate, the best gate, and its gain over the overall best fixed gate on that type's problems with a CI."""
    a, b = check_tables(rewards_a, rewards_b)
    types = np.asarray(types)
    mean = (a + b) / 2
    overall = int(np.argmax(mean.mean(0)))
    out = {}
    for t in sorted(set(types.tolist())):
        m = mean[types == t]
        best = int(np.argmax(m.mean(0)))
        out[str(t)] = dict(n=int(len(m)), curve=m.mean(0).tolist(), best_gate=best,
                           best_value_ci=bootstrap_mean_ci(m[:, best], seed),
                           gain_over_overall=float((m[:, best] - m[:, overall]).mean()),
                           gain_over_overall_ci=bootstrap_mean_ci(m[:, best] - m[:, overall], seed))
    return dict(overall_best=overall, types=out)


def over_seeds(rewards_a, rewards_b, obs=None, types=None, folds: int = 5, seeds=(0, 1, 2, 3, 4),
               margin: float = 1e-3, learners: dict | None = None, done: dict | None = None) -> dict:
    """cross_fitted over several seeds (fold assignments, and each learner's own seed): per policy, the gain over
    the fixed gate and the closed gap summarised over seeds (mean, IQM, bootstrap CIs), and a TOST of the policy
    against the fixed gate on the per-problem values averaged over seeds (a tie needs equivalence within
    +-margin, not a large p). done: {seed: cross_fitted result} already computed with the same settings."""
    from nanochat.stats import paired_mean, seeds_summary, tost_paired
    done = done or {}
    runs = [done[s] if s in done else cross_fitted(rewards_a, rewards_b, obs, types, folds, s, learners=learners)
            for s in seeds]
    out = dict(seeds=list(seeds), folds=folds, margin=margin, policies={})
    fixed = np.mean([r["per_problem"]["fixed"] for r in runs], 0)
    for name in runs[0]["policies"]:
        if name == "fixed":
            continue
        gains = [r["policies"][name]["gain"] for r in runs]
        gaps = [r["policies"][name]["closed_gap"] for r in runs]
        v = np.mean([r["per_problem"][name] for r in runs], 0)
        out["policies"][name] = dict(gain=seeds_summary(gains),
                                     closed_gap=seeds_summary(gaps) if all(g is not None for g in gaps) else None,
                                     vs_fixed=paired_mean(fixed, v), tost_vs_fixed=tost_paired(fixed, v, margin))
    return out
