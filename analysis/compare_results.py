"""The Phase-4 comparison table (phase 4 of the plan, docs/design.md) from what the pipeline wrote into results/.

    python -m analysis.compare_results                        # GPU tags: baseline, mhc, baseline_sft, mhc_sft, rl/..
    python -m analysis.compare_results --prefix tiny_         # the tiny preset's tags
    python -m analysis.compare_results --results-dir R --baseline-tag A --mhc-tag B --out-dir R/compare

Columns: Baseline, Dynamic mHC, Baseline + SFT and mHC + SFT (both fine-tuned with the same recipe on the same
tokens, so the GSM8K / HellaSwag / ARC columns compare like with like), and RL-tuned: the fine-tuned mHC model under
the RL *policy*, one gate vector per problem, on the held-out GSM8K test problems of the RL run
(<results>/rl/<run>/eval.json, arm rl_policy; a per-problem policy acts on GSM8K-format questions, so the other rows
have no RL-tuned cell). Rows: val bpb, GSM8K 0-shot and 8-shot, HellaSwag, ARC-Easy, ARC-Challenge (from each
column's eval.json and eval_examples.jsonl), inference latency and peak memory (from benchmarks/inference.py's JSON;
the fine-tuned models share their pretrained networks).

Every accuracy carries n and a 95% Wilson interval. Every column is compared with its reference on the same
examples: Dynamic mHC with the Baseline, mHC + SFT with Baseline + SFT, RL-tuned with the learned gates of mHC + SFT
on the same RL held-out problems (RL only moves the gates of that model). Accuracies: McNemar's exact test and the
paired difference with its CI (nanochat/stats.py, statsmodels); bpb: a paired bootstrap over the validation rows
(scipy.stats.bootstrap): the difference with its 95% CI and a two-sided bootstrap p-value. A missing file leaves
its cells empty with the reason (and the speedrun stage that writes it); the rest of the table is still built.
Under the table, the rows that bound the RL-tuned column (gate_policy_rows): the best fixed gate, the best
cross-fitted contextual baseline and the per-problem oracle from analysis/gate_oracle.py, and the RL policy against
the grid's fixed gate.
Writes comparison.md, comparison.csv and comparison.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os

import numpy as np
from scipy import stats as sps

from nanochat.common import SMOKE_PARAMS, UserError, doc_summary, run_main
from nanochat.stats import accuracy, mcnemar_paired

TASK_ROWS = [("GSM8K 0-shot", "gsm8k"), ("GSM8K 8-shot", "gsm8k_8shot"), ("HellaSwag", "hellaswag"),
             ("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")]
ROWS = ["val bpb"] + [r for r, _ in TASK_ROWS] + ["inference latency", "peak memory"]
BOOTSTRAP_RESAMPLES = 2000
LN2 = math.log(2)


def columns_for(prefix: str = "", baseline: str = "", mhc: str = "", sft: str = "", rl: str = "",
                baseline_sft: str = "") -> list[dict]:
    """The five columns: name, results tag, reference column, speedrun stage that writes its eval, network. The
    RL-tuned column's tag is an RL run under <results>/rl/ (default: <prefix>mhc_sft-gsm8k-global-dense for the
    tiny preset, mhc_sft-gsm8k-per_layer-exact otherwise: speedrun.sh's GSM8K runs)."""
    rl_run = rl or (f"{prefix}mhc_sft-gsm8k-global-dense" if prefix else "mhc_sft-gsm8k-per_layer-exact")
    return [dict(name="Baseline", tag=baseline or f"{prefix}baseline", ref=None, stage="eval_baseline",
                 network="baseline"),
            dict(name="Dynamic mHC", tag=mhc or f"{prefix}mhc", ref="Baseline", stage="eval_mhc", network="mhc"),
            dict(name="Baseline + SFT", tag=baseline_sft or f"{prefix}baseline_sft", ref=None,
                 stage="eval_baseline_sft", network="baseline"),
            dict(name="mHC + SFT", tag=sft or f"{prefix}mhc_sft", ref="Baseline + SFT", stage="eval_sft",
                 network="mhc"),
            dict(name="RL-tuned", tag=f"rl/{rl_run}", ref=None, stage="rl_gsm8k", network="mhc", kind="rl")]


def rl_cells(results_dir: str, col: dict) -> dict:
    """The RL-tuned column from an RL run's eval.json: GSM8K 0-shot of the per-problem policy (arm rl_policy)
    against the learned gates (arm default) on the same held-out problems; no cell for the other rows."""
    path = os.path.join(results_dir, col["tag"], "eval.json")
    if not os.path.isfile(path):
        return {row: dict(missing=f"{path} not found (speedrun stage {col['stage']}, an RL run on GSM8K)")
                for row in ROWS[:-2]}
    with open(path) as f:
        ev = json.load(f)
    no_cell = "a per-problem gate policy acts on GSM8K-format questions: no cell for this row"
    cells = {row: dict(na=no_cell) for row in ROWS[:-2]}   # not applicable, by design (not missing)
    if "gsm8k" not in str(ev.get("eval_pool", {}).get("source", "")).lower():
        cells["GSM8K 0-shot"] = dict(missing=f"{path} evaluated on {ev.get('eval_pool', {}).get('source')}, not GSM8K")
        return cells
    arm = ev["arms"]["rl_policy"]["exact"]
    cell = dict(value=arm["acc"], n=arm["n"], ci95=arm["ci95"], metric="exact_match (0-shot, strict)",
                unit="accuracy", note=f"RL held-out problems ({ev['eval_pool']['source']}); reference: the learned "
                                      f"gates on the same problems")
    vs = next((c["exact"] for c in ev["comparisons"] if c["a"] == "default" and c["b"] == "rl_policy"), None)
    if vs is not None:
        cell["vs"] = vs
    cells["GSM8K 0-shot"] = cell
    return cells


def gate_policy_rows(results_dir: str, columns: list[dict]) -> list[dict]:
    """The rows that bound the RL-tuned column: on GSM8K with the dense reward, the gain over the best fixed gate of
    the best cross-fitted contextual baseline and of the per-problem (split) oracle, from the gate oracle of the
    fine-tuned mHC model (RL's training pool), and of the RL policy over the grid's fixed gate on RL's held-out
    problems. Each row names its source; an absent source is skipped."""
    sft = next(c["tag"] for c in columns if c["name"] == "mHC + SFT")
    rl = next(c["tag"] for c in columns if c["name"] == "RL-tuned")
    rows = []
    path = os.path.join(results_dir, sft, "gate_oracle_gsm8k_dense_global.json")
    if os.path.isfile(path):
        with open(path) as f:
            oracle = json.load(f)
        base = oracle["baselines"]
        where = f"{oracle['problems']['count']} problems of {oracle['problems']['source']}"
        rows.append(dict(policy=f"best fixed gate (g = {oracle['headroom']['best_fixed_gate']})", gain=0.0, ci=None,
                         source=where))
        ctx = {n: r for n, r in base["policies"].items() if "gain" in r and n not in oracle.get("learners", {})
               .get("names", [])}
        if ctx:
            name = max(ctx, key=lambda n: ctx[n]["gain"])
            rows.append(dict(policy=f"best contextual baseline ({name}, cross-fitted)", gain=ctx[name]["gain"],
                             ci=ctx[name]["gain_ci"], source=where))
        rows.append(dict(policy="per-problem oracle (split)", gain=base["oracle_gain"], ci=base["oracle_gain_ci"],
                         source=where))
    path = os.path.join(results_dir, rl, "eval.json")
    if os.path.isfile(path):
        with open(path) as f:
            ev = json.load(f)
        c = next((c for c in ev["comparisons"] if c["a"] == "grid" and c["b"] == "rl_policy"), None)
        if c is not None and c["dense"]["diff"] is not None:
            rows.append(dict(policy="RL policy (per problem) vs the grid's fixed gate", gain=c["dense"]["diff"],
                             ci=c["dense"]["diff_ci95"], source=f"{ev['eval_pool']['count']} held-out problems of "
                                                                 f"{ev['eval_pool']['source']}"))
    return rows


def load_column(results_dir: str, col: dict) -> dict:
    """eval.json and the per-example records of one column, or the reason they are missing."""
    d = os.path.join(results_dir, col["tag"])
    path = os.path.join(d, "eval.json")
    if not os.path.isfile(path):
        return dict(missing=f"{path} not found (speedrun stage {col['stage']})")
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        return dict(missing=f"{path} is not valid JSON ({e.msg})")
    examples = []
    ex_path = os.path.join(d, "eval_examples.jsonl")
    if os.path.isfile(ex_path):
        with open(ex_path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        examples.append(json.loads(line))
                    except json.JSONDecodeError:
                        return dict(missing=f"{ex_path}:{i} is not valid JSON")
    config = {}
    cfg_path = os.path.join(d, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config = json.load(f)
    return dict(record=record, examples=examples, config=config, path=path)


def bpb_of(nats, nbytes, axis=-1):
    return np.sum(nats, axis=axis) / (LN2 * np.sum(nbytes, axis=axis))


def paired_bpb(ref_rows: dict, rows: dict, seed: int = 0) -> dict:
    """Paired bootstrap of bpb(column) - bpb(reference) over the shared validation rows {id: (nats, bytes)}."""
    ids = sorted(set(ref_rows) & set(rows), key=lambda i: int(i.split("-")[1]))
    if len(ids) < 2 or len(ids) != len(rows) or len(ids) != len(ref_rows):
        return dict(test="paired_bootstrap", error=f"validation rows do not pair ({len(ref_rows)} vs {len(rows)} "
                                                   f"rows, {len(ids)} shared): different data or settings")
    na, ba = (np.array([ref_rows[i][k] for i in ids], dtype=np.float64) for k in (0, 1))
    nb, bb = (np.array([rows[i][k] for i in ids], dtype=np.float64) for k in (0, 1))

    def diff(na_, ba_, nb_, bb_, axis=-1):
        return bpb_of(nb_, bb_, axis) - bpb_of(na_, ba_, axis)

    res = sps.bootstrap((na, ba, nb, bb), diff, paired=True, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                        confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    dist = res.bootstrap_distribution
    # two-sided bootstrap p-value with the +1 correction (never 0: the resolution is 2 / (resamples + 1))
    below, above = int(np.sum(dist <= 0)), int(np.sum(dist >= 0))
    p = min(1.0, 2 * (min(below, above) + 1) / (dist.size + 1))
    return dict(test="paired_bootstrap", n=len(ids), diff=float(diff(na, ba, nb, bb)),
                diff_ci95=[float(res.confidence_interval.low), float(res.confidence_interval.high)], p_value=p,
                resamples=BOOTSTRAP_RESAMPLES)


def bpb_cell(col: dict, ref: dict | None) -> dict:
    rec = col["record"]
    if "bpb" not in rec.get("results", {}):
        return dict(missing=f"{col['path']} has no bpb (evaluate with --tasks bpb,...)")
    cell = dict(value=rec["results"]["bpb"]["val_bpb"], unit="bits per byte", tokens=rec["results"]["bpb"]["tokens"])
    rows = {r["id"]: (r["nats"], r["bytes"]) for r in col["examples"] if r.get("task") == "bpb"}
    cell["n"] = len(rows)
    if len(rows) >= 2:
        ids = list(rows)
        n, b = np.array([rows[i][0] for i in ids]), np.array([rows[i][1] for i in ids])
        ci = sps.bootstrap((n, b), bpb_of, paired=True, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                           method="percentile", rng=np.random.default_rng(0)).confidence_interval
        cell["ci95"] = [float(ci.low), float(ci.high)]
    if ref is not None:
        ref_rows = {r["id"]: (r["nats"], r["bytes"]) for r in ref["examples"] if r.get("task") == "bpb"}
        cell["vs"] = paired_bpb(ref_rows, rows) if rows and ref_rows else dict(
            test="paired_bootstrap", error="no per-row validation records (re-run base_eval with --tasks bpb)")
    return cell


def task_cell(col: dict, ref: dict | None, task: str) -> dict:
    res = col["record"].get("results", {}).get(task)
    if res is None:
        return dict(missing=f"{col['path']} has no {task} (evaluate with --tasks ...,{task})")
    recs = {r["id"]: bool(r["correct"]) for r in col["examples"] if r.get("task") == task and "correct" in r}
    acc = accuracy(list(recs.values())) if recs else dict(n=res["n"], acc=res["score"], ci95=res["ci95"])
    cell = dict(value=acc["acc"], n=acc["n"], ci95=acc["ci95"], metric=res["metric"], unit="accuracy")
    if ref is not None:
        ref_recs = {r["id"]: bool(r["correct"]) for r in ref["examples"] if r.get("task") == task and "correct" in r}
        shared = sorted(set(recs) & set(ref_recs))
        if not shared or not len(shared) == len(recs) == len(ref_recs):
            cell["vs"] = dict(test="mcnemar_exact", error=f"examples do not pair ({len(ref_recs)} vs {len(recs)}, "
                                                          f"{len(shared)} shared): different subsets")
        else:
            cell["vs"] = mcnemar_paired([ref_recs[i] for i in shared], [recs[i] for i in shared])
    return cell


def bench_cells(bench: dict | None, bench_path: str, network: str) -> dict:
    if bench is None:
        missing = f"{bench_path} not found (speedrun stage bench_inference)"
        return {"inference latency": dict(missing=missing), "peak memory": dict(missing=missing)}
    r = bench["results"].get(network)
    b1 = r["batch"].get("1") if r else None
    if b1 is None:
        missing = f"{bench_path} has no batch-1 figures for the {network} network"
        return {"inference latency": dict(missing=missing), "peak memory": dict(missing=missing)}
    note = "random-init weights of the same architecture" + ("" if network == "baseline" else
                                                            "; SFT and RL-tuned share mHC's network")
    return {"inference latency": dict(value=b1["decode_ms_per_step"], unit="ms per decoded token, batch 1",
                                      prefill_ms=b1["prefill_ms"], note=note),
            "peak memory": dict(value=r["peak_memory_mib"]["1"], unit="MiB, batch-1 generation", note=note)}


def build_table(results_dir: str, columns: list[dict], bench_path: str) -> dict:
    loaded = {c["name"]: {**c, **load_column(results_dir, c)} for c in columns}
    bench = None
    if os.path.isfile(bench_path):
        with open(bench_path) as f:
            bench = json.load(f)
    table = {}
    for c in columns:
        col = loaded[c["name"]]
        ref = loaded.get(c["ref"]) if c["ref"] else None
        if ref is not None and "missing" in ref:
            ref = None  # the column is reported; its comparison says why it is absent
        cells = bench_cells(bench, bench_path, c["network"])
        if c.get("kind") == "rl":
            cells.update(rl_cells(results_dir, c))
            table[c["name"]] = dict(tag=c["tag"], reference="learned gates, same problems", cells=cells)
            continue
        if "missing" in col:
            cells.update({row: dict(missing=col["missing"]) for row in ROWS if row not in cells})
        else:
            cells["val bpb"] = bpb_cell(col, ref)
            for row, task in TASK_ROWS:
                cells[row] = task_cell(col, ref, task)
        if c["ref"] and (loaded[c["ref"]].get("missing")):
            for row in ROWS[:-2]:
                if "missing" not in cells[row]:
                    cells[row]["vs"] = dict(error=f"reference {c['ref']} missing: {loaded[c['ref']]['missing']}")
        table[c["name"]] = dict(tag=c["tag"], reference=c["ref"], cells=cells)
    params = next((loaded[c["name"]].get("config", {}).get("num_params") for c in columns
                   if loaded[c["name"]].get("config", {}).get("num_params")), None)
    scale = None if params is None else ("smoke" if params < SMOKE_PARAMS else "full")
    missing = [dict(column=name, row=row, reason=cell["missing"]) for name, col in table.items()
               for row, cell in col["cells"].items() if "missing" in cell]
    return dict(results_dir=results_dir, columns=table, rows=ROWS, scale=scale, num_params=params,
                missing=missing, bench=bench_path if bench else None,
                gate_policies=gate_policy_rows(results_dir, columns))


def format_cell(cell: dict, row: str, notes: list[str]) -> str:
    """One cell as text; a missing cell points to its reason in `notes` (listed under the table)."""
    for key, word in (("missing", "missing"), ("na", "n/a")):
        if key in cell:
            if cell[key] not in notes:
                notes.append(cell[key])
            return f"{word} [{notes.index(cell[key]) + 1}]"
    v = cell["value"]
    if row == "val bpb":
        text = f"{v:.4f}" + (f" [{cell['ci95'][0]:.4f}, {cell['ci95'][1]:.4f}]" if "ci95" in cell else "")
    elif row in ("inference latency", "peak memory"):
        text = f"{v:.2f} ms" if row == "inference latency" else f"{v:.0f} MiB"
    else:
        text = f"{v:.3f} [{cell['ci95'][0]:.3f}, {cell['ci95'][1]:.3f}] n={cell['n']}"
    vs = cell.get("vs")
    if vs:
        if "error" in vs:
            text += f"; Δ: {vs['error']}"
        else:
            fmt = "{:+.4f}" if row == "val bpb" else "{:+.3f}"
            lo, hi = vs["diff_ci95"]
            text += f"; Δ {fmt.format(vs['diff'])} [{fmt.format(lo)}, {fmt.format(hi)}], p={vs['p_value']:.3g}"
    return text


def to_markdown(table: dict) -> str:
    names = list(table["columns"])
    scale = table["scale"]
    lines = []
    if scale == "smoke":
        lines.append(f"**Smoke scale** ({table['num_params'] / 1e6:.1f} M parameters): these numbers test the "
                     f"pipeline; they are not findings about mHC.\n")
    refs = ", ".join(f"{n} vs {c['reference']}" for n, c in table["columns"].items() if c["reference"])
    lines.append(f"Accuracies: value [95% Wilson CI] n; Δ against the reference column on the same examples "
                 f"({refs}) with its 95% CI and McNemar's exact p. val bpb: [95% bootstrap CI]; Δ with a paired "
                 f"bootstrap over the validation rows. Latency and memory: benchmarks.inference (batch 1).\n")
    lines.append("| | " + " | ".join(f"{n} (`{table['columns'][n]['tag']}`)" for n in names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    notes: list[str] = []
    for row in table["rows"]:
        lines.append(f"| {row} | " + " | ".join(format_cell(table["columns"][n]["cells"][row], row, notes)
                                                 for n in names) + " |")
    if notes:
        lines.append(f"\n{len(table['missing'])} cell(s) missing; notes:\n")
        lines += [f"{i}. {reason}" for i, reason in enumerate(notes, 1)]
    if table.get("gate_policies"):
        lines += ["", "What bounds the RL-tuned column (GSM8K, dense reward: mean log-probability of the gold answer, "
                      "gain over the best fixed gate with its 95% CI):", "",
                  "| gate policy | gain over the best fixed gate | measured on |", "|---|---|---|"]
        for r in table["gate_policies"]:
            ci = f" [{r['ci'][0]:+.5f}, {r['ci'][1]:+.5f}]" if r["ci"] else " (the reference)"
            lines.append(f"| {r['policy']} | {r['gain']:+.5f}{ci} | {r['source']} |")
    return "\n".join(lines) + "\n"


def to_csv(table: dict) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["row", "column", "tag", "value", "ci95_low", "ci95_high", "n", "reference", "diff", "diff_ci95_low",
                "diff_ci95_high", "p_value", "test", "missing"])
    for name, col in table["columns"].items():
        for row in table["rows"]:
            c = col["cells"][row]
            vs = c.get("vs") or {}
            ci = c.get("ci95") or [None, None]
            dci = vs.get("diff_ci95") or [None, None]
            w.writerow([row, name, col["tag"], c.get("value"), ci[0], ci[1], c.get("n"), col["reference"],
                        vs.get("diff"), dci[0], dci[1], vs.get("p_value"), vs.get("test"),
                        c.get("missing") or c.get("na") or vs.get("error")])
    return out.getvalue()


def write_outputs(table: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, text in (("comparison.md", to_markdown(table)), ("comparison.csv", to_csv(table)),
                       ("comparison.json", json.dumps(table, indent=2))):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths[name] = path
    return paths


def add_column_args(p: argparse.ArgumentParser):
    p.add_argument("--results-dir", default="results", help="where the pipeline wrote its results")
    p.add_argument("--prefix", default="", help="tag prefix of the default tags (tiny_ for the tiny preset)")
    p.add_argument("--baseline-tag", default="", help="results folder of the baseline (default <prefix>baseline)")
    p.add_argument("--mhc-tag", default="", help="results folder of the mHC model (default <prefix>mhc)")
    p.add_argument("--baseline-sft-tag", default="", help="results folder of the fine-tuned baseline "
                   "(<prefix>baseline_sft)")
    p.add_argument("--sft-tag", default="", help="results folder of the fine-tuned mHC model (<prefix>mhc_sft)")
    p.add_argument("--rl-tag", default="", help="the RL run (a folder under <results-dir>/rl/) whose per-problem "
                   "policy fills the RL-tuned column (default: speedrun.sh's GSM8K run)")
    p.add_argument("--bench", default="", help="benchmarks.inference JSON (default <results-dir>/bench/inference.json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    add_column_args(p)
    p.add_argument("--out-dir", default="", help="output folder (default: <results-dir>)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        raise UserError(f"--results-dir {args.results_dir} does not exist")
    columns = columns_for(args.prefix, args.baseline_tag, args.mhc_tag, args.sft_tag, args.rl_tag,
                          args.baseline_sft_tag)
    table = build_table(args.results_dir, columns, args.bench or os.path.join(args.results_dir, "bench",
                                                                              "inference.json"))
    paths = write_outputs(table, args.out_dir or args.results_dir)
    print(to_markdown(table))
    print(f"wrote {', '.join(paths.values())}")
    return table


if __name__ == "__main__":
    run_main(main)
