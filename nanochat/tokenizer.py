"""BPE tokenizer: trained with rustbpe, used through tiktoken (as in nanochat).

Files written by `Tokenizer.save(dir)` (no pickle anywhere, so loading a downloaded tokenizer runs no code):
- `tokenizer.json`: {"format", "pattern", "mergeable_ranks": [base64 token bytes, in rank order], "special_tokens": {str: id}}
- `token_bytes.npy`: int32 [vocab_size], the UTF-8 byte length of each token id (0 for special tokens). Bits-per-byte
  evaluation divides the summed loss by these byte counts, so the metric does not depend on the vocabulary.
  It is a pure function of tokenizer.json: `load` recomputes it and refuses a file that differs, so the fingerprint
  (a hash of tokenizer.json) covers it too and a tampered copy can never rescale val bpb.
`load` also validates tokenizer.json (distinct tokens, all 256 byte tokens, special ids right after the ranks, a
sane vocab size), so a damaged file is a clear error instead of a Rust panic or a silently wrong vocabulary.

Plain text is always encoded with `encode_ordinary`: a special-token string typed inside user text stays plain text
and can never inject a control token. Special tokens are added only through `prepend=` or `encode_special`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Iterable, Iterator

import numpy as np
import torch

from nanochat.common import UserError, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it (BOS-aligned packing)
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]

# GPT-4 split pattern, except numbers split into groups of at most 2 digits (nanochat's choice: better for small vocabs).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")

TOKENIZER_JSON = "tokenizer.json"
TOKEN_BYTES_NPY = "token_bytes.npy"
FORMAT = "nanochat-tiktoken-v1"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte-level BPE needs all 256 bytes plus the specials
MAX_VOCAB_SIZE = 1 << 20  # 5x the largest tiktoken vocab (o200k); beyond it a file is damaged, not ambitious
DEFAULT_NUM_THREADS = 8  # tiktoken's own default for batch encoding


class Tokenizer:
    """A tiktoken Encoding plus the facts the rest of the repo needs (BOS id, per-token byte lengths, fingerprint)."""

    def __init__(self, pattern: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int]):
        import tiktoken
        self.pattern = pattern
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = special_tokens
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=special_tokens)
        self._token_bytes: np.ndarray | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE on an iterator of strings. vocab_size counts the special tokens too."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                            f"special tokens), got {vocab_size}")
        if vocab_size > MAX_VOCAB_SIZE:
            raise UserError(f"--vocab-size must be at most {MAX_VOCAB_SIZE}, got {vocab_size}")
        import rustbpe
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        # tiktoken needs ranks 0..n-1; the specials are numbered right after them
        assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe returned non-contiguous ranks"
        special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        got = len(ranks) + len(special)
        # rustbpe stops merging when no pair is left: too little (or empty) text gives a smaller vocab than asked,
        # and every model size and cache downstream would silently follow it
        if got < vocab_size:
            raise UserError(f"the training text yields a vocabulary of only {got} tokens ({len(ranks) - 256} merges), "
                            f"smaller than the {vocab_size} asked for: the input is empty or too small (check the "
                            f"raw shards), or ask for --vocab-size {got} or less")
        return cls(bpe.get_pattern(), ranks, special)

    def _to_json_dict(self) -> dict:
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "format": FORMAT,
            "pattern": self.pattern,
            "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in by_rank],
            "special_tokens": self.special_tokens,
        }

    def save(self, directory: str) -> None:
        """Write tokenizer.json and token_bytes.npy atomically (temp file + rename)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_JSON)
        with open(path + ".tmp", "w") as f:
            json.dump(self._to_json_dict(), f)
        os.replace(path + ".tmp", path)
        npy = os.path.join(directory, TOKEN_BYTES_NPY)
        with open(npy + ".tmp", "wb") as f:
            np.save(f, self._token_bytes_array())
        os.replace(npy + ".tmp", npy)

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        """Load from tokenizer.json (+ token_bytes.npy when present, verified); never unpickles."""
        path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path} not found; train one with `python -m scripts.tok_train`")
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            tokens, special = d["mergeable_ranks"], d["special_tokens"]
            if not isinstance(tokens, list) or not isinstance(special, dict):
                raise TypeError("mergeable_ranks must be a list and special_tokens an object")
            if not MIN_VOCAB_SIZE <= len(tokens) + len(special) <= MAX_VOCAB_SIZE:
                raise _Invalid(f"vocab size {len(tokens) + len(special)} is outside "
                               f"[{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]")
            tokens = [base64.b64decode(t, validate=True) for t in tokens]
            special = {str(k): v for k, v in special.items()}
            _validate_vocab(tokens, special)
            tok = cls(str(d["pattern"]), {t: i for i, t in enumerate(tokens)}, special)
        except _Invalid as e:
            raise UserError(f"tokenizer file {path} is invalid: {e}; retrain with `python -m scripts.tok_train`") \
                from None
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"tokenizer file {path} is corrupted ({type(e).__name__}: {e}); "
                            f"retrain with `python -m scripts.tok_train`") from e
        if "<|bos|>" not in special:
            raise UserError(f"tokenizer file {path} has no <|bos|> special token")
        npy = os.path.join(directory, TOKEN_BYTES_NPY)
        if os.path.isfile(npy):
            try:
                tb = np.load(npy, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise UserError(f"{npy} is corrupted ({e}); retrain with `python -m scripts.tok_train`") from e
            if tb.shape != (tok.vocab_size,) or tb.dtype.kind not in "iu":
                raise UserError(f"{npy} holds {tb.dtype} {tb.shape}, expected integers of shape ({tok.vocab_size},) "
                                f"to match {path}")
            expected = tok._token_bytes_array()
            bad = np.flatnonzero(tb != expected)
            if len(bad):  # val bpb divides by these counts: a wrong file silently rescales it
                i = int(bad[0])
                raise UserError(f"{npy} does not match {path}: {len(bad)} token ids differ (id {i}: {tb[i]} bytes in "
                                f"the file, {expected[i]} in the tokenizer); delete it to have it recomputed, or "
                                f"retrain with `python -m scripts.tok_train`")
        return tok

    # ---- properties ---------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the canonical tokenizer.json content; names caches that depend on the tokenizer."""
        blob = json.dumps(self._to_json_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]  # 48 bits: plenty to tell a handful of tokenizers apart

    # ---- encode / decode ----------------------------------------------------------------------------------------

    def _prepend_id(self, prepend: int | str | None) -> int | None:
        if prepend is None or isinstance(prepend, int):
            return prepend
        return self.encode_special(prepend)

    def encode(self, text: str, prepend: int | str | None = None) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        p = self._prepend_id(prepend)
        return ids if p is None else [p] + ids

    def encode_batch(self, texts: list[str], prepend: int | str | None = None,
                     num_threads: int = DEFAULT_NUM_THREADS) -> list[list[int]]:
        out = self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        p = self._prepend_id(prepend)
        if p is not None:
            for ids in out:
                ids.insert(0, p)
        return out

    def encode_special(self, s: str) -> int:
        if s not in self.special_tokens:
            raise UserError(f"unknown special token {s!r}; known: {list(self.special_tokens)}")
        return self.special_tokens[s]

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def id_to_token_bytes(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(token_id)

    def _token_bytes_array(self) -> np.ndarray:
        if self._token_bytes is None:  # special tokens stay 0 bytes
            tb = np.zeros(self.vocab_size, dtype=np.int32)
            for tok, rank in self.mergeable_ranks.items():
                tb[rank] = len(tok)
            self._token_bytes = tb
        return self._token_bytes

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
        return torch.from_numpy(self._token_bytes_array().astype(np.int64))


class _Invalid(Exception):
    """tokenizer.json parses but describes no usable vocabulary (the message says why)."""


def _validate_vocab(tokens: list[bytes], special: dict) -> None:
    """Raise _Invalid unless tokens (in rank order) and special ids form one dense id space 0..V-1 (what tiktoken
    needs: duplicates make it panic, and a gap or a huge id silently inflates vocab_size)."""
    first: dict[bytes, int] = {}
    for i, t in enumerate(tokens):
        if t in first:
            raise _Invalid(f"duplicate mergeable token {t!r} at ranks {first[t]} and {i}")
        first[t] = i
    missing = [b for b in range(256) if bytes([b]) not in first]
    if missing:  # byte-level BPE: without every single byte some text cannot be encoded at all
        raise _Invalid(f"{len(missing)} of the 256 single-byte tokens are missing (e.g. {bytes([missing[0]])!r})")
    n, owner = len(tokens), {}
    for name, i in special.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise _Invalid(f"special token {name!r} has id {i!r}, not an integer")
        if 0 <= i < n:
            raise _Invalid(f"special token {name!r} has id {i}, which is already the mergeable token {tokens[i]!r}")
        if i in owner:
            raise _Invalid(f"special tokens {owner[i]!r} and {name!r} share id {i}")
        owner[i] = name
    ids = sorted(owner)
    if ids and ids[-1] >= MAX_VOCAB_SIZE:
        raise _Invalid(f"special token {owner[ids[-1]]!r} has id {ids[-1]}, an absurd vocab size of {ids[-1] + 1} "
                       f"(at most {MAX_VOCAB_SIZE})")
    if ids != list(range(n, n + len(ids))):
        shown = ", ".join(map(str, ids[:12])) + (", ..." if len(ids) > 12 else "")
        raise _Invalid(f"special token ids must be {n}..{n + len(ids) - 1}, right after the {n} mergeable tokens "
                       f"(got {shown})")


def get_tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer() -> Tokenizer:
    d = get_tokenizer_dir()
    if not os.path.isfile(os.path.join(d, TOKENIZER_JSON)):
        raise UserError(f"no tokenizer in {d}; train one first with `python -m scripts.tok_train` "
                        f"(NANOCHAT_BASE_DIR={get_base_dir()})")
    return Tokenizer.load(d)


def iter_capped(texts: Iterable[str], doc_cap: int, max_chars: int) -> Iterator[str]:
    """Crop each text to doc_cap chars and stop after max_chars in total (tokenizer training budget)."""
    total = 0
    for t in texts:
        t = t[:doc_cap]
        yield t
        total += len(t)
        if total >= max_chars:
            return
