"""ARC-Easy / ARC-Challenge (test split), multiple choice by log-likelihood as lm-eval `arc_easy`:
context `Question: {question}\\nAnswer:`, each choice text scored as the continuation " " + text.
gold = choices.label.index(answerKey): labels are letters or digits and questions have 3 to 5 options, so the
gold is never derived from the key itself (ord(key) - 65 or int(key) would mis-score those rows)."""
from __future__ import annotations

from nanochat.task_common import MalformedRow, MCExample, TaskData

DATA = {
    "arc_easy": TaskData(hub_id="allenai/ai2_arc", hub_config="ARC-Easy", split="test",
                         local_path="arc/ARC-Easy-test.jsonl"),
    "arc_challenge": TaskData(hub_id="allenai/ai2_arc", hub_config="ARC-Challenge", split="test",
                              local_path="arc/ARC-Challenge-test.jsonl"),
}


def parse(row: dict, idx: int) -> MCExample:
    question, choices, key = row.get("question"), row.get("choices"), row.get("answerKey")
    if not isinstance(question, str) or not isinstance(choices, dict):
        raise MalformedRow("needs a string 'question' and a 'choices' object")
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise MalformedRow("'choices' needs lists 'text' and 'label' of the same length (>= 2)")
    if not all(isinstance(t, str) and t for t in texts):
        raise MalformedRow("every choice text must be a non-empty string")
    if key not in labels:
        raise MalformedRow(f"answerKey {key!r} is not among the labels {labels}")
    return MCExample(id=str(row.get("id", idx)), context=f"Question: {question}\nAnswer:", choices=list(texts),
                     gold=labels.index(key))
