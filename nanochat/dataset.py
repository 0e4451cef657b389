"""Pretraining text: raw parquet shards (downloaded or built locally) and their pretokenized form.

Layout under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat):
    base_data/<source>/shard_XXXXX.parquet        raw text, one `text` column; the LAST shard is the val split
    tokenized/<source>-<tok fingerprint>/         pretokenized shards (see `pretokenize`)

Sources:
    fineweb  FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle on the HF hub): shards 0..N-1 for train plus shard 1822
             (the dataset's last shard) for val; it keeps its upstream name, so it sorts last.
    local    built from $NANOCHAT_DATA_DIR, TRAIN splits only (tinyshakespeare, GSM8K train, ARC-Easy/Challenge
             train), shuffled and split into train shards plus one val shard. Eval test/validation splits are never read.

Commands (each step skips work that is already done):
    python -m nanochat.dataset --source fineweb -n 8                 # download 8 train shards + the val shard
    NANOCHAT_DATA_DIR=/path/to/data python -m nanochat.dataset --source local   # build local shards
    python -m scripts.tok_train --source local                        # train the tokenizer (needs raw shards)
    python -m nanochat.dataset --source local --pretokenize           # then pretokenize with that tokenizer
"""
from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import Pool
from typing import Iterator

import numpy as np

from nanochat.common import UserError, get_base_dir, get_data_dir, print0, progress, run_main

SOURCES = ("fineweb", "local")

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
FINEWEB_MAX_SHARD = 1822  # index of the last shard upstream; nanochat uses it as the val shard
DOWNLOAD_TRIES = 5
DOWNLOAD_TIMEOUT_S = 30  # per connect/read, not for the whole ~100 MB file
DOWNLOAD_CHUNK = 1 << 20

# local source
LOCAL_TRAIN_FILES = ["tinyshakespeare/input.txt", "gsm8k/train.jsonl",
                     "arc/ARC-Easy-train.jsonl", "arc/ARC-Challenge-train.jsonl"]
SHAKESPEARE_TURNS_PER_DOC = 5  # speaker turns average ~150 bytes; 5 give ~250-token docs that fit the tiny seq 256
LOCAL_TRAIN_SHARDS = 4  # several train shards, so multi-shard code paths run in the tiny preset too
ROW_GROUP_DOCS = 256
MANIFEST = "manifest.json"


def source_dir(source: str) -> str:
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)} (got {source!r})")
    return os.path.join(get_base_dir(), "base_data", source)


def _prepare_command(source: str) -> str:
    if source == "local":
        return "NANOCHAT_DATA_DIR=<data dir> python -m nanochat.dataset --source local"
    return "python -m nanochat.dataset --source fineweb -n 8"


def list_parquet_files(source: str) -> list[str]:
    """Sorted raw shard paths of a source (the last one is the val split)."""
    d = source_dir(source)
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.startswith("shard_") and f.endswith(".parquet")]


def split_files(source: str, split: str) -> list[str]:
    """Raw shards of one split: train = all but the last shard, val = the last shard."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val' (got {split!r})")
    files = list_parquet_files(source)
    if len(files) < 2:
        raise UserError(f"source {source!r} needs at least 2 shards (train + val) in {source_dir(source)}, found "
                        f"{len(files)}; prepare it with `{_prepare_command(source)}`")
    return files[:-1] if split == "train" else files[-1:]


def iter_documents(source: str, split: str) -> Iterator[str]:
    """Yield the documents (strings) of a split, shard by shard, row group by row group."""
    import pyarrow.parquet as pq
    for path in split_files(source, split):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------------------------
# fineweb download

def _download_one(args: tuple[int, str]) -> str:
    """Download one shard to out_dir (temp file + rename, so a killed run never leaves a half file behind)."""
    import requests
    index, out_dir = args
    name = f"shard_{index:05d}.parquet"
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        return path
    url = FINEWEB_URL.format(index=index)
    last_err = None
    for attempt in range(DOWNLOAD_TRIES):
        try:
            with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT_S) as r:
                r.raise_for_status()
                with open(path + ".tmp", "wb") as f:
                    for chunk in r.iter_content(chunk_size=DOWNLOAD_CHUNK):
                        f.write(chunk)
            os.replace(path + ".tmp", path)
            print(f"downloaded {name}", flush=True)
            return path
        except (requests.RequestException, OSError) as e:
            last_err = e
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            if attempt + 1 < DOWNLOAD_TRIES:
                wait = 2 ** attempt  # 1, 2, 4, 8 s
                print(f"{name}: attempt {attempt + 1}/{DOWNLOAD_TRIES} failed ({e}); retrying in {wait}s", flush=True)
                time.sleep(wait)
    raise UserError(f"could not download {url} after {DOWNLOAD_TRIES} tries: {last_err}")


def download_fineweb(num_shards: int, num_workers: int) -> list[str]:
    """Download train shards 0..num_shards-1 plus the val shard (index 1822); skips shards already present."""
    import requests
    if num_shards < 1:
        raise UserError(f"-n/--num-shards must be >= 1 (got {num_shards})")
    if num_workers < 1:
        raise UserError(f"--num-workers must be >= 1 (got {num_workers})")
    num_shards = min(num_shards, FINEWEB_MAX_SHARD)  # shard 1822 is reserved for val
    out_dir = source_dir("fineweb")
    os.makedirs(out_dir, exist_ok=True)
    indices = list(range(num_shards)) + [FINEWEB_MAX_SHARD]
    todo = [i for i in indices if not os.path.exists(os.path.join(out_dir, f"shard_{i:05d}.parquet"))]
    print0(f"fineweb: {len(indices) - len(todo)}/{len(indices)} shards present in {out_dir}, downloading {len(todo)}")
    if not todo:
        return list_parquet_files("fineweb")
    # One quick probe first, so an offline machine gets a clear message at once instead of 5 backoff rounds per shard.
    probe = FINEWEB_URL.format(index=todo[0])
    try:
        requests.head(probe, timeout=DOWNLOAD_TIMEOUT_S, allow_redirects=True)
    except requests.ConnectionError as e:
        raise UserError(f"cannot reach {probe} ({type(e).__name__}); this machine looks offline. Use local data "
                        f"instead: NANOCHAT_DATA_DIR=<data dir> python -m nanochat.dataset --source local") from e
    with Pool(min(num_workers, len(todo))) as pool:
        for _ in progress(pool.imap_unordered(_download_one, [(i, out_dir) for i in todo]), total=len(todo),
                          desc="download FineWeb-Edu", unit="shard"):
            pass
    return list_parquet_files("fineweb")


# ---------------------------------------------------------------------------------------------------------------
# local source

def _local_docs(data_dir: str) -> tuple[list[str], dict[str, int]]:
    """All training documents from the local TRAIN files, in file order, and the doc count per file."""
    docs_by_file: dict[str, list[str]] = {}

    with open(os.path.join(data_dir, "tinyshakespeare/input.txt"), encoding="utf-8") as f:
        turns = [t.strip() for t in f.read().split("\n\n") if t.strip()]  # blank lines separate speaker turns
    docs_by_file["tinyshakespeare/input.txt"] = [
        "\n\n".join(turns[i:i + SHAKESPEARE_TURNS_PER_DOC]) for i in range(0, len(turns), SHAKESPEARE_TURNS_PER_DOC)]

    def read_jsonl(rel: str) -> list[dict]:
        path = os.path.join(data_dir, rel)
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from e
        return rows

    docs_by_file["gsm8k/train.jsonl"] = [r["question"] + "\n" + r["answer"] for r in read_jsonl("gsm8k/train.jsonl")]
    for rel in ("arc/ARC-Easy-train.jsonl", "arc/ARC-Challenge-train.jsonl"):
        docs = []
        for r in read_jsonl(rel):
            choices = "\n".join(f"{lab}. {txt}" for lab, txt in zip(r["choices"]["label"], r["choices"]["text"]))
            docs.append(f"{r['question']}\n{choices}\nAnswer: {r['answerKey']}")
        docs_by_file[rel] = docs

    all_docs = [d for rel in LOCAL_TRAIN_FILES for d in docs_by_file[rel]]
    return all_docs, {rel: len(docs_by_file[rel]) for rel in LOCAL_TRAIN_FILES}


def _write_parquet(path: str, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs}), path + ".tmp", row_group_size=ROW_GROUP_DOCS)
    os.replace(path + ".tmp", path)


def build_local(seed: int = 0, val_fraction: float = 0.05, force: bool = False) -> list[str]:
    """Build the local source's shards from $NANOCHAT_DATA_DIR (train splits only); skip if already built."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    out_dir = source_dir("local")
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest_path) and not force:
        with open(manifest_path) as f:
            m = json.load(f)
        if m.get("seed") != seed or m.get("val_fraction") != val_fraction:
            raise UserError(f"{out_dir} was built with seed={m.get('seed')} val_fraction={m.get('val_fraction')}; "
                            f"pass --force to rebuild with seed={seed} val_fraction={val_fraction}")
        print0(f"local source already built in {out_dir} (pass --force to rebuild)")
        return list_parquet_files("local")

    data_dir = get_data_dir()
    if data_dir is None:
        raise UserError("NANOCHAT_DATA_DIR is not set; point it at the local data folder holding "
                        + ", ".join(LOCAL_TRAIN_FILES))
    if not os.path.isdir(data_dir):
        raise UserError(f"NANOCHAT_DATA_DIR={data_dir} does not exist")
    missing = [rel for rel in LOCAL_TRAIN_FILES if not os.path.isfile(os.path.join(data_dir, rel))]
    if missing:
        raise UserError(f"NANOCHAT_DATA_DIR={data_dir} lacks {', '.join(missing)} (expected files: "
                        f"{', '.join(LOCAL_TRAIN_FILES)})")

    t0 = time.time()
    docs, counts = _local_docs(data_dir)
    perm = np.random.default_rng(seed).permutation(len(docs))
    docs = [docs[i] for i in perm]
    n_val = max(1, round(len(docs) * val_fraction))
    train_docs, val_docs = docs[:-n_val], docs[-n_val:]

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rebuild must not look complete
    for f in list_parquet_files("local"):
        os.remove(f)
    chunks = np.array_split(np.arange(len(train_docs)), LOCAL_TRAIN_SHARDS)
    for i, idx in enumerate(chunks):
        _write_parquet(os.path.join(out_dir, f"shard_{i:05d}.parquet"), [train_docs[j] for j in idx])
    _write_parquet(os.path.join(out_dir, f"shard_{LOCAL_TRAIN_SHARDS:05d}.parquet"), val_docs)  # last = val

    manifest = {"data_dir": os.path.abspath(data_dir), "source_files": counts, "seed": seed,
                "val_fraction": val_fraction, "num_train_docs": len(train_docs), "num_val_docs": len(val_docs),
                "train_shards": LOCAL_TRAIN_SHARDS, "val_shard": f"shard_{LOCAL_TRAIN_SHARDS:05d}.parquet"}
    with open(manifest_path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(manifest_path + ".tmp", manifest_path)  # written last: its presence means the build finished
    print0(f"local source: {len(train_docs)} train docs in {LOCAL_TRAIN_SHARDS} shards, {len(val_docs)} val docs, "
           f"{time.time() - t0:.1f}s -> {out_dir}")
    return list_parquet_files("local")


# ---------------------------------------------------------------------------------------------------------------
# pretokenization

def tokenized_dir(source: str, tokenizer) -> str:
    return os.path.join(get_base_dir(), "tokenized", f"{source}-{tokenizer.fingerprint}")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.uint32  # uint16 holds ids 0..65535


def _shard_complete(out_dir: str, name: str, itemsize: int) -> dict | None:
    """(num_docs, num_tokens) of a finished tokenized shard, or None if it is missing or inconsistent."""
    bin_path, idx_path = os.path.join(out_dir, name + ".bin"), os.path.join(out_dir, name + ".idx.npy")
    if not (os.path.isfile(bin_path) and os.path.isfile(idx_path)):
        return None
    try:
        idx = np.load(idx_path, allow_pickle=False)
    except (ValueError, OSError):
        return None
    if idx.ndim != 1 or len(idx) < 1 or idx[-1] * itemsize != os.path.getsize(bin_path):
        return None
    return {"num_docs": len(idx) - 1, "num_tokens": int(idx[-1])}


def pretokenize(source: str, tokenizer, num_workers: int = 4) -> str:
    """Tokenize every raw shard of a source into <tokenized_dir>/shard_XXXXX.{bin,idx.npy} plus meta.json.

    shard_XXXXX.bin      all documents' tokens back to back, each document prefixed with BOS (uint16, or uint32
                         for vocabularies above 65536)
    shard_XXXXX.idx.npy  int64 [num_docs + 1], start offset of each document in the .bin (last entry = num tokens)
    meta.json            dtype, vocab size, BOS id, per-shard doc/token counts and split (the last shard is val)

    Why pretokenize: with the documents' token counts known up front, the packing plan of the loader depends only
    on document lengths, so every rank computes the same global row order cheaply and only reads its own rows'
    tokens. Resuming from a checkpoint and DDP-vs-single-process equivalence are then exact.
    Writes are atomic and finished shards are skipped, so an interrupted run can simply be started again.
    """
    import pyarrow.parquet as pq
    if num_workers < 1:
        raise UserError(f"--num-workers must be >= 1 (got {num_workers})")
    files = list_parquet_files(source)
    if len(files) < 2:
        raise UserError(f"no raw shards to pretokenize in {source_dir(source)} (need train + val); prepare them with "
                        f"`{_prepare_command(source)}`")
    out_dir = tokenized_dir(source, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    itemsize = np.dtype(dtype).itemsize
    bos = tokenizer.bos_token_id
    meta_path = os.path.join(out_dir, "meta.json")
    previous = {}
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                previous = {s["name"]: s for s in json.load(f)["shards"]}
        except (ValueError, KeyError, TypeError):
            previous = {}  # unreadable meta: redo every shard
    meta = {"source": source, "tokenizer_fingerprint": tokenizer.fingerprint, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "bos_token_id": bos, "complete": False, "shards": [],
            "val_shard": None}

    def write_meta():
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)

    t0 = time.time()
    for i, path in enumerate(progress(files, desc=f"pretokenize {source}", unit="shard")):
        name = os.path.basename(path)[: -len(".parquet")]
        st = os.stat(path)
        raw = {"raw_size": st.st_size, "raw_mtime_ns": st.st_mtime_ns}  # a rebuilt raw shard must be redone
        info = _shard_complete(out_dir, name, itemsize)
        old = previous.get(name, {})
        if info is None or any(old.get(k) != v for k, v in raw.items()):
            bin_path, idx_path = os.path.join(out_dir, name + ".bin"), os.path.join(out_dir, name + ".idx.npy")
            offsets = [0]
            pf = pq.ParquetFile(path)
            with open(bin_path + ".tmp", "wb") as f:
                for rg in range(pf.num_row_groups):  # row group at a time keeps memory bounded on 100 MB shards
                    texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                    for ids in tokenizer.encode_batch(texts, prepend=bos, num_threads=num_workers):
                        np.asarray(ids, dtype=dtype).tofile(f)
                        offsets.append(offsets[-1] + len(ids))
            with open(idx_path + ".tmp", "wb") as f:
                np.save(f, np.asarray(offsets, dtype=np.int64))
            os.replace(bin_path + ".tmp", bin_path)
            os.replace(idx_path + ".tmp", idx_path)
            info = {"num_docs": len(offsets) - 1, "num_tokens": offsets[-1]}
            print0(f"pretokenized {name}: {info['num_docs']} docs, {info['num_tokens']} tokens "
                   f"({time.time() - t0:.1f}s so far)")
        split = "val" if i == len(files) - 1 else "train"
        meta["shards"].append({"name": name, "split": split, **info, **raw})
        write_meta()  # after every shard, so an interrupted run resumes where it stopped

    shards = meta["shards"]
    meta["val_shard"] = shards[-1]["name"]
    meta["complete"] = True
    write_meta()
    n_train = sum(s["num_tokens"] for s in shards if s["split"] == "train")
    print0(f"pretokenized {source}: train {n_train:,} tokens, val {shards[-1]['num_tokens']:,} tokens, "
           f"{time.time() - t0:.1f}s -> {out_dir}")
    return out_dir


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare pretraining shards (download FineWeb-Edu or build the local "
                                            "source) and optionally pretokenize them.")
    p.add_argument("--source", default="fineweb", choices=SOURCES + ("hub-small",),
                   help="fineweb: download from the HF hub; local: build from $NANOCHAT_DATA_DIR (train splits only); "
                        "hub-small: download the small evaluation and tiny-corpus sets into --out in the layout of "
                        "shared/data (for a fresh clone without it; nanochat/hub_data.py)")
    p.add_argument("--out", default="", help="hub-small: the folder to write (then use it as NANOCHAT_DATA_DIR)")
    p.add_argument("-n", "--num-shards", type=int, default=8,
                   help="fineweb: number of train shards to download (plus the val shard); 8 is a small smoke-sized "
                        "download, the speedrun passes its own (default 8)")
    p.add_argument("--num-workers", type=int, default=4,
                   help="parallel downloads (fineweb) / tokenizer threads (--pretokenize) (default 4)")
    p.add_argument("--seed", type=int, default=0, help="local: shuffle seed for documents (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="local: fraction of documents held out as the val shard (default 0.05)")
    p.add_argument("--force", action="store_true", help="local: rebuild the shards even if they exist")
    p.add_argument("--pretokenize", action="store_true",
                   help="after preparing the raw shards, pretokenize them with the tokenizer from "
                        "`python -m scripts.tok_train`")
    args = p.parse_args(argv)

    if args.source == "hub-small":
        from nanochat.hub_data import is_complete, write_hub_small
        if not args.out:
            raise UserError("--source hub-small needs --out FOLDER (the future NANOCHAT_DATA_DIR)")
        if is_complete(args.out) and not args.force:
            print0(f"{args.out} already holds the small sets (pass --force to fetch them again)")
        else:
            manifest = write_hub_small(args.out)
            print0(f"wrote {len(manifest)} files to {args.out}")
        if args.pretokenize:
            raise UserError("--source hub-small writes evaluation data, not pretraining shards: build them with "
                            "NANOCHAT_DATA_DIR=<--out> python -m nanochat.dataset --source local --pretokenize")
        return
    if args.source == "fineweb":
        download_fineweb(args.num_shards, args.num_workers)
    else:
        build_local(seed=args.seed, val_fraction=args.val_fraction, force=args.force)
    if args.pretokenize:
        from nanochat.tokenizer import get_tokenizer
        pretokenize(args.source, get_tokenizer(), num_workers=args.num_workers)


if __name__ == "__main__":
    run_main(main)
