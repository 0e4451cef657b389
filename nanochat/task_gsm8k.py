r"""GSM8K: generative exact match on the test split, 0-shot and 8-shot chain of thought, scored exactly as
lm-evaluation-harness scores its `gsm8k` (v3.0) and `gsm8k_cot` (v3.0) tasks.

Prompts (as lm-eval): 0-shot `Question: {q}\nAnswer:` (`gsm8k`); 8-shot `Q: {q}\nA: {a}` x 8 exemplars joined by
blank lines, then `Q: {q}\nA:` (`gsm8k_cot`, exemplars of Wei et al. 2022 in nanochat/data/gsm8k_cot_exemplars.json).
Greedy decoding up to --max-new-tokens, stopping at the harness's `until` strings.

Scoring, the harness's filters and metric, rule for rule (tests/test_tasks.py checks them against lm_eval's own
RegexFilter and exact_match_hf_evaluate):
- strict: `#### (\-?[0-9\.\,]+)` (0-shot) or `The answer is (\-?[0-9\.\,]+).` (8-shot), the first match;
- flexible: `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match (of a two-group match, its non-empty group);
- no match: "[invalid]";
- exact_match with ignore_case and regexes_to_ignore `,` `\$` `(?s).*#### ` `\.$` applied to the extraction and to
  the target (0-shot: the whole gold answer, 8-shot: the text after its last `####`), then string equality.
So `18.0` does not match `18`, and `#### $18` is not a strict match. `exact_match_flexible_numeric` (the flexible
extraction compared as a number, `$`/`,`/trailing `.` stripped) is kept as an extra, clearly named column.
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

GOLD_RE = re.compile(r"####\s*(-?[$0-9.,]+)")           # a gold answer's final line (row validation, reference)
STRICT_RE = {0: re.compile(r"#### (\-?[0-9\.\,]+)"),             # lm-eval gsm8k strict-match
             8: re.compile(r"The answer is (\-?[0-9\.\,]+).")}    # lm-eval gsm8k_cot strict-match
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")          # lm-eval flexible-extract (group_select -1)
FALLBACK = "[invalid]"                                            # lm-eval RegexFilter's fallback
REGEXES_TO_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")           # lm-eval exact_match, in this order
STOP_STRINGS = {0: ["Question:", "</s>", "<|im_end|>"], 8: ["Q:", "</s>", "<|im_end|>"]}  # lm-eval `until`
FEWSHOT_DELIMITER = "\n\n"                                         # between exemplars (lm-eval's default)


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


def regex_extract(text: str, regex: re.Pattern, group_select: int) -> str:
    """lm-eval's RegexFilter: findall, pick group_select, of a tuple its first non-empty group, strip; else
    "[invalid]"."""
    matches = regex.findall(text)
    if not matches:
        return FALLBACK
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), FALLBACK)
    return match.strip()


def extract_strict(text: str, num_fewshot: int) -> str:
    return regex_extract(text, STRICT_RE[num_fewshot], 0)


def extract_flexible(text: str) -> str:
    return regex_extract(text, FLEXIBLE_RE, -1)


def harness_normalize(s: str) -> str:
    """lm-eval exact_match's normalisation: the regexes_to_ignore removed in order, then lower-cased."""
    for pattern in REGEXES_TO_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def exact_match(prediction: str, target: str) -> bool:
    return harness_normalize(prediction) == harness_normalize(target)


def harness_target(answer: str, num_fewshot: int) -> str:
    """lm-eval's doc_to_target: `gsm8k` the whole gold answer, `gsm8k_cot` the text after its last `####`."""
    return answer if num_fewshot == 0 else answer.split("####")[-1].strip()


def is_correct(extracted: str | None, reference: str) -> bool:
    """Numeric equivalence (the extra column): `$1,200.` == `1200` and `18.0` == `18`."""
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
    question, the full gold answer, and the prompt's parts: the exemplars (`fewshot`, each ending in the delimiter)
    and the `query`, so that a prompt too long for the model can drop its earliest exemplars
    (nanochat/evaluate.py)."""
    if num_fewshot not in STOP_STRINGS:
        raise ValueError(f"GSM8K runs 0-shot or 8-shot (got {num_fewshot})")
    fewshot = [f"Q: {e['question']}\nA: {e['answer']}{FEWSHOT_DELIMITER}" for e in load_exemplars()] \
        if num_fewshot else []

    def parse(row: dict, idx: int) -> GenExample:
        q, a = row.get("question"), row.get("answer")
        if not isinstance(q, str) or not q.strip() or not isinstance(a, str):
            raise MalformedRow("needs string fields 'question' and 'answer'")
        m = GOLD_RE.search(a)
        if m is None or normalize_number(m.group(1)) is None:
            raise MalformedRow("the answer has no '#### <number>' final line")
        query = f"Q: {q}\nA:" if num_fewshot else prompt_0shot(q)
        return GenExample(id=f"{split}-{idx}", prompt="".join(fewshot) + query, reference=m.group(1).strip(),
                          extra=dict(question=q, answer=a, fewshot=fewshot, query=query))
    return parse


def score(ex: GenExample, completion: str, num_fewshot: int) -> dict:
    """The harness's two filters and exact_match on one completion, plus the numeric-equivalence extra column."""
    target = harness_target(ex.extra["answer"], num_fewshot)
    strict, flexible = extract_strict(completion, num_fewshot), extract_flexible(completion)
    return dict(extracted_strict=strict, extracted_flexible=flexible,
                exact_match_strict=exact_match(strict, target), exact_match_flexible=exact_match(flexible, target),
                exact_match_flexible_numeric=is_correct(flexible, ex.reference))
