"""BPE tokenizer: trained with rustbpe, used through tiktoken (as in nanochat).

Files written by `Tokenizer.save(dir)` (no pickle anywhere, so loading a downloaded tokenizer runs no code):
- `tokenizer.json`: {"format", "pattern", "mergeable_ranks": [base64 token bytes, in rank order], "special_tokens": {str: id}}
- `token_bytes.npy`: int32 [vocab_size], the UTF-8 byte length of each token id (0 for special tokens). Bits-per-byte
  evaluation divides the summed loss by these byte counts, so the metric does not depend on the vocabulary.

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
        import rustbpe
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
        # tiktoken needs ranks 0..n-1; the specials are numbered right after them
        assert sorted(ranks.values()) == list(range(len(ranks))), "rustbpe returned non-contiguous ranks"
        special = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
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
        """Load from tokenizer.json (+ token_bytes.npy when present); never unpickles."""
        path = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer file {path} not found; train one with `python -m scripts.tok_train`")
        try:
            with open(path) as f:
                d = json.load(f)
            if d.get("format") != FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {FORMAT!r}")
            ranks = {base64.b64decode(s, validate=True): i for i, s in enumerate(d["mergeable_ranks"])}
            special = {str(k): int(v) for k, v in d["special_tokens"].items()}
            tok = cls(str(d["pattern"]), ranks, special)
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
            if tb.shape != (tok.vocab_size,):
                raise UserError(f"{npy} has shape {tb.shape}, expected ({tok.vocab_size},) to match {path}")
            tok._token_bytes = tb.astype(np.int32)
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
        if self._token_bytes is None:
            special_ids = set(self.special_tokens.values())
            self._token_bytes = np.array(
                [0 if i in special_ids else len(self.id_to_token_bytes(i)) for i in range(self.vocab_size)],
                dtype=np.int32)
        return self._token_bytes

    def token_bytes(self) -> torch.Tensor:
        """int64 [vocab_size]: UTF-8 byte length of each token, 0 for special tokens (for bits per byte)."""
        return torch.from_numpy(self._token_bytes_array().astype(np.int64))


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
