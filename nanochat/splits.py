"""Clean data splits for fine-tuning and RL: GSM8K train is divided, seeded and recorded, into an SFT part, an
RL-training part and an RL-validation part; GSM8K test is used only for final numbers.

A problem's part is decided by a seeded hash of its question text, not by its row position: the same question lands
in the same part whether it comes from the HF hub or a local copy, in any order, and a subset keeps its members'
parts. So the SFT model never saw an RL problem, and RL's model selection never saw an RL-training problem.

    part_of(question, seed=0)            # "sft" | "rl_train" | "rl_val"
    select_part(examples, "rl_train")    # the examples of one part (GenExample or dicts with "question")
    describe(examples, "sft")            # what a run records: part, seed, fractions, count, a digest of the ids

Synthetic problems are split by generator seed instead (nanochat/synthetic_gsm8k.py): fine-tuning seed 0, RL
training seed s, evaluation s + 1, RL validation s + 2, each without the others' questions.
"""
from __future__ import annotations

import hashlib

from nanochat.common import UserError

# fractions of GSM8K train (7473 problems: ~5980 SFT, ~1120 RL training, ~370 RL validation)
GSM8K_TRAIN_PARTS = (("sft", 0.80), ("rl_train", 0.15), ("rl_val", 0.05))
PARTS = tuple(name for name, _ in GSM8K_TRAIN_PARTS)


def _unit(question: str, seed: int) -> float:
    """A uniform number in [0, 1) from the question and the seed (sha256: stable across Python runs)."""
    digest = hashlib.sha256(f"gsm8k-split-{seed}\n{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def part_of(question: str, seed: int = 0) -> str:
    u, edge = _unit(question, seed), 0.0
    for name, fraction in GSM8K_TRAIN_PARTS:
        edge += fraction
        if u < edge:
            return name
    return GSM8K_TRAIN_PARTS[-1][0]


def _question(ex) -> str:
    return ex["question"] if isinstance(ex, dict) else ex.extra["question"]


def select_part(examples, part: str, seed: int = 0) -> list:
    if part not in PARTS:
        raise UserError(f"GSM8K train part must be one of {', '.join(PARTS)} (got {part!r})")
    return [ex for ex in examples if part_of(_question(ex), seed) == part]


def describe(examples, part: str, seed: int = 0) -> dict:
    """The record of a part a run used: enough to check two runs used the same (or disjoint) problems."""
    ids = sorted(getattr(ex, "id", None) or _question(ex) for ex in examples)
    return dict(part=part, split_seed=seed, fractions=dict(GSM8K_TRAIN_PARTS), count=len(ids),
                ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16])
