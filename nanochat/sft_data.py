"""Supervised fine-tuning data in GSM8K's 0-shot format: rows of `prompt + " " + worked answer + "\\n\\n"` whose
loss falls on the answer tokens only (scripts/sft_train.py).

The prompt is the one evaluation and the RL env use (task_gsm8k.prompt_0shot), the answer is the gold continuation
the env's dense reward scores, and the trailing blank line is the separator that precedes the next `Question:` in
GSM8K prompts (the harness's stop string), so a fine-tuned model learns to end its answer there.

Rows are tokenised jointly (BOS, prompt, answer), with the answer tokens found as in evaluation (task_common.
continuation_ids), so the BPE boundary between prompt and answer is the one the model sees at test time. The loader
walks one global row order (a seeded permutation per epoch); rank r of W takes rows r*B ... (r+1)*B - 1 of each
global batch of W*B rows, so the data order does not depend on the number of ranks and the resume position is one
counter.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from nanochat import task_gsm8k
from nanochat.common import UserError
from nanochat.task_common import continuation_ids

ANSWER_END = task_gsm8k.FEWSHOT_DELIMITER  # "\n\n": what follows an answer in GSM8K prompts (then "Question:",
# the harness's stop string), so a fine-tuned model ends its answer where evaluation stops reading


def encode_rows(tokenizer, problems, max_len: int) -> tuple[list[tuple[list[int], int]], int]:
    """problems: GenExamples with extra['answer']. Returns ([(ids, number of answer tokens at the end)], number of
    problems dropped because the row does not fit max_len + 1 tokens)."""
    rows, dropped, too_long = [], 0, []
    for p in problems:
        ids, n_answer = continuation_ids(tokenizer, p.prompt,
                                         task_gsm8k.gold_continuation(p.extra["answer"]) + ANSWER_END)
        if len(ids) > max_len + 1 or n_answer == 0:
            dropped += 1
            if len(ids) > max_len + 1:
                too_long.append(len(ids))
            continue
        rows.append((ids, n_answer))
    if problems and not rows and too_long:  # else the loader's "no rows" would hide that the context is the cause
        raise UserError(f"every one of the {len(problems)} problems was dropped, {len(too_long)} of them because "
                        f"they do not fit the model's context: the shortest needs {min(too_long)} tokens, the context "
                        f"is {max_len} (+ 1) tokens (the base run's --max-seq-len): fine-tune a model trained with a "
                        f"longer context, or use shorter problems")
    return rows, dropped


def rows_digest(rows, seed: int) -> str:
    """A digest of the fine-tuning token rows and the order seed: two runs with the same digest see the same tokens
    in the same order (baseline_sft and mhc_sft must; tests/test_sft.py)."""
    h = hashlib.sha256(f"seed={seed}".encode())
    for ids, n_answer in rows:
        h.update(f"{n_answer}:".encode() + ",".join(map(str, ids)).encode() + b"\n")
    return h.hexdigest()[:16]


def collate(rows: list[tuple[list[int], int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs x [B, T] and targets y [B, T]: y is -1 (no loss) on the prompt and on padding."""
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (ids, n_answer) in enumerate(rows):
        t = torch.tensor(ids)
        x[b, :len(ids) - 1] = t[:-1]
        first = len(ids) - 1 - n_answer          # target position of the first answer token
        y[b, first:len(ids) - 1] = t[len(ids) - n_answer:]
    return x.to(device), y.to(device)


class SFTLoader:
    """Batches of `batch_size` rows per rank over a seeded per-epoch order; state = rows consumed globally."""

    def __init__(self, rows, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, device="cpu"):
        if not rows:
            raise UserError("no fine-tuning rows (every problem was dropped or none was given)")
        if batch_size * world_size > len(rows):
            raise UserError(f"--device-batch-size {batch_size} x {world_size} ranks exceeds the {len(rows)} rows")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.seed, self.device = seed, device
        self.consumed = 0
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self._orders[epoch]

    def rows_per_step(self) -> int:
        return self.batch_size * self.world_size

    def next_batch(self):
        n = len(self.rows)
        start = self.consumed + self.rank * self.batch_size
        picked = []
        for g in range(start, start + self.batch_size):
            epoch, i = divmod(g, n)
            picked.append(self.rows[self._order(epoch)[i]])
        self.consumed += self.rows_per_step()
        return collate(picked, self.device)

    def state_dict(self) -> dict:
        return dict(consumed=self.consumed, seed=self.seed, rows=len(self.rows))

    def load_state_dict(self, sd: dict):
        if sd.get("rows") != len(self.rows) or sd.get("seed") != self.seed:
            raise UserError(f"cannot resume the fine-tuning data: the checkpoint was at {sd.get('rows')} rows with "
                            f"seed {sd.get('seed')}, now {len(self.rows)} rows with seed {self.seed}")
        self.consumed = sd["consumed"]

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.rows)
