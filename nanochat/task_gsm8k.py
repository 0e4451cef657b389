"""GSM8K: generative exact match on the test split, 0-shot and 8-shot chain of thought.

Prompts (as lm-eval): 0-shot `Question: {q}\\nAnswer:` (lm-eval `gsm8k`); 8-shot `Q: {q}\\nA: {a}` x 8 exemplars
joined by blank lines, then `Q: {q}\\nA:` (lm-eval `gsm8k_cot`, exemplars of Wei et al. 2022 in
nanochat/data/gsm8k_cot_exemplars.json). Greedy decoding up to --max-new-tokens.

Scoring (shared/notes/data_and_eval_scoring.md, "recommended normalisation"): strip `,` and `$` and a trailing `.`,
compare as numbers (so `18.0` == `18`). Two extractions, reported separately:
- strict: the answer line the prompt teaches: `#### N` (GSM8K's own format, 0-shot) or `The answer is N`
  (the exemplars' format, 8-shot). The first match counts, as in GSM8K's reference `ANS_RE`.
- flexible: the number after the first `####` if there is one, else the last number in the completion.
"""
from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation

from nanochat.task_common import GenExample, MalformedRow, TaskData

DATA = TaskData(hub_id="openai/gsm8k", hub_config="main", split="test", local_path="gsm8k/test.jsonl")
DATA_TRAIN = TaskData(hub_id="openai/gsm8k", hub_config="main", split="train", local_path="gsm8k/train.jsonl")
SPLITS = {"test": DATA, "train": DATA_TRAIN}
EXEMPLARS_PATH = os.path.join(os.path.dirname(__file__), "data", "gsm8k_cot_exemplars.json")

HASH_RE = re.compile(r"####\s*(-?[$0-9.,]+)")                # GSM8K's `#### (\-?[0-9\.\,]+)`, `$` allowed
COT_RE = re.compile(r"The answer is\s*(-?[$0-9.,]+)")        # lm-eval gsm8k_cot strict-match
NUMBER_RE = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")    # one number in free text (commas, decimals, $)
STOP_STRINGS = {0: ["Question:", "\n\n"], 8: ["Q:", "\n\n"]}  # lm-eval stops at the next question; no answer
# contains a blank line (the few-shot separator), so one ends the answer too and saves decode time on small models


def normalize_number(s: str | None) -> Decimal | None:
    """`$1,200.` -> 1200; `-3` -> -3; `18.0` -> 18.0 (== 18). None when s is not a number."""
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "")
    if s.endswith("."):
        s = s[:-1]
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_strict(text: str, num_fewshot: int) -> str | None:
    m = (COT_RE if num_fewshot else HASH_RE).search(text)
    return m.group(1) if m else None


def extract_flexible(text: str) -> str | None:
    m = HASH_RE.search(text)
    if m:
        return m.group(1)
    numbers = NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def is_correct(extracted: str | None, reference: str) -> bool:
    a, b = normalize_number(extracted), normalize_number(reference)
    return a is not None and b is not None and a == b


def load_exemplars() -> list[dict]:
    with open(EXEMPLARS_PATH) as f:
        return json.load(f)["exemplars"]


def prompt_0shot(question: str) -> str:
    """The 0-shot prompt (lm-eval `gsm8k`); fine-tuning (scripts/sft_train.py) and the RL env use it too."""
    return f"Question: {question}\nAnswer:"


def gold_continuation(answer: str) -> str:
    """The gold worked answer as the continuation of prompt_0shot: what SFT trains on and the RL env's dense
    reward scores under teacher forcing."""
    return " " + answer


def make_parser(num_fewshot: int, split: str = "test"):
    """Row parser: GenExample(id=f"{split}-{row index}", prompt, reference = the final number); `extra` keeps the
    question and the full gold answer."""
    if num_fewshot not in STOP_STRINGS:
        raise ValueError(f"GSM8K runs 0-shot or 8-shot (got {num_fewshot})")
    prefix = "".join(f"Q: {e['question']}\nA: {e['answer']}\n\n" for e in load_exemplars()) if num_fewshot else ""

    def parse(row: dict, idx: int) -> GenExample:
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str):
            raise MalformedRow("needs string fields 'question' and 'answer'")
        m = HASH_RE.search(a)
        if m is None or normalize_number(m.group(1)) is None:
            raise MalformedRow("the answer has no '#### <number>' final line")
        prompt = prefix + (f"Q: {q}\nA:" if num_fewshot else prompt_0shot(q))
        return GenExample(id=f"{split}-{idx}", prompt=prompt, reference=m.group(1).strip(),
                          extra=dict(question=q, answer=a))
    return parse


def score(ex: GenExample, completion: str, num_fewshot: int) -> dict:
    strict, flexible = extract_strict(completion, num_fewshot), extract_flexible(completion)
    return dict(extracted_strict=strict, extracted_flexible=flexible,
                exact_match_strict=is_correct(strict, ex.reference),
                exact_match_flexible=is_correct(flexible, ex.reference))
