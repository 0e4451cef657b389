"""The headroom of a context-dependent gate policy, measured before any learner: every problem of a pool scored at
every gate of a set, twice, and what the best fixed gate, a per-problem oracle and simple contextual baselines get.

    python -m analysis.gate_oracle --model-tag tiny_mhc_sft --problems synthetic --synthetic-mix mixed
    python -m analysis.gate_oracle --model-tag mhc_sft --problems gsm8k --replicates exact --gate-set per_layer

- Gate sets: `global` (0, 0.1, ..., 1 on every sub-layer) or `per_layer` (the learned per-layer gates, the L
  one-layer moves that push one layer's gate to the far end of [0, 1], and --random-vectors seeded uniform vectors).
  Every (problem, gate) pair is one row of a batched forward or generation with per-example gates.
- Replicates, two independent measurements of each (problem, gate) reward:
  `dense` (default): the mean log-probability of the gold answer's even tokens and of its odd tokens (one forward;
  the halves share the problem, not the noise of individual tokens);
  `exact`: two sampled 0-shot decodes at --temperature with different seeds, each 1 if its answer is right.
- Report (nanochat/headroom.py): the best fixed gate; the naive headroom mean_i max_g r - max_g mean_i r; the split
  headroom (pick on one replicate, score on the other) with a paired-bootstrap CI; the problem x gate interaction
  test; cross-fitted contextual baselines (ridge, k-NN, per-cluster and per-type grids) with V_pi - V_fix, its CI
  and the closed gap; the stratified grid per problem type.
Outputs <results>/<model-tag>/gate_oracle_<problems>_<replicates>_<gate set>.json, .png (per-problem best-gate histogram, reward against
gate overall and per type) and .npz (the tables, observations and types, for re-analysis).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from analysis.plots import pyplot, save_figure
from envs.gsm8k_env import dense_rewards, exact_rewards
from envs.mhc_env import GateScorer, build_problem_pool, gates_applied, load_frozen_model
from nanochat.common import UserError, autodetect_device_type, doc_summary, git_commit, machine_info
from nanochat.common import check_name, run_main
from nanochat.config import check_synthetic_mix, parse_int_list
from nanochat.headroom import cross_fitted, headroom, interaction_test, over_seeds, per_type_grid  # noqa: F401

GLOBAL_GATES = tuple(round(0.1 * i, 1) for i in range(11))


def gate_set(name: str, learned_per_layer: np.ndarray, random_vectors: int, seed: int):
    """(action space, gate vectors [G, k], labels) of a gate set."""
    if name == "global":
        return "global", np.asarray(GLOBAL_GATES, np.float32)[:, None], [f"{g:.1f}" for g in GLOBAL_GATES]
    if name != "per_layer":
        raise UserError(f"--gate-set must be global or per_layer (got {name!r})")
    base = np.asarray(learned_per_layer, np.float32)
    rows, labels = [base], ["learned"]
    for layer in range(base.size):  # one layer's gate to the far end of [0, 1], the rest learned
        moved = base.copy()
        moved[layer] = 0.0 if base[layer] >= 0.5 else 1.0
        rows.append(moved)
        labels.append(f"L{layer}->{moved[layer]:.0f}")
    rng = np.random.default_rng(seed)
    for r in range(random_vectors):
        rows.append(rng.uniform(0, 1, base.size).astype(np.float32))
        labels.append(f"rand{r}")
    return "per_layer", np.stack(rows), labels


def score_tables(scorer: GateScorer, problems, space: str, gates: np.ndarray, replicates: str,
                 temperature: float = 0.7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two replicate reward tables [P, G]: row (problem i, gate j) of a batch carries gate vector j."""
    P, G = len(problems), len(gates)
    pairs = [(i, j) for i in range(P) for j in range(G)]
    a, b = np.zeros((P, G)), np.zeros((P, G))
    bs = scorer.batch_size
    for start in range(0, len(pairs), bs):
        chunk = pairs[start:start + bs]
        probs = [problems[i] for i, _ in chunk]
        g = gates[[j for _, j in chunk]]
        with gates_applied(scorer.model, space, g):
            if replicates == "dense":
                reps = dense_rewards(scorer.scoring_model, scorer.tokenizer, probs, scorer.ctx, halves=True)
            else:
                ra, rb = (exact_rewards(scorer.model, scorer.tokenizer, probs, scorer.max_new_tokens, scorer.ctx,
                                        temperature=temperature, seed=seed + 1000003 * rep + start,
                                        compile=scorer.compile, compile_backend=scorer.compile_backend)
                          for rep in (0, 1))
                reps = [(float(x["correct"]), float(y["correct"])) for x, y in zip(ra, rb)]
        for (i, j), (x, y) in zip(chunk, reps):
            a[i, j], b[i, j] = x, y
    return a, b


def table_learners(names, gates: np.ndarray, budget: int) -> dict:
    """RL learners trained on a reward table (fit(rewards [n, G], obs_tr, obs_te, seed) -> gate indices): an action
    is scored at the table's nearest gate vector, with each problem's mean over gates subtracted (the env's
    per-problem control variate). They use RLConfig's defaults (the GPU preset's PPO; RLOO's own), never settings
    tuned to a table, and are scored in the same folds as the contextual baselines."""
    from envs.bandit import ObsWhitener, PlantedScorer, RLOOLearner
    from envs.mhc_env import GSM8KMHCVecEnv
    from envs.ppo_controller import build_ppo, policy_gates
    from nanochat.config import RLConfig
    cfg = RLConfig(model_tag="table")
    gates = np.asarray(gates, np.float32)

    def nearest(g):
        return np.argmin(((np.asarray(g, np.float32)[:, None, :] - gates[None]) ** 2).sum(-1), 1)

    def make(name):
        def fit(rewards, obs_tr, obs_te, seed):
            centred = rewards - rewards.mean(1, keepdims=True)
            scorer = PlantedScorer(obs_tr, lambda idx, g: centred[idx, nearest(g)], num_gates=gates.shape[1])
            whitener = ObsWhitener.fit(obs_tr)
            if name == "rloo":
                learner = RLOOLearner(scorer, scorer.problems, whitener, samples_per_problem=cfg.rloo_samples,
                                      problems_per_step=cfg.rloo_problems_per_step,
                                      learning_rate=cfg.rloo_learning_rate, seed=seed)
                learner.learn(budget)
                return nearest(learner.policy_gates(obs_te))
            num_envs = 16
            vec = GSM8KMHCVecEnv(scorer, scorer.problems, num_envs, seed=seed, action_map=cfg.action_map,
                                 whitener=whitener)
            n_steps = max(num_envs, min(cfg.n_steps, budget) // num_envs * num_envs)
            ppo = build_ppo(vec, learning_rate=cfg.learning_rate, n_steps=n_steps,
                            batch_size=min(cfg.batch_size, n_steps), n_epochs=cfg.n_epochs, gamma=cfg.gamma,
                            ent_coef=cfg.ent_coef, seed=seed)
            ppo.learn(budget)
            return nearest(policy_gates(ppo, obs_te, cfg.action_map, whitener))
        return fit

    unknown = [n for n in names if n not in ("rloo", "ppo")]
    if unknown:
        raise UserError(f"--learners: unknown learner(s) {', '.join(unknown)} (known: rloo, ppo)")
    return {n: make(n) for n in names}


def analyse(a, b, obs, types, labels, folds: int, seed: int, seeds=(), margin: float = 1e-3, learners=None) -> dict:
    """Everything the JSON reports, from the two tables (and the observations and types)."""
    h = headroom(a, b, seed=seed)
    base = cross_fitted(a, b, obs=obs, types=types, folds=folds, seed=seed, learners=learners)
    out = dict(gates=labels, headroom=dict(h, split_ci=list(h["split_ci"]), best_fixed_gate=labels[h["best_fixed"]]),
               interaction=interaction_test(a, b), baselines=base,
               per_type=per_type_grid(a, b, types, seed=seed) if types is not None else None)
    if seeds:   # the run above is the summary's run of `seed`: not computed twice
        out["over_seeds"] = over_seeds(a, b, obs=obs, types=types, folds=folds, seeds=seeds, margin=margin,
                                       learners=learners, done={seed: base})
    base.pop("per_problem")
    return out


def verdict(result: dict) -> str:
    """One sentence a reader can act on: is there context-dependent headroom on this model and pool? Two lower
    bounds can show it: the split oracle (per problem) and any cross-fitted contextual baseline (pooled over
    problems, so it can gain where per-problem picks drown in noise)."""
    h = result["headroom"]
    lo, hi = h["split_ci"]
    p = result["interaction"]["p_value"]
    gains = {n: r for n, r in result["baselines"]["policies"].items() if n != "fixed"}
    best = max(gains, key=lambda n: gains[n]["gain"], default=None)
    split = f"split headroom {h['split']:+.5f} [{lo:+.5f}, {hi:+.5f}] (naive {h['naive']:+.5f})"
    base = ""
    if best:
        g = gains[best]
        base = (f"best cross-fitted contextual baseline {best}: {g['gain']:+.5f} over the fixed gate, 95% CI "
                f"[{g['gain_ci'][0]:+.5f}, {g['gain_ci'][1]:+.5f}], Bonferroni-adjusted over {len(gains)} "
                f"[{g['gain_ci_adjusted'][0]:+.5f}, {g['gain_ci_adjusted'][1]:+.5f}]")
    inter = f"interaction p = {p:.3g}" if p is not None else "interaction not testable"
    if lo > 0 or (best and gains[best]["gain_ci_adjusted"][0] > 0):   # Bonferroni over the baselines
        head = "headroom: a context-dependent gate beats the best fixed gate"
    else:
        head = (f"no measurable headroom: the best fixed gate ({h['best_fixed_gate']}) takes what there is (no lower "
                f"bound excludes 0)")
    return "; ".join(x for x in (head, split, base, inter) if x)


def plot(result: dict, a: np.ndarray, b: np.ndarray, types, path: str, title: str):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    labels = result["gates"]
    x = np.arange(len(labels))
    mean = (a + b) / 2
    centred = mean - mean.mean(1, keepdims=True)   # problem levels removed: the curves show the gates' effect
    ax = axes[0]
    ax.errorbar(x, centred.mean(0), yerr=1.96 * centred.std(0, ddof=1) / np.sqrt(len(mean)), fmt="o-", color="k",
                lw=2, capsize=2, label=f"all problems (n={len(mean)})")
    if types is not None:
        for t in sorted(set(types.tolist())):
            m = centred[types == t]
            ax.plot(x, m.mean(0), "--", marker=".", label=f"{t} (n={len(m)})")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 11 else 0, fontsize=7)
    ax.set_xlabel("gate" + (" (global: every sub-layer)" if result["action_space"] == "global" else " vector"))
    ax.set_ylabel("reward minus each problem's mean over gates\n(mean, 95% CI; higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.bar(x, result["headroom"]["best_gate_counts"], color="tab:blue", alpha=0.8)
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 11 else 0, fontsize=7)
    ax.set_xlabel("each problem's best gate (mean of both replicates)")
    ax.yaxis.get_major_locator().set_params(integer=True)   # counts of problems
    ax.set_ylabel("problems")
    h = result["headroom"]
    ax.set_title(f"split headroom {h['split']:+.4f} [{h['split_ci'][0]:+.4f}, {h['split_ci'][1]:+.4f}], "
                 f"naive {h['naive']:+.4f}", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=120)


def print_summary(result: dict):
    h = result["headroom"]
    print(f"best fixed gate {h['best_fixed_gate']} ({h['best_fixed_value']:+.5f}); naive headroom {h['naive']:+.5f}; "
          f"split headroom {h['split']:+.5f} [{h['split_ci'][0]:+.5f}, {h['split_ci'][1]:+.5f}]; interaction p = "
          f"{result['interaction']['p_value']}")
    for name, r in result["baselines"]["policies"].items():
        if "gain" in r:
            gap = "n/a (no headroom)" if r["closed_gap"] is None else f"{r['closed_gap']:+.2f}"
            print(f"  {name:<8} V_pi - V_fix {r['gain']:+.5f} [{r['gain_ci'][0]:+.5f}, {r['gain_ci'][1]:+.5f}], "
                  f"closed gap {gap}")
    seeds = result.get("over_seeds")
    if seeds:
        print(f"over seeds {seeds['seeds']} ({seeds['folds']} folds; tie margin +-{seeds['margin']:g}):")
        for name, r in seeds["policies"].items():
            g, gap, tost = r["gain"], r["closed_gap"], r["tost_vs_fixed"]
            gap_text = "n/a" if gap is None else f"{gap['mean']:+.2f} [{gap['mean_ci'][0]:+.2f}, {gap['mean_ci'][1]:+.2f}]"
            print(f"  {name:<8} gain mean {g['mean']:+.5f} [{g['mean_ci'][0]:+.5f}, {g['mean_ci'][1]:+.5f}] IQM "
                  f"{g['iqm']:+.5f}; closed gap {gap_text}; vs fixed p = {r['vs_fixed']['p_value']}, TOST "
                  f"{'equivalent' if tost['equivalent'] else 'not equivalent'} (p = {tost['p_value']})")
    print(result["verdict"], flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of an mHC checkpoint (the fine-tuned model)")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
    p.add_argument("--problems", default="synthetic", choices=["synthetic", "gsm8k"], help="problem source")
    p.add_argument("--num-problems", type=int, default=256, help="problems in the pool")
    p.add_argument("--split", default="train", choices=["train", "test"], help="GSM8K split")
    p.add_argument("--part", default="rl_train", help="GSM8K train part (sft | rl_train | rl_val, "
                   "nanochat/splits.py; 'none' for the whole split): default the pool RL trains on")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the GSM8K train parts")
    p.add_argument("--synthetic-seed", type=int, default=1, help="synthetic: generator seed (RL's training pool)")
    p.add_argument("--synthetic-mix", default="mixed", help="synthetic: named mixture of difficulty tiers ('' for "
                   "the knobs below)")
    p.add_argument("--synthetic-steps", default="1,2", help="synthetic: operations per problem, choices")
    p.add_argument("--synthetic-max-value", type=int, default=20, help="synthetic: largest operand")
    p.add_argument("--synthetic-ops", default="+-", help="synthetic: operations, any of + - * /")
    p.add_argument("--task-data", default="auto", choices=["auto", "hub", "local"], help="GSM8K data source")
    p.add_argument("--gate-set", default="global", choices=["global", "per_layer"], help="gates scored")
    p.add_argument("--random-vectors", type=int, default=8, help="per_layer: seeded random gate vectors added")
    p.add_argument("--replicates", default="dense", choices=["dense", "exact"], help="how the two replicates are "
                   "measured (dense: even/odd answer tokens; exact: two sampled decodes)")
    p.add_argument("--temperature", type=float, default=0.7, help="exact: sampling temperature of the decodes")
    p.add_argument("--max-new-tokens", type=int, default=256, help="exact: generation limit")
    p.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the contextual baselines")
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds of the multi-seed summary of every baseline and "
                   "learner (fold assignments, learner seeds): mean, IQM, bootstrap CIs, TOST; 'none' skips it")
    p.add_argument("--learners", default="rloo", help="RL learners also trained on the table and scored in the same "
                   "folds: rloo, ppo (slower), or none")
    p.add_argument("--learner-budget", type=int, default=2048, help="rows each table learner scores (the tiny RL "
                   "preset's budget)")
    p.add_argument("--tie-margin", type=float, default=-1.0, help="TOST equivalence margin against the fixed gate "
                   "(-1: 1e-3 nats for dense replicates, 0.01 for exact)")
    p.add_argument("--from-tables", default="", help="re-analyse a saved .npz of an earlier run (no model needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, bootstrap and random gate vectors")
    p.add_argument("--batch-size", type=int, default=64, help="(problem, gate) rows per forward / generation")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    p.add_argument("--results-dir", default="results", help="output: <results-dir>/<model-tag>/gate_oracle_<problems>_"
                   "<replicates>_<gate set>.json")
    p.add_argument("--out", default="", help="output JSON path (the PNG and NPZ go beside it)")
    args = p.parse_args(argv)
    check_name("--model-tag", args.model_tag)  # it names the results folder
    for flag in ("num_problems", "batch_size", "max_new_tokens", "learner_budget"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    if args.random_vectors < 0:
        raise UserError(f"--random-vectors must be >= 0 (got {args.random_vectors})")
    if args.replicates == "exact" and args.temperature <= 0:
        raise UserError(f"--temperature must be > 0 for exact replicates: two greedy decodes are the same decode "
                        f"(got {args.temperature})")
    check_synthetic_mix(args.synthetic_mix)
    seeds = [] if args.seeds.strip() in ("", "none") else parse_int_list(args.seeds, "seeds")
    learner_names = [] if args.learners.strip() in ("", "none") else [n.strip() for n in args.learners.split(",")]
    t0 = time.perf_counter()
    if args.from_tables:
        saved, result = load_tables(args.from_tables)
        a, b, obs, types, gates = (saved[k] for k in ("a", "b", "obs", "types", "gates"))
        labels, out = result["gates"], args.out or args.from_tables[:-len(".npz")] + "_reanalysed.json"
        replicates = result["replicates"]
        source = result["problems"]["source"]
        pool_name = "gsm8k" if "gsm8k" in source.lower() else source.split(":")[0]
        tag = os.path.basename(os.path.dirname(os.path.abspath(args.from_tables)))
        result = {k: result[k] for k in ("checkpoint", "step", "problems", "action_space", "gate_vectors",
                                         "learned_gates", "replicates", "temperature")}
    else:
        a, b, obs, types, gates, labels, result, tag = measure(args)
        replicates, pool_name = args.replicates, args.problems
        out = args.out or os.path.join(args.results_dir, tag,
                                       f"gate_oracle_{args.problems}_{args.replicates}_{args.gate_set}.json")
    if len(a) < 5 * args.folds:
        raise UserError(f"{len(a)} problems: too few for {args.folds} folds (need at least {5 * args.folds}; raise "
                        f"--num-problems or lower --folds)")
    margin = args.tie_margin if args.tie_margin > 0 else (1e-3 if replicates == "dense" else 0.01)
    learners = table_learners(learner_names, gates, args.learner_budget)
    result.update(**analyse(a, b, obs, types, labels, args.folds, args.seed, seeds, margin, learners),
                  learners=dict(names=learner_names, budget=args.learner_budget, reward="the table's, nearest gate"),
                  git_commit=git_commit(), machine=machine_info())
    result["verdict"] = verdict(result)
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    stem = os.path.splitext(out)[0]
    if not args.from_tables:
        np.savez(stem + ".npz.tmp.npz", a=a, b=b, obs=obs, types=types, gates=gates,
                 ids=np.asarray(result.pop("ids")))
        os.replace(stem + ".npz.tmp.npz", stem + ".npz")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)
    plot(result, a, b, types, stem + ".png",
         f"gate oracle: {tag} on {len(a)} {pool_name} problems ({replicates} replicates)")
    print_summary(result)
    print(f"wrote {out}, {stem}.png" + ("" if args.from_tables else f" and {stem}.npz")
          + f" ({result['seconds']:.0f} s)")
    return result


def load_tables(path: str):
    """(the arrays of a saved .npz, its JSON record) for --from-tables."""
    js = path[:-len(".npz")] + ".json" if path.endswith(".npz") else ""
    if not js or not os.path.isfile(path) or not os.path.isfile(js):
        raise UserError(f"--from-tables {path}: need an .npz written by analysis.gate_oracle and its .json beside it")
    saved = np.load(path, allow_pickle=False)
    missing = [k for k in ("a", "b", "obs", "types", "gates") if k not in saved]
    if missing:
        raise UserError(f"--from-tables {path}: missing array(s) {', '.join(missing)}")
    with open(js) as f:
        return {k: saved[k] for k in saved.files}, json.load(f)


def measure(args):
    """Score the tables on the model: (a, b, observations, types, gate vectors, labels, the record, model tag)."""
    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    device = torch.device(autodetect_device_type() if args.device_type == "auto" else args.device_type)
    model, tokenizer, path, meta = load_frozen_model(args.checkpoint, args.model_tag, args.step, device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    scorer = GateScorer(model, tokenizer, action_space="global", reward="dense",
                        max_new_tokens=args.max_new_tokens if args.replicates == "exact" else 1,
                        batch_size=args.batch_size, dtype=dtype)
    if args.problems == "synthetic":
        kw = dict(count=args.num_problems, seed=args.synthetic_seed, synthetic_mix=args.synthetic_mix,
                  synthetic_steps=parse_int_list(args.synthetic_steps, "synthetic-steps"),
                  synthetic_max_value=args.synthetic_max_value, synthetic_ops=args.synthetic_ops)
    else:
        part = "" if args.part in ("", "none") or args.split != "train" else args.part
        kw = dict(split=args.split, count=args.num_problems, seed=0, task_data=args.task_data, part=part,
                  split_seed=args.split_seed)
    problems, pool = build_problem_pool(scorer, args.problems, **kw)
    if len(problems) < 5 * args.folds:
        raise UserError(f"{len(problems)} problems fit the model: too few for {args.folds} folds (need at least "
                        f"{5 * args.folds}; raise --num-problems or lower --folds)")
    space, gates, labels = gate_set(args.gate_set, scorer.default_gates("per_layer"), args.random_vectors, args.seed)
    print(f"scoring {len(problems)} problems x {len(gates)} gates ({args.gate_set}), {args.replicates} replicates, "
          f"on {path}", flush=True)
    a, b = score_tables(scorer, problems, space, gates, args.replicates, args.temperature, args.seed)
    obs = scorer.observations(problems)
    types = np.asarray([p.extra.get("type", "") for p in problems])
    record = dict(checkpoint=path, step=meta["step"], problems=pool, action_space=space, gate_vectors=gates.tolist(),
                  learned_gates=scorer.default_gates(space).tolist(), replicates=args.replicates,
                  temperature=args.temperature if args.replicates == "exact" else None,
                  ids=[p.id for p in problems])
    return a, b, obs, types, gates, labels, record, args.model_tag or os.path.basename(os.path.dirname(path))


if __name__ == "__main__":
    run_main(main)
