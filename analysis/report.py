"""results/report.md: every table and figure of the paper from what the pipeline wrote, in one file (speedrun's
last stage).

    python -m analysis.report                          # GPU tags (baseline, mhc, baseline_sft, mhc_sft, rl/...)
    python -m analysis.report --prefix tiny_           # the tiny preset
    python -m analysis.report --results-dir R --prefix tiny_ --out R/report.md

Sections: the wall time of each speedrun stage (<results>/speedrun_stages.jsonl); the Phase-4 comparison table
(analysis.compare_results, also written as comparison.md/.csv/.json); figures -- training loss and val bpb,
baseline vs mHC; H_res over training (base_train --mhc-log-every); the H_res heatmaps, composite and Amax gain,
H_pre/H_post and routing of the mHC model (analysis.visualize_hres, speedrun stage hres_mhc); the gate sweep
(analysis.gate_sweep); per RL run, the arms with their tests, the distribution of the gates the policy chose and
gate vs accuracy; the lm-evaluation-harness numbers (scripts.lm_eval); then the commit, configs and seeds of every
run. Anything missing is listed with the stage that
makes it; the rest of the report is still written. Figures made here go to <results>/report_figures/.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os

from analysis.compare_results import add_column_args, build_table, columns_for, to_markdown, write_outputs
from analysis.plots import (per_layer_gates, plot_gate_vs_accuracy, plot_hres_over_training,
                            plot_rl_gate_distribution, plot_training_curves, read_jsonl)
from nanochat.common import UserError, doc_summary, git_commit, run_main

HRES_FIGURES = (("hres_heatmaps.png", "H_res per sub-layer: mean over validation tokens, and per-token std"),
                ("hres_composite.png", "the composite H_res across depth and its Amax gain"),
                ("hres_pre_post.png", "mean H_pre and H_post per stream"),
                ("hres_routing.png", "per-token routing of one example"))


def stage_times(results_dir: str) -> list[dict]:
    """The last record of each stage in speedrun_stages.jsonl, in the order the stages first ran."""
    path = os.path.join(results_dir, "speedrun_stages.jsonl")
    if not os.path.isfile(path):
        return []
    last: dict[str, dict] = {}
    for rec in read_jsonl(path):
        last[rec["stage"]] = rec
    return list(last.values())


class Report:
    def __init__(self, out: str):
        self.out, self.lines, self.missing = out, [], []
        self.base = os.path.dirname(os.path.abspath(out))

    def add(self, *lines: str):
        self.lines += list(lines)

    def figure(self, path: str, caption: str, stage: str):
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            self.add(f"![{caption}]({os.path.relpath(path, self.base)})", f"*{caption}*", "")
        else:
            self.note_missing(f"figure {path} ({caption}): not found (speedrun stage {stage})")

    def note_missing(self, text: str):
        self.missing.append(text)
        self.add(f"> missing: {text}", "")

    def try_figure(self, make, path: str, caption: str, stage: str):
        """Make a figure from records; an absent or unreadable input becomes a listed missing item."""
        try:
            make(path)
        except UserError as e:
            self.note_missing(f"{caption}: {e} (speedrun stage {stage})")
            return
        self.figure(path, caption, stage)


def rl_table(ev: dict) -> list[str]:
    """An RL run's eval.json as markdown: its setting, one row per arm (accuracy and dense reward with CIs and the
    paired tests against the learned gates), then the verdicts."""
    vs = {c["b"]: c for c in ev["comparisons"] if c["a"] == "default"}
    sel = ev.get("model_selection") or {}
    chosen = (f" The evaluated policy was chosen on {sel['validation_problems']} validation problems (at "
              f"{sel['selected_timesteps']} of {sel['last_timesteps']} timesteps)." if sel.get("validation_problems")
              else "")
    lines = [f"Learner `{ev.get('algo', 'ppo')}`; action space `{ev['action_space']}`, reward `{ev['reward']}`, "
             f"{ev['policy_timesteps']} timesteps "
             f"(the baselines: the same budget), {ev['eval_pool']['count']} held-out problems from "
             f"`{ev['eval_pool']['source']}`, learned gates {[round(g, 3) for g in ev['default_gates']]}"
             + (" -- smoke scale." if ev.get("scale") == "smoke" else ".") + chosen
             + (f" Best black box (chosen on validation): `{ev['best_black_box']}`." if ev.get("best_black_box")
                else ""), "",
             "| arm | accuracy [95% CI] | Δ vs learned (McNemar p) | dense reward [95% CI] | Δ vs learned (t p) | "
             "gates |",
             "|---|---|---|---|---|---|"]
    for arm, r in ev["arms"].items():
        e, d, c = r["exact"], r["dense"], vs.get(arm)
        gates = per_layer_gates(r)
        lines.append(f"| {arm} | {e['acc']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] n={e['n']} | "
                     + (f"{c['exact']['diff']:+.3f} ({c['exact']['p_value']:.2g})" if c else "—") + " | "
                     + f"{d['mean']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}] | "
                     + (f"{c['dense']['diff']:+.4f} ({c['dense']['p_value']:.2g})" if c and c["dense"]["p_value"]
                        is not None else "—") + " | "
                     + ("learned" if gates is None else ", ".join(f"{g:.2f}" for g in gates)) + " |")
    return lines + [""] + [f"- {k}: {v}" for k, v in ev["verdicts"].items() if v] + [""]


def oracle_table(result: dict) -> list[str]:
    """A gate_oracle JSON as markdown: the headroom estimates, the interaction test, and every cross-fitted policy
    against the best fixed gate and the per-problem oracle (the table every RL result is read against)."""
    h, base, inter = result["headroom"], result["baselines"], result["interaction"]
    pool = result["problems"]
    p = "n/a" if inter["p_value"] is None else f"{inter['p_value']:.3g}"
    lines = [f"{pool['count']} problems ({pool['source']}), {len(result['gates'])} gates ({result['action_space']}), "
             f"{result['replicates']} replicates. Best fixed gate **{h['best_fixed_gate']}**; naive headroom "
             f"{h['naive']:+.5f}; split headroom **{h['split']:+.5f} [{h['split_ci'][0]:+.5f}, "
             f"{h['split_ci'][1]:+.5f}]**; problem x gate interaction F = "
             f"{inter['F'] if inter['F'] is None else round(inter['F'], 3)}, p = {p}.", "",
             "| policy (cross-fitted, {} folds) | value | V_pi - V_fix [95% CI] | closed gap |".format(base["folds"]),
             "|---|---|---|---|"]
    learners = set((result.get("learners") or {}).get("names", []))
    budget = (result.get("learners") or {}).get("budget")

    def label(name):
        return f"{name} (RL on the table, {budget} rows)" if name in learners else name

    for name, r in base["policies"].items():
        if "gain" not in r:
            lines.append(f"| {name} (the reference) | {r['value']:+.5f} | — | — |")
            continue
        gap = "n/a (split oracle <= fixed)" if r["closed_gap"] is None else f"{r['closed_gap']:+.2f}"
        lines.append(f"| {label(name)} | {r['value']:+.5f} | {r['gain']:+.5f} [{r['gain_ci'][0]:+.5f}, "
                     f"{r['gain_ci'][1]:+.5f}] | {gap} |")
    if "oracle_gain" in base:
        lines.append(f"| per-problem oracle (split) | {base['oracle_value']:+.5f} | {base['oracle_gain']:+.5f} "
                     f"[{base['oracle_gain_ci'][0]:+.5f}, {base['oracle_gain_ci'][1]:+.5f}] | "
                     f"{'1 (the ceiling)' if base['oracle_gain'] > 0 else '— (no ceiling above the fixed gate)'} |")
    if result.get("per_type"):
        lines += ["", "| type | n | best gate | its gain over the overall best gate [95% CI] (in-sample) |",
                  "|---|---|---|---|"]
        for t, r in result["per_type"]["types"].items():
            lines.append(f"| {t} | {r['n']} | {result['gates'][r['best_gate']]} | {r['gain_over_overall']:+.5f} "
                         f"[{r['gain_over_overall_ci'][0]:+.5f}, {r['gain_over_overall_ci'][1]:+.5f}] |")
    seeds = result.get("over_seeds")
    if seeds:
        lines += ["", f"Over seeds {seeds['seeds']} (fold assignments and learner seeds; a tie with the fixed gate "
                      f"needs TOST equivalence within +-{seeds['margin']:g}):", "",
                  "| policy | gain over fixed: mean [95% CI] | IQM | closed gap: mean [95% CI] | vs fixed | |",
                  "|---|---|---|---|---|---|"]
        for name, r in seeds["policies"].items():
            g, gap, tost, vs = r["gain"], r["closed_gap"], r["tost_vs_fixed"], r["vs_fixed"]
            gap_text = "n/a" if gap is None else (f"{gap['mean']:+.2f} [{gap['mean_ci'][0]:+.2f}, "
                                                  f"{gap['mean_ci'][1]:+.2f}]")
            word = ("beats" if vs["diff"] > 0 else "below") if vs["p_value"] is not None and vs["p_value"] < 0.05 \
                else "ties (TOST)" if tost["equivalent"] else "inconclusive"
            lines.append(f"| {label(name)} | {g['mean']:+.5f} [{g['mean_ci'][0]:+.5f}, {g['mean_ci'][1]:+.5f}] | "
                         f"{g['iqm']:+.5f} | {gap_text} | p = {vs['p_value']:.3g}, TOST p = {tost['p_value']:.3g} | "
                         f"{word} |")
    return lines + ["", f"Verdict: {result['verdict']}", ""]


def oracle_section(rep: Report, sft_dir: str):
    paths = sorted(glob.glob(os.path.join(sft_dir, "gate_oracle_*.json")))
    if not paths:
        rep.note_missing(f"no gate_oracle_*.json in {sft_dir} (speedrun stages oracle_*)")
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        name = os.path.splitext(os.path.basename(path))[0]
        rep.add(f"### Headroom: `{name}`", "")
        rep.add(*oracle_table(result))
        rep.figure(os.path.splitext(path)[0] + ".png", f"{name}: reward against the gate (overall and per type) and "
                   f"each problem's best gate", "oracle")


def seeds_table(out: dict) -> list[str]:
    """train_rl --seeds' seeds.json as markdown: every arm's gain over the learned gates over seeds, then the RL
    policy against each seed's best black box."""
    lines = [f"Learner `{out['algo']}`, seeds {out['seeds']} (runs {', '.join(f'`{t}`' for t in out['tags'])}).", "",
             "| arm | dense gain over learned: mean [95% CI] | IQM | accuracy gain: mean [95% CI] |",
             "|---|---|---|---|"]
    for arm, r in out["arms"].items():
        d, e = r["dense"], r["exact"]
        lines.append(f"| {arm} | {d['mean']:+.5f} [{d['mean_ci'][0]:+.5f}, {d['mean_ci'][1]:+.5f}] | "
                     f"{d['iqm']:+.5f} | {e['mean']:+.3f} [{e['mean_ci'][0]:+.3f}, {e['mean_ci'][1]:+.3f}] |")
    return lines + [""] + [f"- {line}" for line in out["lines"] if "best black box" in line] + [""]


def rl_section(rep: Report, run_dir: str, fig_dir: str):
    name = os.path.basename(run_dir)
    path = os.path.join(run_dir, "eval.json")
    seeds_path = os.path.join(run_dir, "seeds.json")
    if not os.path.isfile(path) and os.path.isfile(seeds_path):
        rep.add(f"### RL runs `{name}` over seeds", "")
        with open(seeds_path) as f:
            rep.add(*seeds_table(json.load(f)))
        return
    rep.add(f"### RL run `{name}`", "")
    if not os.path.isfile(path):
        rep.note_missing(f"{path} not found (the RL stage did not finish)")
        return
    with open(path) as f:
        ev = json.load(f)
    rep.add(*rl_table(ev))
    examples = os.path.join(run_dir, "eval_examples.jsonl")
    rep.try_figure(lambda p: plot_rl_gate_distribution(
        [r["gates"] for r in read_jsonl(examples) if r["arm"] == "rl_policy"], p,
        title=f"{name}: gates the RL policy chose", default_gates=ev.get("default_gates")),
        os.path.join(fig_dir, f"rl_{name}_gates.png"), f"{name}: the distribution of the gates the RL policy chose "
        f"(dashed: the learned gates)", "rl")
    # every arm, the learned gates (the reference) included, with accuracy and the dense reward
    rep.try_figure(lambda p: plot_gate_vs_accuracy(ev["arms"], p, title=f"{name}: gate vs accuracy and dense reward",
                                                   default_gates=ev.get("default_gates")),
                   os.path.join(fig_dir, f"rl_{name}_gate_vs_accuracy.png"),
                   f"{name}: per-layer gate vs accuracy and dense reward, every arm", "rl")


def harness_section(rep: Report, results_dir: str, tags: list[str]):
    """lm-evaluation-harness results through the adapter (scripts.lm_eval, speedrun stage lm_eval_mhc): the
    harness's own metric names and numbers, per task, with n and the task version."""
    found = False
    for tag in tags:
        path = os.path.join(results_dir, tag, "lm_eval.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            run = json.load(f)
        if not found:
            rep.add("| run | task | version | n | shots | metric | value |", "|---|---|---|---|---|---|---|")
            found = True
        for task, res in sorted(run["results"].items()):
            for key, value in sorted(res.items()):
                if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                    rep.add(f"| {tag} | {task} | {res.get('version', '')} | {res.get('n', '')} | "
                            f"{run.get('num_fewshot')} | {key} | {value:.4f} |")
    if found:
        rep.add("", "Computed by lm-evaluation-harness itself (`python -m scripts.lm_eval`); "
                    "`tests/test_lm_eval.py` checks that our evaluator gives the same per-example results.", "")
    else:
        rep.note_missing(f"no lm_eval.json under {results_dir}/<tag>/ (speedrun stage lm_eval_mhc)")


def memory_section(rep: Report, results_dir: str):
    """The training step's estimated peak memory per model and --activation-checkpointing mode (speedrun's memory_*
    stages, benchmarks.memory_estimate)."""
    rows = []
    for model in ("baseline", "mhc"):
        path = os.path.join(results_dir, "bench", f"memory_estimate_{model}.json")
        if not os.path.isfile(path):
            rep.note_missing(f"{path} not found (speedrun stage memory_{model})")
            continue
        with open(path) as f:
            record = json.load(f)
        res = record["results"]
        for mode, est in res["by_mode"].items():
            rows.append(f"| {model} | {mode} | {res['device_batch_size']} x {res['seq_len']} | "
                        f"{record['config']['dtype']} | {est['peak'] / 2**30:.2f} | {est['activations'] / 2**30:.2f} "
                        f"| {'yes' if est['fits'] else 'no'} |")
    if rows:
        rep.add("## Memory (estimated before training)", "",
                "| model | activation checkpointing | tokens per device | dtype | peak GiB | activations GiB | "
                "fits an 80 GB GPU |", "|---|---|---|---|---|---|---|", *rows, "",
                "Eager step on fake tensors (`python -m benchmarks.memory_estimate`, docs/performance.md); a "
                "compiled step keeps at most as much.", "")


def configs_section(rep: Report, results_dir: str, tags: list[str]):
    rep.add("## Runs: commit, configs, seeds", "", "| run | git commit | seed | settings |", "|---|---|---|---|")
    for tag in tags:
        path = os.path.join(results_dir, tag, "config.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            cfg = json.load(f)
        model = cfg.get("model", {})
        settings = ", ".join(f"{k}={model[k]}" for k in ("n_layer", "n_embd", "sequence_len", "mhc_enabled",
                                                         "mhc_num_streams", "mhc_gate_sample_frac") if k in model)
        if "num_iterations" in cfg:
            settings += f", {cfg['num_iterations']} steps"
        rep.add(f"| `{tag}` | `{cfg.get('git_commit', '?')}` | {cfg.get('seed', '?')} | {settings} |")
    for path in sorted(glob.glob(os.path.join(results_dir, "rl", "*", "config.json"))):
        with open(path) as f:
            cfg = json.load(f)
        rl = cfg.get("rl_config", {})
        rep.add(f"| `rl/{os.path.basename(os.path.dirname(path))}` | `{cfg.get('git_commit', '?')}` | "
                f"{cfg.get('seed', '?')} | {rl.get('action_space')}, {rl.get('reward')} reward "
                f"({rl.get('reward_baseline')} baseline), {rl.get('total_timesteps')} timesteps, "
                f"{rl.get('num_envs')} envs |")
    rep.add("")


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    add_column_args(p)
    p.add_argument("--out", default="", help="report path (default <results-dir>/report.md)")
    args = p.parse_args(argv)
    R = args.results_dir
    if not os.path.isdir(R):
        raise UserError(f"--results-dir {R} does not exist")
    out = args.out or os.path.join(R, "report.md")
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "report_figures")
    columns = columns_for(args.prefix, args.baseline_tag, args.mhc_tag, args.sft_tag, args.rl_tag,
                          args.baseline_sft_tag)
    tags = {c["name"]: c["tag"] for c in columns}
    rep = Report(out)
    rep.add("# nanochat-mHC report", "",
            f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} by `python -m analysis.report` "
            f"at commit `{git_commit()}` from `{os.path.abspath(R)}`.", "")

    rep.add("## Speedrun stages", "")
    times = stage_times(R)
    if times:
        rep.add("| stage | wall time | finished |", "|---|---|---|")
        rep.add(*[f"| {t['stage']} | {t['seconds']} s | {t.get('finished', '')} |" for t in times])
        rep.add(f"| **total** | **{sum(t['seconds'] for t in times)} s** | |", "")
    else:
        rep.note_missing(f"{os.path.join(R, 'speedrun_stages.jsonl')} not found (written by speedrun.sh)")

    rep.add("## Phase-4 comparison", "")
    table = build_table(R, columns, args.bench or os.path.join(R, "bench", "inference.json"))
    write_outputs(table, R)
    rep.add(to_markdown(table))
    rep.missing += [f"table cell {m['column']} / {m['row']}: {m['reason']}" for m in table["missing"]]

    rep.add("## Figures", "", "### Training")
    runs = {}
    for name in ("Baseline", "Dynamic mHC"):
        path = os.path.join(R, tags[name], "metrics.jsonl")
        try:
            runs[name] = read_jsonl(path)
        except UserError as e:
            rep.note_missing(f"training curves of {name}: {e}")
    if runs:
        rep.try_figure(lambda q: plot_training_curves(runs, q), os.path.join(fig_dir, "training_curves.png"),
                       "training loss and val bpb, baseline vs mHC", "train")
    if "Dynamic mHC" in runs:
        rep.try_figure(lambda q: plot_hres_over_training(runs["Dynamic mHC"], q),
                       os.path.join(fig_dir, "hres_over_training.png"),
                       "H_res distance from I and gate over training, per sub-layer", "train_mhc")
    rep.add("### What the mHC model routes", "")
    for fname, caption in HRES_FIGURES:
        rep.figure(os.path.join(R, tags["Dynamic mHC"], "hres", fname), f"{tags['Dynamic mHC']}: {caption}",
                   "hres_mhc")
    rep.add("### Gate sweep", "")
    rep.figure(os.path.join(R, tags["mHC + SFT"], "gate_sweep.png"),
               f"{tags['mHC + SFT']}: val bpb and dense reward against the gates", "gate_sweep")
    rep.add("## Is there anything for a context-dependent gate to win? (analysis.gate_oracle)", "")
    oracle_section(rep, os.path.join(R, tags["mHC + SFT"]))
    rep.add("## RL gate controller", "")
    rl_runs = sorted(d for d in glob.glob(os.path.join(R, "rl", "*")) if os.path.isdir(d))
    if not rl_runs:
        rep.note_missing(f"no RL run under {os.path.join(R, 'rl')} (speedrun stages rl_*)")
    for run_dir in rl_runs:
        rl_section(rep, run_dir, fig_dir)

    rep.add("## lm-evaluation-harness", "")
    harness_section(rep, R, list(tags.values()))
    memory_section(rep, R)
    configs_section(rep, R, list(tags.values()))
    rep.add("## Missing", "")
    rep.add(*([f"- {m}" for m in rep.missing] or ["Nothing: every cell and every figure is present."]), "")
    with open(out + ".tmp", "w") as f:
        f.write("\n".join(rep.lines))
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({len(rep.missing)} missing item(s))")
    return dict(out=out, missing=rep.missing, table=table)


if __name__ == "__main__":
    run_main(main)
