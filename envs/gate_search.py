"""What the RL controller has to beat, and the held-out evaluation of every arm.

Black-box baselines search for one fixed gate vector, on the same training problems and the same evaluation budget
as PPO (the number of problems scored), with the same reward:
- grid_search: the global gate over a grid (default 0, 0.1, ..., 1), every point on the same problems;
- random_search: uniform random per-layer gate vectors, every candidate on the same problems;
- evolution_strategy: a (mu/mu, lambda)-ES over per-layer gates from the learned gates, a fresh problem batch per
  generation shared by its candidates.
A fixed vector is what a context-dependent policy must beat: if it does not, RL found nothing a search could not.

evaluate_arms scores named arms (a gate vector, a policy, or None for the learned gates) on held-out problems with
both metrics (exact match and dense reward), and compares each with the reference arm on the same problems:
McNemar's exact test for accuracy, a paired t-test for the dense reward (nanochat/stats.py).
"""
from __future__ import annotations

import numpy as np

from nanochat.common import UserError
from nanochat.stats import accuracy, mcnemar_paired, mean_ci, paired_mean, tost_paired

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def _sample(problems, count: int, rng: np.random.Generator) -> list:
    """`count` problems without replacement (cycling through reshuffles when count > len(problems))."""
    out = []
    while len(out) < count:
        order = rng.permutation(len(problems))[:count - len(out)]
        out += [problems[i] for i in order]
    return out


def _score_candidates(scorer, problems, candidates: np.ndarray, action_space: str) -> np.ndarray:
    """Mean reward of each candidate gate vector ([M, k]) on the same problems, in batched calls."""
    M, P = len(candidates), len(problems)
    rewards = scorer.rewards(problems * M, np.repeat(candidates, P, axis=0), action_space=action_space)
    return rewards.reshape(M, P).mean(1)


def _check_budget(budget: int, per: int, what: str):
    if per < 1:
        raise UserError(f"an evaluation budget of {budget} problems is too small for the {what} (it needs at least "
                        f"one problem per candidate)")


def grid_search(scorer, problems, budget: int, grid=DEFAULT_GRID, seed: int = 0) -> dict:
    grid = np.asarray(grid, dtype=np.float32)
    per = budget // len(grid)
    _check_budget(budget, per, "grid")
    batch = _sample(problems, per, np.random.default_rng(seed))
    means = _score_candidates(scorer, batch, grid[:, None], "global")
    best = int(np.argmax(means))
    return dict(method="grid", action_space="global", budget=per * len(grid), problems_per_candidate=per,
                table=[dict(gates=[float(g)], mean_reward=float(m)) for g, m in zip(grid, means)],
                best_gates=[float(grid[best])], best_train_reward=float(means[best]))


def random_search(scorer, problems, budget: int, num_candidates: int = 16, action_space: str = "per_layer",
                  seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    per = budget // num_candidates
    _check_budget(budget, per, "random search")
    k = scorer.default_gates(action_space).size
    candidates = rng.uniform(0, 1, size=(num_candidates, k)).astype(np.float32)
    batch = _sample(problems, per, rng)
    means = _score_candidates(scorer, batch, candidates, action_space)
    best = int(np.argmax(means))
    return dict(method="random", action_space=action_space, budget=per * num_candidates, problems_per_candidate=per,
                table=[dict(gates=c.tolist(), mean_reward=float(m)) for c, m in zip(candidates, means)],
                best_gates=candidates[best].tolist(), best_train_reward=float(means[best]))


def evolution_strategy(scorer, problems, budget: int, population: int = 8, parents: int = 4,
                       generations: int = 8, sigma: float = 0.2, action_space: str = "per_layer",
                       seed: int = 0) -> dict:
    """(mu/mu, lambda)-ES: each generation samples `population` vectors around the mean (clipped to [0, 1]),
    scores them on one fresh shared problem batch, and moves the mean to the average of the best `parents`;
    sigma decays geometrically to a quarter over the run. The result is the final mean; its `best_train_reward`
    is the best candidate's of the last generation (the mean itself costs no extra budget, so it is not scored)."""
    if not 1 <= parents <= population:
        raise UserError(f"evolution strategy: parents must be in [1, population] (got {parents}, {population})")
    rng = np.random.default_rng(seed)
    per = budget // (population * generations)
    _check_budget(budget, per, "evolution strategy")
    mean = scorer.default_gates(action_space).astype(np.float64)
    decay = 0.25 ** (1 / max(1, generations - 1))
    history = []
    for gen in range(generations):
        s = sigma * decay ** gen
        candidates = np.clip(mean + s * rng.standard_normal((population, mean.size)), 0, 1).astype(np.float32)
        means = _score_candidates(scorer, _sample(problems, per, rng), candidates, action_space)
        elite = np.argsort(-means)[:parents]
        mean = candidates[elite].mean(0).astype(np.float64)
        history.append(dict(generation=gen, sigma=s, best_reward=float(means.max()),
                            mean_reward=float(means.mean()), mean_gates=mean.tolist()))
    return dict(method="es", action_space=action_space, budget=per * population * generations,
                problems_per_candidate=per, history=history, best_gates=mean.astype(np.float32).tolist(),
                best_train_reward=history[-1]["best_reward"])


# -- evaluation --------------------------------------------------------------------------------------------------

def evaluate_arms(scorer, problems, arms: dict, reference: str = "default", comparisons=(),
                  margins: dict | None = None) -> tuple[dict, list[dict], list[dict]]:
    """arms: name -> (action_space, gates) where gates is None (learned gates), a fixed vector [k], or a callable
    observations [B, C] -> gate vectors [B, k] (a policy). Every arm is scored on every problem with exact match
    and dense reward. Every arm is compared with `reference`, and each (a, b) of `comparisons` b against a, on the
    same problems; with `margins` ({"exact": accuracy margin, "dense": nats}) each comparison also gets a TOST
    equivalence test (nanochat/stats.py), the only way a tie is declared. Returns (summary per arm, comparisons,
    per-example records)."""
    pairs = [(reference, name) for name in arms if name != reference] + [tuple(c) for c in comparisons]
    missing = sorted({n for pair in pairs for n in pair} - set(arms))
    if missing:
        raise UserError(f"arm(s) {', '.join(missing)} to compare are not among the arms ({', '.join(arms)})")
    obs = scorer.observations(problems)
    results, records = {}, []
    for name, (space, gates) in arms.items():
        if callable(gates):
            g = np.asarray(gates(obs), dtype=np.float32)
        elif gates is None:
            g = None
        else:
            g = np.tile(np.asarray(gates, dtype=np.float32)[None], (len(problems), 1))
        recs = scorer.score(problems, g, metrics=("exact", "dense"), action_space=space, relative=False)
        for b, r in enumerate(recs):
            records.append(dict(arm=name, id=r["id"], correct=r["correct"], dense=r["dense"],
                                completion=r["completion"], cut=r["cut"],
                                gates=None if g is None else g[b].tolist()))
        results[name] = dict(action_space=space, exact=accuracy([r["correct"] for r in recs]),
                             dense=mean_ci([r["dense"] for r in recs]),
                             fixed_gates=None if g is None or callable(gates) else g[0].tolist(),
                             _correct=[r["correct"] for r in recs], _dense=[r["dense"] for r in recs])
        if g is not None and callable(gates):
            results[name]["chosen_gates"] = dict(mean=g.mean(0).tolist(), std=g.std(0).tolist(),
                                                 min=g.min(0).tolist(), max=g.max(0).tolist())
    compared = [dict(a=a, b=b, exact=mcnemar_paired(results[a]["_correct"], results[b]["_correct"]),
                     dense=paired_mean(results[a]["_dense"], results[b]["_dense"])) for a, b in pairs]
    for c in compared if margins else ():
        for metric, key in (("exact", "_correct"), ("dense", "_dense")):
            c[metric]["tost"] = tost_paired(results[c["a"]][key], results[c["b"]][key], margins[metric])
    for res in results.values():
        del res["_correct"], res["_dense"]
    return results, compared, records
