"""Example-by-example agreement between our evaluator (scripts.base_eval) and lm-evaluation-harness through the
adapter (scripts.lm_eval) on the same checkpoint: for every example both scored, do they give the same verdicts?

    python -m scripts.base_eval --model-tag tiny_mhc --results-dir R1 --tasks gsm8k,hellaswag,arc_easy,arc_challenge \
        --max-per-task 50 --subset first --max-new-tokens 48 --task-data local
    python -m scripts.lm_eval --model-tag tiny_mhc --results-dir R2 --tasks gsm8k,hellaswag,arc_easy,arc_challenge \
        --num-fewshot 0 --limit 50 --max-gen-toks 48 --task-data local
    python -m analysis.harness_agreement --ours R1/tiny_mhc --harness R2/tiny_mhc

Compared per example: acc and acc_norm (HellaSwag, ARC), and for GSM8K the completion, both filters' extractions
and both exact_match verdicts. `--subset first` makes our subset the harness's `--limit` examples; only the
examples present in both files are compared (their count is reported). Prints a table and writes
<ours>/harness_agreement.json; exits 1 when any verdict differs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nanochat.common import doc_summary, UserError, run_main

MC_TASKS = {"hellaswag": "ind", "arc_easy": "id", "arc_challenge": "id"}  # task -> the doc field our ids use
GSM8K_FILTERS = {"strict-match": "strict", "flexible-extract": "flexible"}  # harness filter -> our column suffix


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare(ours: list[dict], harness: list[dict]) -> dict:
    """ours: eval_examples.jsonl records; harness: lm_eval_samples.jsonl records. Returns per task {n_ours,
    n_harness, compared, disagreements: [{id, field, ours, harness}]}."""
    mine: dict[str, dict[str, dict]] = {}
    for r in ours:
        mine.setdefault(r["task"], {})[str(r["id"])] = r
    out = {}
    for s in harness:
        task = s["task"]
        if task in MC_TASKS:
            key, checks = str(s["doc"][MC_TASKS[task]]), [("acc", "acc"), ("acc_norm", "acc_norm")]
        elif task == "gsm8k":
            suffix = GSM8K_FILTERS[s["filter"]]
            key = f"test-{s['doc_id']}"
            checks = [("exact_match", f"exact_match_{suffix}")]
        else:
            continue
        row = out.setdefault(task, dict(n_ours=len(mine.get(task, {})), n_harness=set(), compared=set(),
                                        disagreements=[]))
        row["n_harness"].add(key)  # GSM8K: one harness sample per filter, one example
        m = mine.get(task, {}).get(key)
        if m is None or "skipped" in m:
            continue
        row["compared"].add(key)
        pairs = [(hf, bool(s[hf]), bool(m[of])) for hf, of in checks]
        if task == "gsm8k":
            pairs += [("completion", s["resps"][0][0], m["completion"]),
                      (f"extracted_{suffix}", s["filtered_resps"][0], m[f"extracted_{suffix}"])]
        row["disagreements"] += [dict(id=key, field=f, harness=h, ours=o) for f, h, o in pairs if h != o]
    for row in out.values():
        row["n_harness"], row["compared"] = len(row["n_harness"]), len(row["compared"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--ours", required=True, help="results folder of scripts.base_eval (holds eval_examples.jsonl)")
    p.add_argument("--harness", required=True, help="results folder of scripts.lm_eval (lm_eval_samples.jsonl)")
    args = p.parse_args(argv)
    result = compare(read_jsonl(os.path.join(args.ours, "eval_examples.jsonl")),
                     read_jsonl(os.path.join(args.harness, "lm_eval_samples.jsonl")))
    if not any(r["compared"] for r in result.values()):
        raise UserError(f"no example is in both {args.ours} and {args.harness}: evaluate the same tasks with "
                        "`--subset first --max-per-task N` and `--limit N`")
    print("| task | ours | harness | compared | disagreements |\n|---|---|---|---|---|")
    for task, r in sorted(result.items()):
        print(f"| {task} | {r['n_ours']} | {r['n_harness']} | {r['compared']} | {len(r['disagreements'])} |")
    out = os.path.join(args.ours, "harness_agreement.json")
    with open(out + ".tmp", "w") as f:
        json.dump(dict(ours=os.path.abspath(args.ours), harness=os.path.abspath(args.harness), tasks=result), f,
                  indent=2)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    if any(r["disagreements"] for r in result.values()):
        print("the evaluators disagree: see the disagreements in the JSON", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    run_main(main)
