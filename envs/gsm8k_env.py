"""GSM8K-format problems for the RL gate controller: where they come from, the prompt, and how an answer is scored.

The problem logic only; the gymnasium environments are in envs/mhc_env.py. Everything task-specific goes through
nanochat's GSM8K task (nanochat/task_gsm8k.py: row parsing, the 0-shot prompt, answer extraction and exact match)
and its evaluation code (nanochat/evaluate.py: batched generation with the KV cache; nanochat/task_common.py:
continuation log-likelihoods), so the controller is rewarded exactly as `scripts.base_eval` scores.

Problems (GenExample: id, 0-shot prompt, reference = the final number, extra = question and worked answer):
- `gsm8k`: the GSM8K `train` or `test` split (HF hub, else $NANOCHAT_DATA_DIR/gsm8k/*.jsonl);
- `synthetic`: generated arithmetic word problems in GSM8K's format (nanochat/synthetic_gsm8k.py), which the tiny
  CPU models can learn, so the rewards are not all zero.

The two metrics of one problem under the gates currently set on the model, from which the rewards are made
(nanochat/gate_rewards.py):
- exact: 1 if the greedy 0-shot completion's answer matches (the GSM8K task's primary metric), else 0;
- dense: the mean per-token log-probability (nats, <= 0) of the gold worked answer under teacher forcing, one
  forward pass and no generation.
"""
from __future__ import annotations


import sys

import numpy as np
import torch

from nanochat import task_gsm8k
from nanochat.common import UserError, print0
from nanochat.engine import Engine
from nanochat.splits import select_part
from nanochat.evaluate import TASKS, run_gen_batch
from nanochat.synthetic_gsm8k import as_examples, generate_problems
from nanochat.task_common import (GenExample, ModelScorer, continuation_ids, load_rows, parse_rows, row_location,
                                  subsample)

PROBLEM_SOURCES = ("synthetic", "gsm8k")
GSM8K_METRIC = TASKS["gsm8k"][3]  # the primary metric base_eval reports for 0-shot GSM8K


def load_problems(source: str, *, split: str = "train", count: int = -1, seed: int = 0, task_data: str = "auto",
                  synthetic_steps=(1, 2), synthetic_max_value: int = 20, synthetic_ops: str = "+-",
                  synthetic_mix: str = "", exclude=(), part: str = "",
                  split_seed: int = 0) -> tuple[list[GenExample], str]:
    """Problems of one source. gsm8k: `split` (train | test), the first `count` after a shuffle seeded by `seed`
    (all when count < 0), of the train split's `part` (sft | rl_train | rl_val, nanochat/splits.py, seeded by
    `split_seed`) when given; synthetic: `count` problems from generator seed `seed` (a named `synthetic_mix` replaces
    the steps / max value / ops knobs). Questions in `exclude` (problems or strings) are left out. Every problem has
    extra["type"]: the synthetic tier or step count; for GSM8K the number of calculation steps of its reference
    solution (gsm8k_type: a stratum for analysis, read from the answer, so no policy can observe it). Returns
    (problems, a description of where they came from)."""
    excluded = {e.extra["question"] if isinstance(e, GenExample) else e for e in exclude}
    if source == "synthetic":
        if count <= 0:
            raise UserError(f"synthetic problems need a count > 0 (got {count})")
        problems = generate_problems(count, seed=seed, steps=synthetic_steps, max_value=synthetic_max_value,
                                     ops=synthetic_ops, exclude=excluded, mixture=synthetic_mix)
        desc = (f"synthetic:seed={seed},mixture={synthetic_mix}" if synthetic_mix else
                f"synthetic:seed={seed},steps={list(synthetic_steps)},max_value={synthetic_max_value},"
                f"ops={synthetic_ops}")
        return as_examples(problems, f"synthetic{seed}"), desc
    if source == "gsm8k":
        if split not in task_gsm8k.SPLITS:
            raise UserError(f"GSM8K split must be one of {', '.join(task_gsm8k.SPLITS)} (got {split!r})")
        rows, where = load_rows(task_gsm8k.SPLITS[split], task_data)
        examples, malformed = parse_rows(rows, task_gsm8k.make_parser(0, split), False, where)
        if malformed:  # dropped, but never silently: a broken local copy would otherwise shrink the data unnoticed
            print0(f"warning: dropped {len(malformed)} malformed GSM8K row(s) of {where}; the first: "
                   f"{row_location(where, malformed[0])}", file=sys.stderr)
        examples = [ex for ex in examples if ex.extra["question"] not in excluded]
        if part:
            if split != "train":
                raise UserError(f"GSM8K part {part!r} is a part of the train split (the test split is never divided; "
                                f"got split {split!r})")
            examples = select_part(examples, part, split_seed)
            where = f"{where} part {part} (split seed {split_seed})"
        for ex in examples:
            ex.extra["type"] = gsm8k_type(ex.extra["answer"])
        if not examples:
            raise UserError(f"no usable GSM8K problems in {where} ({len(malformed)} malformed rows)")
        return subsample(examples, count, seed), where
    raise UserError(f"problem source must be one of {', '.join(PROBLEM_SOURCES)} (got {source!r})")


def gsm8k_type(answer: str) -> str:
    """A GSM8K problem's stratum: the calculator annotations (<<...>>) of its reference solution, 1-2, 3-4 or 5+."""
    n = answer.count("<<")
    return "1-2 steps" if n <= 2 else "3-4 steps" if n <= 4 else "5+ steps"


def fit_problems(problems: list[GenExample], tokenizer, max_len: int,
                 max_new_tokens: int = 0) -> tuple[list[GenExample], int]:
    """Keep the problems both rewards can score in the model's trained context: the gold answer fits (a longer
    prompt loses its left part, as in evaluation, but the scored answer must survive whole), and the prompt leaves
    room for max_new_tokens of generation (evaluation's rule, nanochat.evaluate.fit_prompt). Returns (kept,
    number dropped)."""
    def fits(p):
        n_answer = continuation_ids(tokenizer, p.prompt, task_gsm8k.gold_continuation(p.extra["answer"]))[1]
        n_prompt = len(tokenizer.encode(p.prompt, prepend=tokenizer.bos_token_id))
        return 0 < n_answer < max_len and n_prompt + max_new_tokens <= max_len
    kept = [p for p in problems if fits(p)]
    return kept, len(problems) - len(kept)


@torch.no_grad()
def dense_rewards(model, tokenizer, problems: list[GenExample], autocast_ctx, halves: bool = False) -> list:
    """Mean per-token log-probability of each problem's gold answer, in one batch, under the gates set on the
    model (row b of a per-example gate is problem b). halves=True gives two replicates per problem instead: the
    means over the answer's even and over its odd token positions (analysis/gate_oracle.py)."""
    scorer = ModelScorer(model, tokenizer, autocast_ctx)
    out = scorer.loglikelihoods([(p.prompt, task_gsm8k.gold_continuation(p.extra["answer"])) for p in problems],
                                per_token=halves)
    if any(r["ll"] is None for r in out):  # fit_problems keeps these out: a None here would misalign the gates
        bad = [p.id for p, r in zip(problems, out) if r["ll"] is None]
        raise UserError(f"problems {bad[:3]} have no scorable answer tokens in the model's context "
                        f"(filter them with envs.gsm8k_env.fit_problems)")
    if halves:
        short = [p.id for p, r in zip(problems, out) if r["n_tokens"] < 2]
        if short:
            raise UserError(f"problems {short[:3]} have answers of one token: no even/odd halves to compare")
        return [(float(np.mean(r["token_lls"][0::2])), float(np.mean(r["token_lls"][1::2]))) for r in out]
    return [r["ll"] / r["n_tokens"] for r in out]


@torch.no_grad()
def exact_rewards(model, tokenizer, problems: list[GenExample], max_new_tokens: int, autocast_ctx,
                  temperature: float = 0.0, seed: int = 0, compile: bool = False,
                  compile_backend="inductor") -> list[dict]:
    """0-shot generation for every problem in one batch (KV cache), greedy (or sampled at `temperature` from
    `seed`), scored by the GSM8K task. Returns the evaluation records (completion, extracted answers,
    exact_match_*); `correct` is the primary metric."""
    records = run_gen_batch(problems, Engine(model, tokenizer, autocast_ctx, compile=compile, backend=compile_backend),
                            tokenizer, max_new_tokens, 0,
                            temperature=temperature, seed=seed)
    skipped = [r["id"] for r in records if "skipped" in r]
    if skipped:  # fit_problems keeps these out: a skipped row would misalign the gates
        raise UserError(f"problems {skipped[:3]} do not fit the model's context with {max_new_tokens} new tokens "
                        f"(filter them with envs.gsm8k_env.fit_problems)")
    for r in records:
        r["correct"] = bool(r[GSM8K_METRIC])
    return records


@torch.no_grad()
def question_features(model, tokenizer, problems: list[GenExample], autocast_ctx) -> np.ndarray:
    """The observation of each problem: its prompt's final hidden state, mean-pooled over the prompt tokens,
    [B, n_embd] float32. Computed under whatever gates are set (the env clears them first)."""
    max_len = model.config.sequence_len
    ids = [tokenizer.encode(p.prompt, prepend=tokenizer.bos_token_id)[-max_len:] for p in problems]
    T = max(len(x) for x in ids)
    device = model.cos.device
    batch = torch.zeros(len(ids), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(ids), T, 1, device=device)
    for b, x in enumerate(ids):  # right padding: causal attention keeps the real positions exact
        batch[b, :len(x)] = torch.tensor(x, device=device)
        mask[b, :len(x)] = 1
    with autocast_ctx:
        h = model.hidden_states(batch).float()                                   # [B, T, C]
    pooled = (h * mask).sum(1) / mask.sum(1)
    return pooled.cpu().numpy().astype(np.float32)
