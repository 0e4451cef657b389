"""HellaSwag (validation split): pick the ending of a caption, by log-likelihood, with lm-eval's preprocessing
(lm_eval/tasks/hellaswag/utils.py): query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
choices = preprocess(ending), each scored as the continuation " " + choice."""
from __future__ import annotations

import re

from nanochat.task_common import MalformedRow, MCExample, TaskData

DATA = TaskData(hub_id="Rowan/hellaswag", hub_config=None, split="validation",
                local_path="hellaswag/hellaswag_val.jsonl")
NUM_ENDINGS = 4


def preprocess(text: str) -> str:
    """lm-eval: WikiHow markup out ([title] becomes a sentence break, other [tags] vanish), double spaces fixed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def parse(row: dict, idx: int) -> MCExample:
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(row.get(key), str):
            raise MalformedRow(f"field {key!r} is missing or not a string")
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != NUM_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise MalformedRow(f"'endings' must be a list of {NUM_ENDINGS} strings")
    try:  # an int in the jsonl, a string ('0'..'3') in the arrow and on the hub
        label = int(row.get("label"))
    except (TypeError, ValueError):
        raise MalformedRow(f"label {row.get('label')!r} is not an integer") from None
    if not 0 <= label < NUM_ENDINGS:
        raise MalformedRow(f"label {label} is not in 0..{NUM_ENDINGS - 1}")
    choices = [preprocess(e) for e in endings]
    if not all(choices):
        raise MalformedRow("an ending is empty after preprocessing")
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCExample(id=str(row.get("ind", idx)), context=preprocess(row["activity_label"] + ": " + ctx),
                     choices=choices, gold=label)
