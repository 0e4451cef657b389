"""BOS-aligned best-fit packing loader over pretokenized shards (see nanochat.dataset.pretokenize).

The global row stream (identical for every world size):
- Documents of a split, in shard order, are cut into windows of `window_docs` consecutive documents.
- Each epoch visits the windows in an order drawn from RNG(seed, epoch) (train) or in file order (val).
- A window is packed into rows of seq_len + 1 tokens by best fit: start a row; repeatedly add the longest
  remaining document that fits; when none fits, crop the shortest remaining document to fill the row exactly
  and drop the cropped remainder (as nanochat does). The window's last, partial row is dropped. So every row
  starts with BOS and no token is padding. Train rows are then shuffled within the window with RNG(seed, epoch, window).
- Packing needs only document lengths (the idx arrays), so it is cheap; only a rank's own rows' tokens are read.

A step takes world_size * batch_size consecutive global rows; rank r gets rows [cursor + r*B, cursor + (r+1)*B).
A 2-rank run therefore sees exactly the global batch of a 1-rank run with 2 micro-batches, ranks never share a
row, and the position (epoch, rows consumed in that epoch) is world-size independent, so resume is exact.
"""
from __future__ import annotations

import bisect
import json
import os

import numpy as np
import torch

from nanochat.common import UserError


def pack_window(lengths: np.ndarray, capacity: int) -> list[list[tuple[int, int]]]:
    """Best-fit pack documents (given by their lengths) into rows of exactly `capacity` tokens.

    Returns rows as lists of (doc index into `lengths`, tokens taken from the doc's start). Every row begins at
    the start of a document; the final partial row is dropped.
    """
    # pool sorted by (length, index) so bisect finds "longest that fits" and ties resolve deterministically
    pool = sorted((int(n), i) for i, n in enumerate(lengths) if n > 0)
    rows = []
    while pool:
        row, space = [], capacity
        while space > 0 and pool:
            j = bisect.bisect_right(pool, (space, len(lengths))) - 1  # longest doc with length <= space
            if j >= 0:
                n, i = pool.pop(j)
                row.append((i, n))
                space -= n
            else:  # nothing fits: crop the shortest doc to fill the row, drop its remainder
                n, i = pool.pop(0)
                row.append((i, space))
                space = 0
        if space == 0:
            rows.append(row)
    return rows


class PackedLoader:
    """Yields (x, y) LongTensors [batch_size, seq_len] from the pretokenized shards in token_dir."""

    def __init__(self, token_dir: str, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device="cpu", seed: int = 0, window_docs: int = 1000,
                 shuffle_rows: bool | None = None):
        if split not in ("train", "val"):
            raise UserError(f"split must be 'train' or 'val' (got {split!r})")
        if batch_size <= 0:
            raise UserError(f"batch size must be > 0 (got {batch_size})")
        if seq_len <= 0:
            raise UserError(f"sequence length must be > 0 (got {seq_len})")
        if window_docs <= 0:
            raise UserError(f"window_docs must be > 0 (got {window_docs})")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise UserError(f"rank {rank} is not valid for world size {world_size}")
        meta_path = os.path.join(token_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"no pretokenized data in {token_dir} (missing meta.json); run "
                            f"`python -m nanochat.dataset --source <source> --pretokenize`")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            complete, source = meta.get("complete"), meta.get("source", "<source>")
        except (OSError, ValueError, AttributeError) as e:  # JSONDecodeError is a ValueError; a list has no .get
            raise UserError(f"{meta_path} is corrupted ({type(e).__name__}: {e}); delete {token_dir} and pretokenize "
                            f"again with `python -m nanochat.dataset --source <source> --pretokenize`") from e
        redo = f"delete {token_dir} and rerun `python -m nanochat.dataset --source {source} --pretokenize`"
        if not complete:
            raise UserError(f"pretokenization in {token_dir} did not finish; rerun "
                            f"`python -m nanochat.dataset --source {source} --pretokenize`")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.window_docs = rank, world_size, seed, window_docs
        self.device = torch.device(device)
        self.shuffle = split == "train"
        self.shuffle_rows = self.shuffle if shuffle_rows is None else shuffle_rows
        try:
            self.bos_token_id, self.vocab_size = int(meta["bos_token_id"]), int(meta["vocab_size"])
            dtype = np.dtype(meta["dtype"])
            if dtype.name not in ("uint16", "uint32"):
                raise ValueError(f"token dtype {dtype.name} is neither uint16 nor uint32")
            shards = [(str(s["name"]), int(s["num_tokens"])) for s in meta["shards"] if s["split"] == split]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{meta_path} is corrupted ({type(e).__name__}: {e}); {redo}") from e

        # memory-map the split's shards; global doc d lives in shard doc_shard[d] at offset doc_start[d]
        self._tokens, self._bin_paths, starts, shard_ids, lengths = [], [], [], [], []
        for name, num_tokens in shards:
            bin_path, idx_path = os.path.join(token_dir, name + ".bin"), os.path.join(token_dir, name + ".idx.npy")
            try:
                idx = np.load(idx_path, allow_pickle=False)
                bin_size = os.path.getsize(bin_path)
            except (OSError, ValueError) as e:
                raise UserError(f"pretokenized shard {name} in {token_dir} is missing or unreadable "
                                f"({type(e).__name__}: {e}); {redo}") from e
            # the .bin must hold exactly the tokens the index points at: a truncated or padded file would misalign
            # every document after the damage
            if (idx.ndim != 1 or len(idx) < 1 or idx.dtype.kind not in "iu" or idx[0] != 0
                    or (np.diff(idx) < 0).any() or idx[-1] != num_tokens or bin_size != num_tokens * dtype.itemsize):
                raise UserError(f"{bin_path} and {idx_path} do not agree with {meta_path} ({num_tokens} tokens of "
                                f"{dtype.name} expected, the .bin has {bin_size} bytes); {redo}")
            if num_tokens == 0:
                continue
            self._tokens.append(np.memmap(bin_path, dtype=dtype, mode="r"))
            self._bin_paths.append(bin_path)
            starts.append(idx[:-1])
            lengths.append(np.diff(idx))
            shard_ids.append(np.full(len(idx) - 1, len(self._tokens) - 1, dtype=np.int32))
        if not starts or sum(len(x) for x in starts) == 0:
            raise UserError(f"split {split!r} has no documents in {token_dir}")
        self.doc_start = np.concatenate(starts)
        self.doc_len = np.concatenate(lengths)
        self.doc_shard = np.concatenate(shard_ids)
        self.num_docs = len(self.doc_len)
        self.num_windows = (self.num_docs + window_docs - 1) // window_docs

        self._row_counts: dict[int, int] = {}  # window -> number of rows (epoch independent)
        self._plan_cache: tuple[int, list] | None = None  # (window, packed rows) of the last window packed
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None  # ((epoch, window), row permutation)
        self._seek(0, 0)

    # ---- packing plan -------------------------------------------------------------------------------------------

    def _window_rows(self, w: int) -> list[list[tuple[int, int]]]:
        """Packed rows of window w, as (global doc, tokens taken); cached for the last window used."""
        if self._plan_cache is None or self._plan_cache[0] != w:
            lo = w * self.window_docs
            rows = pack_window(self.doc_len[lo:lo + self.window_docs], self.seq_len + 1)
            rows = [[(lo + i, n) for i, n in row] for row in rows]
            self._row_counts[w] = len(rows)
            self._plan_cache = (w, rows)
        return self._plan_cache[1]

    def _row_count(self, w: int) -> int:
        if w not in self._row_counts:
            self._window_rows(w)
        return self._row_counts[w]

    def _window_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        # (seed, epoch) as one seed sequence: unlike seed + epoch, seed 0 epoch 1 != seed 1 epoch 0
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)

    def _row_order(self, epoch: int, w: int, n: int) -> np.ndarray:
        if not self.shuffle_rows:
            return np.arange(n)
        if self._order_cache is None or self._order_cache[0] != (epoch, w):
            self._order_cache = ((epoch, w), np.random.default_rng((self.seed, epoch, w)).permutation(n))
        return self._order_cache[1]

    @property
    def rows_per_epoch(self) -> int:
        """Global rows in one pass over the split (packs every window once; cached)."""
        return sum(self._row_count(w) for w in range(self.num_windows))

    # ---- position -----------------------------------------------------------------------------------------------

    def _seek(self, epoch: int, rows_consumed: int) -> None:
        """Position the cursor at row `rows_consumed` of `epoch` (walks window row counts from the epoch start)."""
        if rows_consumed < 0 or epoch < 0:
            raise UserError(f"invalid loader state: epoch={epoch}, rows_consumed={rows_consumed}")
        total = self.rows_per_epoch if rows_consumed > 0 else None
        if total == 0:
            raise UserError(f"split {self.split!r} is too small to fill a single row of {self.seq_len + 1} tokens")
        if total is not None and rows_consumed >= total:
            if rows_consumed > total:
                raise UserError(f"loader state rows_consumed={rows_consumed} exceeds the {total} rows of an epoch "
                                f"(was the data, seq_len or window_docs changed?)")
            epoch, rows_consumed = epoch + 1, 0
        self.epoch, self.rows_consumed = epoch, rows_consumed
        self._order = self._window_order(epoch)
        self._wpos, left = 0, rows_consumed  # _wpos: position in this epoch's window order
        while self._wpos < self.num_windows and left >= self._row_count(int(self._order[self._wpos])):
            left -= self._row_count(int(self._order[self._wpos]))
            self._wpos += 1
        self._row_in_window = left

    def state_dict(self) -> dict:
        """Global, world-size independent position: rows consumed within `epoch`."""
        return {"rows_consumed": self.rows_consumed, "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        try:
            epoch, rows = int(sd["epoch"]), int(sd["rows_consumed"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"loader state must have integer 'epoch' and 'rows_consumed' (got {sd!r})") from e
        self._seek(epoch, rows)

    def _next_row_plan(self) -> list[tuple[int, int]]:
        """The next global row's (doc, tokens) list; advances the cursor, wrapping into the next epoch."""
        empty_windows = 0
        while True:
            if self._wpos >= self.num_windows:  # epoch finished
                self.epoch, self.rows_consumed = self.epoch + 1, 0
                self._order = self._window_order(self.epoch)
                self._wpos, self._row_in_window = 0, 0
            w = int(self._order[self._wpos])
            n = self._row_count(w)
            if self._row_in_window < n:
                break
            self._wpos, self._row_in_window = self._wpos + 1, 0
            empty_windows += 1
            if empty_windows > self.num_windows:  # a whole epoch without a single row
                raise UserError(f"split {self.split!r} is too small to fill a single row of "
                                f"{self.seq_len + 1} tokens")
        row = self._window_rows(w)[int(self._row_order(self.epoch, w, n)[self._row_in_window])]
        self._row_in_window += 1
        self.rows_consumed += 1
        return row

    # ---- batches ------------------------------------------------------------------------------------------------

    def _gather(self, plan: list[tuple[int, int]], out: np.ndarray) -> None:
        pos = 0
        for d, n in plan:
            start = self.doc_start[d]
            out[pos:pos + n] = self._tokens[self.doc_shard[d]][start:start + n]
            # an id >= vocab would index past the embedding (IndexError on the CPU, a device assert on CUDA)
            if n and out[pos:pos + n].max() >= self.vocab_size:
                bad = int(np.argmax(out[pos:pos + n] >= self.vocab_size))
                raise UserError(f"{self._bin_paths[self.doc_shard[d]]}: token {start + bad} (in the document "
                                f"starting at token {start}) is id {out[pos + bad]}, but the vocab size is "
                                f"{self.vocab_size}: the pretokenized data is corrupted or from another tokenizer; "
                                f"delete {os.path.dirname(self._bin_paths[0])} and pretokenize again")
            pos += n

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [B, T] on device, y = x shifted left by one (next-token targets)."""
        B, T = self.batch_size, self.seq_len
        buf = np.empty((B, T + 1), dtype=np.int64)
        mine = range(self.rank * B, (self.rank + 1) * B)
        for i in range(self.world_size * B):  # every rank walks the whole global step, keeping only its rows
            plan = self._next_row_plan()
            if i in mine:
                self._gather(plan, buf[i - self.rank * B])
        rows = torch.from_numpy(buf)
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()
