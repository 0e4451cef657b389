"""Run one downstream task over a model, sharded across ranks, and summarise it.

Tasks (TASKS): gsm8k, gsm8k_8shot (generative exact match), hellaswag, arc_easy, arc_challenge (multiple choice by
log-likelihood). Per task: load and validate the rows (malformed ones counted, or fatal with strict), take the
deterministic subsample, cut it into batches, give rank r the batches r, r + W, r + 2W, ..., gather the per-example
records on every rank and aggregate. The batches are a function of the subsample and the batch size only, so each
example meets the same padding and the same neighbours on any number of ranks, and 2 ranks reproduce 1 process.
"""
from __future__ import annotations

import time

import torch.distributed as dist

from nanochat import task_arc, task_gsm8k, task_hellaswag
from nanochat.common import UserError, progress
from nanochat.engine import Engine
from nanochat.stats import wilson_interval
from nanochat.task_common import GenExample, MCExample, ModelScorer, load_rows, parse_rows, score_mc, subsample

# name -> (kind, data, parser, primary metric, few-shot count). Primary metrics follow common reporting
# (docs/design.md, section 7): HellaSwag acc_norm, ARC-Easy acc, ARC-Challenge acc_norm, GSM8K flexible exact match.
TASKS = {
    "gsm8k": ("gen", task_gsm8k.DATA, lambda: task_gsm8k.make_parser(0), "exact_match_flexible", 0),
    "gsm8k_8shot": ("gen", task_gsm8k.DATA, lambda: task_gsm8k.make_parser(8), "exact_match_flexible", 8),
    "hellaswag": ("mc", task_hellaswag.DATA, lambda: task_hellaswag.parse, "acc_norm", 0),
    "arc_easy": ("mc", task_arc.DATA["arc_easy"], lambda: task_arc.parse, "acc", 0),
    "arc_challenge": ("mc", task_arc.DATA["arc_challenge"], lambda: task_arc.parse, "acc_norm", 0),
}
MC_METRICS = ("acc", "acc_norm", "acc_token_norm")
GEN_METRICS = ("exact_match_strict", "exact_match_flexible", "exact_match_flexible_numeric")
STYLES = {
    "mc": "lm-eval multiple choice, 0-shot: sum of continuation token log-probs (continuation = ' ' + choice, its "
          "tokens taken from the joint context+continuation encoding, BOS first); acc = argmax LL, acc_norm = argmax "
          "LL / len(choice) in characters (lm-eval), acc_token_norm = argmax mean LL per token (karpathy/CORE)",
    "gen": "lm-evaluation-harness gsm8k / gsm8k_cot v3.0, greedy: strict = first '#### N' (0-shot) or 'The answer "
           "is N.' (8-shot), flexible = last match of (-?[$0-9.,]{2,})|(-?[0-9]+); exact_match with ignore_case and "
           "regexes_to_ignore ',' '\\$' '(?s).*#### ' '\\.$' against the harness target; "
           "exact_match_flexible_numeric (an extra, not the harness's) compares the flexible extraction as a number",
}
MAX_REASONS = 5  # malformed-row reasons quoted in eval.json (the count covers all of them)


def mc_batches(examples: list[MCExample], rows_per_batch: int) -> list[list[MCExample]]:
    """Whole examples per batch, up to rows_per_batch choices (at least one example)."""
    batches, cur, rows = [], [], 0
    for ex in examples:
        if cur and rows + len(ex.choices) > rows_per_batch:
            batches.append(cur)
            cur, rows = [], 0
        cur.append(ex)
        rows += len(ex.choices)
    return batches + ([cur] if cur else [])


def run_mc_batch(batch: list[MCExample], scorer) -> list[dict]:
    requests = [(ex.context, ex.delimiter + c) for ex in batch for c in ex.choices]
    lls = scorer.loglikelihoods(requests)
    records, i = [], 0
    for ex in batch:
        res = score_mc(ex, lls[i:i + len(ex.choices)])
        i += len(ex.choices)
        if res is None:
            records.append(dict(id=ex.id, skipped="a choice has no scorable continuation tokens in the context"))
            continue
        records.append(dict(id=ex.id, gold=ex.gold, **res))
    return records


def fit_prompt(ex: GenExample, tokenizer, room: int) -> tuple[list[int] | None, int]:
    """The context rule for generation: the prompt and the generation must fit the model's trained context. A
    few-shot prompt drops its earliest exemplars until it fits; a prompt that does not fit even without them is
    refused (None). Returns (prompt ids with BOS, or None; exemplars kept)."""
    fewshot = ex.extra.get("fewshot", [])
    query = ex.extra.get("query", ex.prompt)
    for k in range(len(fewshot), -1, -1):
        ids = tokenizer.encode("".join(fewshot[len(fewshot) - k:]) + query, prepend=tokenizer.bos_token_id)
        if len(ids) <= room:
            return ids, k
    return None, 0


def run_gen_batch(batch: list[GenExample], engine: Engine, tokenizer, max_new_tokens: int,
                  num_fewshot: int, temperature: float = 0.0, seed: int = 0) -> list[dict]:
    """Greedy (or, with temperature > 0, sampled) generation for a batch of GSM8K examples, scored by the task. The context is the model's trained
    sequence_len (not the rotary tables' headroom): prompt + max_new_tokens must fit it (fit_prompt). Records say
    how many exemplars each prompt kept (`exemplars`) and whether some were dropped (`cut`); a refused example is
    recorded as skipped."""
    room = engine.model.config.sequence_len - max_new_tokens
    if room <= 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's trained "
                        f"context of {engine.model.config.sequence_len} tokens")
    fitted = [fit_prompt(ex, tokenizer, room) for ex in batch]
    live = [i for i, (ids, _) in enumerate(fitted) if ids is not None]
    outs = engine.generate([fitted[i][0] for i in live], max_new_tokens, temperature=temperature, seed=seed,
                           stop_tokens=[tokenizer.bos_token_id],
                           stop_strings=task_gsm8k.STOP_STRINGS[num_fewshot]) if live else []
    by_index = dict(zip(live, outs))
    records = []
    for i, ex in enumerate(batch):
        ids, kept = fitted[i]
        if ids is None:
            records.append(dict(id=ex.id, skipped=f"the prompt does not fit the trained context of "
                                                  f"{engine.model.config.sequence_len} tokens with {max_new_tokens} "
                                                  f"new tokens"))
            continue
        out = by_index[i]
        res = task_gsm8k.score(ex, out.text, num_fewshot)
        records.append(dict(id=ex.id, reference=ex.reference, completion=out.text, finish=out.finish_reason,
                            new_tokens=len(out.tokens), exemplars=kept, cut=kept < num_fewshot, **res))
    return records


def gather_records(records: list[dict], world_size: int) -> list[dict]:
    if world_size > 1 and dist.is_initialized():
        parts = [None] * world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["_order"])


def evaluate_task(name: str, model, tokenizer, *, autocast_ctx, batch_size: int, max_per_task: int = -1,
                  max_new_tokens: int = 256, strict: bool = False, task_data: str = "auto", seed: int | None = 42,
                  rank: int = 0, world_size: int = 1, scoring_model=None,
                  compile_generation: bool = False) -> tuple[dict, list[dict]]:
    """Evaluate one task. Returns (summary for eval.json, per-example records for eval_examples.jsonl); both are
    complete on every rank. scoring_model: the forward that scores choices (the model compiled, with --compile;
    default the model); generation runs `model` through the engine, compiled with compile_generation. A task with
    nothing to score (an empty file, every row malformed, every example skipped) is a UserError naming the data,
    never a result with n = 0."""
    kind, data, make_parse, primary, num_fewshot = TASKS[name]
    t0 = time.perf_counter()
    rows, source = load_rows(data, task_data)
    if not rows:
        raise UserError(f"task {name}: {source} has no rows (an empty file?)")
    examples, malformed = parse_rows(rows, make_parse(), strict, source)
    if not examples:
        raise UserError(f"task {name}: none of the {len(rows)} rows of {source} is a valid example (first reasons: "
                        f"{'; '.join(malformed[:3])})")
    examples = subsample(examples, max_per_task, seed)
    t_load = time.perf_counter() - t0
    order = {id(ex): i for i, ex in enumerate(examples)}  # by object, so duplicate ids in a file cannot collide
    if kind == "mc":
        scorer = ModelScorer(model if scoring_model is None else scoring_model, tokenizer, autocast_ctx)
        batches = mc_batches(examples, batch_size)
        run = lambda b: run_mc_batch(b, scorer)  # noqa: E731
        metrics = MC_METRICS
    else:
        engine = Engine(model, tokenizer, autocast_ctx, compile=compile_generation)
        by_len = sorted(examples, key=lambda ex: (len(ex.prompt), order[id(ex)]))  # similar lengths pad little
        batches = [by_len[i:i + batch_size] for i in range(0, len(by_len), batch_size)]
        run = lambda b: run_gen_batch(b, engine, tokenizer, max_new_tokens, num_fewshot)  # noqa: E731
        metrics = GEN_METRICS
    records = []
    for batch in progress(batches[rank::world_size], desc=name, unit="batch"):
        for ex, r in zip(batch, run(batch)):
            r["_order"] = order[id(ex)]
            records.append(r)
    records = gather_records(records, world_size)
    for r in records:
        del r["_order"]
    seconds = time.perf_counter() - t0 - t_load  # scoring only: loading a 12 MB file is not model speed

    scored = [r for r in records if "skipped" not in r]
    n = len(scored)
    if n == 0:
        reasons = sorted({r["skipped"] for r in records})[:MAX_REASONS]
        raise UserError(f"task {name}: none of the {len(records)} examples from {source} could be scored "
                        f"({'; '.join(reasons)})")
    summary = dict(metric=primary, score=None, n=n, ci95=None, ci_method="wilson",
                   metrics={}, style=STYLES[kind], num_fewshot=num_fewshot, data_source=source, rows=len(rows),
                   malformed=len(malformed), malformed_reasons=malformed[:MAX_REASONS],
                   skipped=len(records) - n, truncated=sum(bool(r.get("truncated")) for r in scored),
                   cut=sum(bool(r.get("cut")) for r in scored),
                   max_per_task=max_per_task, load_seconds=t_load, seconds=seconds,
                   examples_per_s=len(records) / max(seconds, 1e-9))
    for m in metrics:
        k = sum(bool(r[m]) for r in scored)
        summary["metrics"][m] = dict(score=k / n if n else None, correct=k, ci95=list(wilson_interval(k, n)))
    summary["score"], summary["ci95"] = summary["metrics"][primary]["score"], summary["metrics"][primary]["ci95"]
    if kind == "gen":
        summary["max_new_tokens"] = max_new_tokens
        summary["context"] = dict(
            trained_context=model.config.sequence_len, exemplars_requested=num_fewshot,
            rule="prompt + max_new_tokens must fit the trained context: few-shot prompts drop their earliest "
                 "exemplars until they fit ('cut' counts them); a prompt that cannot fit is skipped",
            skipped_reasons=sorted({r["skipped"] for r in records if "skipped" in r})[:MAX_REASONS])
    for r in records:
        r["task"] = name
        if "skipped" not in r:
            r["correct"] = bool(r[primary])
            r["prediction"] = r["extracted_flexible"] if kind == "gen" else r["pred_norm" if primary == "acc_norm"
                                                                               else "pred"]
    return summary, records
