"""The headroom estimates and the cross-fitted contextual baselines (nanochat/headroom.py, analysis/gate_oracle.py)
on tables with a known truth: pure noise (no headroom), a planted per-problem optimum, a planted type-dependent
optimum; the interaction test against statsmodels; bad input named."""
import numpy as np
import pytest

from analysis.gate_oracle import headroom
from nanochat.common import UserError
from nanochat.headroom import cross_fitted, interaction_test, per_type_grid

GATES = np.linspace(0, 1, 11)


def _curve(g):
    return -0.1 * (g - 0.3) ** 2           # one shared gate curve, best fixed gate 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_split_claims_nothing_naive_claims_something(seed):
    rng = np.random.default_rng(seed)
    P = 256
    level = rng.normal(-1.0, 0.3, size=(P, 1))           # problems differ in level only
    truth = level + _curve(GATES)[None]
    a = truth + rng.normal(0, 0.002, truth.shape)
    b = truth + rng.normal(0, 0.002, truth.shape)
    h = headroom(a, b, seed=seed)
    assert h["split_ci"][0] <= 0.0                       # the truth (0) is not excluded from below
    assert h["naive"] > 0.0                              # naive counts noise as headroom ...
    assert h["naive"] > h["split_ci"][1]                 # ... and lies above the split estimate
    assert GATES[h["best_fixed"]] == pytest.approx(0.3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_per_problem_optimum_is_recovered_conservatively(seed):
    rng = np.random.default_rng(seed)
    P = 400
    best = rng.choice(GATES, size=P)                     # each problem has its own best gate
    truth = rng.normal(-1.0, 0.3, size=(P, 1)) - 0.02 * (GATES[None] - best[:, None]) ** 2
    a = truth + rng.normal(0, 0.001, truth.shape)
    b = truth + rng.normal(0, 0.001, truth.shape)
    true_headroom = truth.max(1).mean() - truth.mean(0).max()
    h = headroom(a, b, seed=seed)
    assert h["split_ci"][0] > 0.0
    assert 0.7 * true_headroom <= h["split"] <= 1.0 * true_headroom, (h["split"], true_headroom)


def test_interaction_test_matches_statsmodels_anova():
    pd = pytest.importorskip("pandas")
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm
    rng = np.random.default_rng(0)
    P, G = 7, 4
    truth = rng.normal(size=(P, G)) * 0.3 + rng.normal(size=(P, 1))
    a = truth + rng.normal(0, 0.5, (P, G))
    b = truth + rng.normal(0, 0.5, (P, G)) + rng.normal(0, 1.0, (P, 1))   # a per-problem replicate offset
    rows = [dict(y=t[i, g], p=i, g=g, rep=r) for r, t in enumerate((a, b)) for i in range(P) for g in range(G)]
    table = anova_lm(ols("y ~ C(p) + C(g) + C(p):C(rep) + C(p):C(g)", data=pd.DataFrame(rows)).fit(), typ=1)
    ours = interaction_test(a, b)
    assert ours["df"] == [int(table.loc["C(p):C(g)", "df"]), int(table.loc["Residual", "df"])]
    assert ours["F"] == pytest.approx(table.loc["C(p):C(g)", "F"], rel=1e-8)
    assert ours["p_value"] == pytest.approx(table.loc["C(p):C(g)", "PR(>F)"], rel=1e-6)


def test_interaction_test_separates_noise_from_planted_interaction():
    rng = np.random.default_rng(3)
    P = 200
    noise = rng.normal(-1, 0.2, (P, 1)) + _curve(GATES)[None]
    best = rng.choice(GATES, size=P)
    planted = noise - 0.02 * (GATES[None] - best[:, None]) ** 2
    for truth, significant in ((noise, False), (planted, True)):
        a = truth + rng.normal(0, 0.001, truth.shape)
        b = truth + rng.normal(0, 0.001, truth.shape)
        p = interaction_test(a, b)["p_value"]
        assert (p < 0.01) if significant else (p > 0.01), p


def _typed_table(seed, P=300, noise=0.001):
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, size=P)
    best = np.array([0.0, 0.5, 1.0])[types]             # the best gate depends on the problem's type
    truth = rng.normal(-1, 0.3, (P, 1)) - 0.004 * (GATES[None] - best[:, None]) ** 2
    a = truth + rng.normal(0, noise, truth.shape)
    b = truth + rng.normal(0, noise, truth.shape)
    centres = rng.normal(0, 1, (3, 16)) * 2.0
    obs = centres[types] + rng.normal(0, 1, (P, 16))     # the type is readable from the observation
    return a, b, obs, types, truth


def test_cross_fitted_baselines_recover_a_planted_type_dependent_optimum():
    a, b, obs, types, truth = _typed_table(0)
    res = cross_fitted(a, b, obs=obs, types=types, folds=5, seed=0)
    for name in ("type", "ridge", "knn", "cluster"):
        rec = res["policies"][name]
        assert rec["gain_ci"][0] > 0.0, (name, rec)
        assert rec["closed_gap"] > 0.6, (name, rec)
    grid = per_type_grid(a, b, types)
    found = [grid["types"][str(t)]["best_gate"] for t in range(3)]
    assert np.abs(np.array(found) - [0, 5, 10]).max() <= 1, found   # within one grid step of the planted gates


def test_cross_fitted_baselines_find_nothing_without_context():
    rng = np.random.default_rng(1)
    P = 200
    truth = rng.normal(-1, 0.3, (P, 1)) + _curve(GATES)[None]
    a, b = truth + rng.normal(0, 0.002, truth.shape), truth + rng.normal(0, 0.002, truth.shape)
    res = cross_fitted(a, b, obs=rng.normal(size=(P, 8)), types=rng.integers(0, 3, P), folds=5)
    for name in ("type", "ridge", "knn", "cluster"):
        assert res["policies"][name]["gain_ci"][0] <= 0.0, (name, res["policies"][name])


def test_bad_input_is_named():
    a = np.zeros((20, 11))
    with pytest.raises(UserError, match="differ in shape"):
        headroom(a, np.zeros((20, 10)))
    with pytest.raises(UserError, match="grid of 1 gate"):
        headroom(np.zeros((20, 1)), np.zeros((20, 1)))
    with pytest.raises(UserError, match="too few for 5 folds"):
        cross_fitted(a, a, types=np.zeros(20), folds=5)
    with pytest.raises(UserError, match="non-finite"):
        headroom(np.full((4, 3), np.nan), np.zeros((4, 3)))
    with pytest.raises(UserError, match="one label per problem"):
        cross_fitted(np.zeros((50, 3)), np.zeros((50, 3)), types=np.zeros(49))


def test_cli_reanalyses_saved_tables_and_says_headroom_when_it_is_there(tmp_path):
    """analysis.gate_oracle --from-tables on a planted type-dependent table: the verdict says headroom, the
    per-type grid wins over seeds, and the RL learner trained on the table is reported in the same folds."""
    import json

    from analysis.gate_oracle import main
    a, b, obs, types, _ = _typed_table(0, P=200)
    np.savez(tmp_path / "t.npz", a=a, b=b, obs=obs.astype(np.float32), types=types.astype(str),
             gates=GATES[:, None].astype(np.float32))
    (tmp_path / "t.json").write_text(json.dumps(dict(
        checkpoint="planted", step=0, problems=dict(count=200, source="planted:types"), action_space="global",
        gate_vectors=GATES[:, None].tolist(), learned_gates=[0.5], replicates="dense", temperature=None,
        gates=[f"{g:.1f}" for g in GATES])))
    out = main(["--from-tables", str(tmp_path / "t.npz"), "--learners", "rloo", "--learner-budget", "256",
                "--seeds", "0,1"])
    assert out["verdict"].startswith("headroom")
    assert out["over_seeds"]["policies"]["type"]["gain"]["mean_ci"][0] > 0
    assert "rloo" in out["baselines"]["policies"] and out["learners"]["budget"] == 256
    assert (tmp_path / "t_reanalysed.json").exists() and (tmp_path / "t_reanalysed.png").stat().st_size > 0
