"""Train the BPE tokenizer on the train split of a pretraining source and save it.

    python -m scripts.tok_train                                   # FineWeb-Edu, vocab 32768
    python -m scripts.tok_train --source local --vocab-size 4096  # the local (offline) corpus

Needs the raw shards first (`python -m nanochat.dataset --source ...`). Reports the compression (bytes per token)
on held-out val documents.
"""
from __future__ import annotations

import argparse
import os
import time

from nanochat.common import UserError, print0, run_main
from nanochat.dataset import LOCK_WAIT_S, SOURCES, iter_documents
from nanochat.locks import FileLock, remove_stale_tmp
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir, iter_capped

EVAL_MAX_CHARS = 10_000_000  # enough val text for a stable bytes/token figure, small enough to encode in seconds


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe, used through tiktoken).")
    p.add_argument("--vocab-size", type=int, default=32768,
                   help="vocabulary size including the special tokens (default 32768 = 2^15)")
    p.add_argument("--max-chars", type=int, default=2_000_000_000,
                   help="stop reading training text after this many characters (default 2e9)")
    p.add_argument("--doc-cap", type=int, default=10_000,
                   help="crop each document to this many characters, so a few huge documents cannot dominate "
                        "(default 10000)")
    p.add_argument("--source", default="fineweb", choices=SOURCES, help="pretraining source (default fineweb)")
    p.add_argument("--out-dir", default=None,
                   help="where to save tokenizer.json and token_bytes.npy (default $NANOCHAT_BASE_DIR/tokenizer)")
    p.add_argument("--lock-wait", type=float, default=LOCK_WAIT_S, metavar="SECONDS",
                   help="while another job trains a tokenizer into the same --out-dir (the lock <out-dir>/.lock), "
                        "wait this long for it, then give up (default %(default)g)")
    args = p.parse_args(argv)
    if args.max_chars <= 0:
        raise UserError(f"--max-chars must be > 0 (got {args.max_chars})")
    if args.doc_cap <= 0:
        raise UserError(f"--doc-cap must be > 0 (got {args.doc_cap})")
    out_dir = args.out_dir or get_tokenizer_dir()
    # one writer of the tokenizer: a second job waits (it wants the same artefact) instead of saving under the first
    with FileLock(os.path.join(out_dir, ".lock"), f"the tokenizer in {out_dir}", "wait for it to finish, or stop it",
                  wait_s=args.lock_wait):
        remove_stale_tmp(out_dir, "tokenizer training")
        train_and_save(args, out_dir)


def train_and_save(args, out_dir: str):
    """Train on the source's train split, save into out_dir (the caller holds its lock), report val compression."""
    n_chars = 0

    def train_texts():
        nonlocal n_chars
        for t in iter_capped(iter_documents(args.source, "train"), args.doc_cap, args.max_chars):
            n_chars += len(t)
            yield t

    next(iter_documents(args.source, "train"), None)  # fail fast (UserError) if the shards are missing
    t0 = time.time()
    tok = Tokenizer.train(train_texts(), args.vocab_size)
    train_s = time.time() - t0
    tok.save(out_dir)
    print0(f"trained on {n_chars:,} chars in {train_s:.2f}s; vocab size {tok.vocab_size} "
           f"(fingerprint {tok.fingerprint}) -> {out_dir}")

    # compression on held-out text: UTF-8 bytes per token
    val_docs = list(iter_capped(iter_documents(args.source, "val"), args.doc_cap, EVAL_MAX_CHARS))
    t0 = time.time()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(val_docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
    print0(f"val compression: {n_bytes / max(n_tokens, 1):.3f} bytes/token ({n_bytes:,} bytes, {n_tokens:,} tokens, "
           f"{len(val_docs)} docs, encoded in {time.time() - t0:.2f}s)")


if __name__ == "__main__":
    run_main(main)
