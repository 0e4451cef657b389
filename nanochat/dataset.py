"""Pretraining text: raw parquet shards (downloaded or built locally) and their pretokenized form.

Layout under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat):
    base_data/<source>/shard_XXXXX.parquet        raw text, one `text` column
    base_data/local/manifest.json                 the local build's record: names its train shards and val shard
    tokenized/<source>-<tok fingerprint>/         pretokenized shards (see `pretokenize`)

Sources:
    fineweb  FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle on the HF hub): shards 0..N-1 for train plus shard 1822
             (the dataset's last shard) for val, identified by that name.
    local    built from $NANOCHAT_DATA_DIR, TRAIN splits only (tinyshakespeare, GSM8K train, ARC-Easy/Challenge
             train), shuffled and split into train shards plus one val shard. Eval test/validation splits are never read.
             The val shard is the one its manifest.json names.
The val split is always identified by name, never as "the last file": a stray shard_*.parquet in the folder is
ignored with a warning instead of silently becoming the validation data.
Bad input (a missing or null field, a non-object JSON line, non-UTF-8 or binary text, an unreadable parquet file) is
a UserError naming the file and the line or row.

Commands (each step skips work that is already done):
    python -m nanochat.dataset --source fineweb -n 8                 # download 8 train shards + the val shard
    NANOCHAT_DATA_DIR=/path/to/data python -m nanochat.dataset --source local   # build local shards
    python -m scripts.tok_train --source local                        # train the tokenizer (needs raw shards)
    python -m nanochat.dataset --source local --pretokenize           # then pretokenize with that tokenizer
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
import warnings
from multiprocessing import Pool
from typing import Iterator

import numpy as np

from nanochat.common import UserError, get_base_dir, get_data_dir, print0, progress, run_main
from nanochat.locks import FileLock, remove_stale_tmp, remove_stale_tmp_if_free

SOURCES = ("fineweb", "local")

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{index:05d}.parquet"
FINEWEB_MAX_SHARD = 1822  # index of the last shard upstream; nanochat uses it as the val shard
FINEWEB_VAL_SHARD = f"shard_{FINEWEB_MAX_SHARD:05d}.parquet"
SHARD_NAME = re.compile(r"shard_(\d{5})\.parquet")
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
LOCK_WAIT_S = 7200.0  # how long a second writer of raw shards, a tokenizer or pretokenized data waits for the first


def source_dir(source: str) -> str:
    if source not in SOURCES:
        raise UserError(f"--source must be one of {', '.join(SOURCES)} (got {source!r})")
    return os.path.join(get_base_dir(), "base_data", source)


def _prepare_command(source: str) -> str:
    if source == "local":
        return "NANOCHAT_DATA_DIR=<data dir> python -m nanochat.dataset --source local"
    return "python -m nanochat.dataset --source fineweb -n 8"


def list_parquet_files(source: str) -> list[str]:
    """Sorted paths of every shard_*.parquet in a source's folder (split_files says which are train and val)."""
    d = source_dir(source)
    if not os.path.isdir(d):
        return []
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.startswith("shard_") and f.endswith(".parquet")]


def _read_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            m = json.load(f)
        if not isinstance(m, dict):
            raise ValueError(f"a JSON {type(m).__name__}, not an object")
        return m
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is corrupted ({e}); rebuild with `{_prepare_command('local')} --force`") from e


def _split_names(source: str) -> tuple[list[str], str]:
    """(train shard names, val shard name) as the writer recorded them: fineweb by its fixed upstream val name,
    local by its manifest."""
    d = source_dir(source)
    if source == "fineweb":
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
        train = [n for n in names if SHARD_NAME.fullmatch(n) and int(n[6:11]) < FINEWEB_MAX_SHARD]
        return train, FINEWEB_VAL_SHARD
    manifest_path = os.path.join(d, MANIFEST)
    if not os.path.isfile(manifest_path):
        return [], ""  # not built (or the build was interrupted: the manifest is written last)
    m = _read_manifest(manifest_path)
    try:
        train = m.get("train_files") or [f"shard_{i:05d}.parquet" for i in range(int(m["train_shards"]))]
        val = m["val_shard"]
        if not (isinstance(val, str) and all(isinstance(n, str) for n in train)):
            raise TypeError("shard names must be strings")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{manifest_path} does not name the train and val shards ({type(e).__name__}: {e}); "
                        f"rebuild with `{_prepare_command('local')} --force`") from e
    return list(train), val


def split_files(source: str, split: str) -> list[str]:
    """Raw shards of one split. The val shard is identified by name (see _split_names); shard files that are
    neither train nor val are ignored with a warning."""
    if split not in ("train", "val"):
        raise UserError(f"split must be 'train' or 'val' (got {split!r})")
    d = source_dir(source)
    train, val = _split_names(source)
    present = {os.path.basename(f) for f in list_parquet_files(source)}
    if not train or val not in present:
        raise UserError(f"source {source!r} needs train shards and its val shard {val or '(unknown)'} in {d}, "
                        f"found {len(present)} shard files; prepare it with `{_prepare_command(source)}`")
    missing = [n for n in train if n not in present]
    if missing:
        raise UserError(f"{d} lacks the train shard(s) {', '.join(missing)}; prepare the source again with "
                        f"`{_prepare_command(source)}{' --force' if source == 'local' else ''}`")
    unexpected = sorted(present - set(train) - {val})
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} unexpected shard file(s) in {d}: {', '.join(unexpected[:5])}"
                      f"{' ...' if len(unexpected) > 5 else ''} (neither a train shard nor the val shard {val})",
                      stacklevel=2)
    return [os.path.join(d, n) for n in (train if split == "train" else [val])]


def _open_parquet(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        redo = (f"rebuild with `{_prepare_command('local')} --force`" if os.path.basename(os.path.dirname(path))
                == "local" else "delete it and download it again (`python -m nanochat.dataset --source fineweb`)")
        raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}); {redo}") from e
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
    return pf


def iter_shard_texts(path: str) -> Iterator[list[str]]:
    """The `text` column of one raw shard, a row group at a time (bounded memory on 100 MB shards), checked to be
    strings: a null, a number or undecodable bytes is a UserError naming the file and row."""
    import pyarrow as pa
    pf = _open_parquet(path)
    row0 = 0
    for rg in range(pf.num_row_groups):
        try:
            col = pf.read_row_group(rg, columns=["text"]).column("text")
        except (pa.ArrowException, OSError, ValueError) as e:
            raise UserError(f"{path}: row group {rg} (rows from {row0}) cannot be read ({type(e).__name__}: {e})") \
                from e
        try:
            texts = col.to_pylist()
        except UnicodeDecodeError:  # a string column holding invalid UTF-8: find the row
            for i, b in enumerate(col.cast(pa.binary()).to_pylist()):
                if b is not None:
                    _decode_utf8(b, path, f" row {row0 + i}", nul_ok=True)
            raise UserError(f"{path}: row group {rg} (rows from {row0}) is not UTF-8 text") from None
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                what = "null" if t is None else f"a {type(t).__name__}"
                raise UserError(f"{path}: row {row0 + i}: `text` is {what}, expected a string")
        yield texts
        row0 += len(texts)


def iter_documents(source: str, split: str) -> Iterator[str]:
    """Yield the documents (strings) of a split, shard by shard, row group by row group."""
    for path in split_files(source, split):
        for texts in iter_shard_texts(path):
            yield from texts


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


def download_fineweb(num_shards: int, num_workers: int, lock_wait_s: float = LOCK_WAIT_S) -> list[str]:
    """Download train shards 0..num_shards-1 plus the val shard (index 1822); skips shards already present. One
    downloader per folder: the lock <raw dir>/.lock (raw_shards_lock) while shards are missing."""
    if num_shards < 1:
        raise UserError(f"-n/--num-shards must be >= 1 (got {num_shards})")
    if num_workers < 1:
        raise UserError(f"--num-workers must be >= 1 (got {num_workers})")
    num_shards = min(num_shards, FINEWEB_MAX_SHARD)  # shard 1822 is reserved for val
    out_dir = source_dir("fineweb")
    os.makedirs(out_dir, exist_ok=True)
    indices = list(range(num_shards)) + [FINEWEB_MAX_SHARD]

    def missing():
        return [i for i in indices if not os.path.exists(os.path.join(out_dir, f"shard_{i:05d}.parquet"))]
    with raw_shards_lock(out_dir, lock_wait_s) if missing() else contextlib.nullcontext():
        todo = missing()  # the downloader we waited for may have fetched them
        print0(f"fineweb: {len(indices) - len(todo)}/{len(indices)} shards present in {out_dir}, downloading "
               f"{len(todo)}")
        if todo:
            _download(todo, out_dir, num_workers)
    return list_parquet_files("fineweb")


def _download(todo: list[int], out_dir: str, num_workers: int):
    import requests
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


# ---------------------------------------------------------------------------------------------------------------
# local source

def _decode_utf8(data: bytes, path: str, line: int | str | None = None, nul_ok: bool = False) -> str:
    """UTF-8 text without NUL characters (a NUL means a binary file); errors name the file and the line (counted
    here when not given)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line if line is not None else data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{at} is not UTF-8 text (byte {data[e.start]:#04x}); is it a binary file?") from None
    nul = -1 if nul_ok else text.find("\x00")
    if nul >= 0:
        at = line if line is not None else text[:nul].count("\n") + 1
        raise UserError(f"{path}:{at} contains a NUL character: a binary file, not text")
    return text


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; anything but a JSON object is a UserError naming the line."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_utf8(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, path, lineno)  # BOM
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e})") from e
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got a {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _field(row: dict, key: str, where: str, kind: type = str):
    """row[key], which must be a `kind`; else a UserError naming file:line and the key."""
    if key not in row:
        raise UserError(f"{where}: missing key {key!r} (keys: {', '.join(map(repr, row))})")
    v = row[key]
    if not isinstance(v, kind):
        raise UserError(f"{where}: {key!r} is {'null' if v is None else 'a ' + type(v).__name__}, "
                        f"expected a {kind.__name__}")
    return v


def _arc_doc(row: dict, where: str) -> str:
    choices = _field(row, "choices", where, dict)
    labels, texts = (_field(choices, key, f"{where} choices", list) for key in ("label", "text"))
    if len(labels) != len(texts) or not all(isinstance(x, str) for x in labels + texts):
        raise UserError(f"{where}: choices need as many string labels as string texts "
                        f"(got {len(labels)} labels, {len(texts)} texts)")
    body = "\n".join(f"{lab}. {txt}" for lab, txt in zip(labels, texts))
    return f"{_field(row, 'question', where)}\n{body}\nAnswer: {_field(row, 'answerKey', where)}"


def _local_docs(data_dir: str) -> tuple[list[str], dict[str, int]]:
    """All training documents from the local TRAIN files, in file order, and the doc count per file."""
    docs_by_file: dict[str, list[str]] = {}

    path = os.path.join(data_dir, "tinyshakespeare/input.txt")
    with open(path, "rb") as f:
        text = _decode_utf8(f.read(), path)
    turns = [t.strip() for t in text.split("\n\n") if t.strip()]  # blank lines separate speaker turns
    docs_by_file["tinyshakespeare/input.txt"] = [
        "\n\n".join(turns[i:i + SHAKESPEARE_TURNS_PER_DOC]) for i in range(0, len(turns), SHAKESPEARE_TURNS_PER_DOC)]

    path = os.path.join(data_dir, "gsm8k/train.jsonl")
    docs_by_file["gsm8k/train.jsonl"] = [
        _field(r, "question", f"{path}:{n}") + "\n" + _field(r, "answer", f"{path}:{n}") for n, r in _read_jsonl(path)]
    for rel in ("arc/ARC-Easy-train.jsonl", "arc/ARC-Challenge-train.jsonl"):
        path = os.path.join(data_dir, rel)
        docs_by_file[rel] = [_arc_doc(r, f"{path}:{n}") for n, r in _read_jsonl(path)]

    all_docs = [d for rel in LOCAL_TRAIN_FILES for d in docs_by_file[rel]]
    return all_docs, {rel: len(docs_by_file[rel]) for rel in LOCAL_TRAIN_FILES}


def _write_parquet(path: str, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": docs}), path + ".tmp", row_group_size=ROW_GROUP_DOCS)
    os.replace(path + ".tmp", path)


def build_local(seed: int = 0, val_fraction: float = 0.05, force: bool = False,
                lock_wait_s: float = LOCK_WAIT_S) -> list[str]:
    """Build the local source's shards from $NANOCHAT_DATA_DIR (train splits only); skip if already built. One
    builder per folder: the lock <raw dir>/.lock (raw_shards_lock) while it builds."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    out_dir = source_dir("local")
    manifest_path = os.path.join(out_dir, MANIFEST)

    def built() -> bool:
        if not os.path.isfile(manifest_path) or force:
            return False
        m = _read_manifest(manifest_path)
        if m.get("seed") != seed or m.get("val_fraction") != val_fraction:
            raise UserError(f"{out_dir} was built with seed={m.get('seed')} val_fraction={m.get('val_fraction')}; "
                            f"pass --force to rebuild with seed={seed} val_fraction={val_fraction}")
        print0(f"local source already built in {out_dir} (pass --force to rebuild)")
        return True
    if built():
        return list_parquet_files("local")
    with raw_shards_lock(out_dir, lock_wait_s):
        if built():  # the builder we waited for made them
            return list_parquet_files("local")
        return _build_local(seed, val_fraction, out_dir, manifest_path)


@contextlib.contextmanager
def raw_shards_lock(out_dir: str, wait_s: float):
    """One writer of a source's raw shards (nanochat.locks, as pretokenize): a second build or download waits for
    the first, up to wait_s seconds; the holder removes the .tmp files a killed writer left."""
    with FileLock(os.path.join(out_dir, ".lock"), f"raw shards {out_dir}", "wait for it to finish, or stop it",
                  wait_s=wait_s):
        remove_stale_tmp(out_dir, "shard build")
        yield


def _build_local(seed: int, val_fraction: float, out_dir: str, manifest_path: str) -> list[str]:
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
    val_name = f"shard_{LOCAL_TRAIN_SHARDS:05d}.parquet"
    _write_parquet(os.path.join(out_dir, val_name), val_docs)

    # the manifest names the splits: readers take val from it, never from the file order
    manifest = {"data_dir": os.path.abspath(data_dir), "source_files": counts, "seed": seed,
                "val_fraction": val_fraction, "num_train_docs": len(train_docs), "num_val_docs": len(val_docs),
                "train_shards": LOCAL_TRAIN_SHARDS, "val_shard": val_name,
                "train_files": [f"shard_{i:05d}.parquet" for i in range(LOCAL_TRAIN_SHARDS)]}
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




def _meta_matches(meta: dict, want: dict, out_dir: str, itemsize: int) -> bool:
    """Whether meta.json describes complete pretokenized data of these inputs: the same source, tokenizer
    (fingerprint, vocab size, BOS, dtype), the same raw shards in the same splits and order (name, size, mtime),
    and every tokenized shard on disk consistent with its counts."""
    try:
        if meta.get("complete") is not True or any(meta.get(k) != v for k, v in want["fields"].items()):
            return False
        shards = meta["shards"]
        if [(s["name"], s["split"], s["raw_size"], s["raw_mtime_ns"]) for s in shards] != want["shards"]:
            return False
        val = [s["name"] for s in shards if s["split"] == "val"]
        if meta.get("val_shard") not in val:
            return False
        return all(_shard_complete(out_dir, s["name"], itemsize) == {"num_docs": s["num_docs"],
                                                                     "num_tokens": s["num_tokens"]} for s in shards)
    except (KeyError, TypeError, AttributeError):
        return False


def _read_meta(meta_path: str) -> dict:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable meta: redo every shard


def pretokenize(source: str, tokenizer, num_workers: int = 4, lock_wait_s: float = LOCK_WAIT_S) -> str:
    """Tokenize every raw shard of a source into <tokenized_dir>/shard_XXXXX.{bin,idx.npy} plus meta.json.

    shard_XXXXX.bin      all documents' tokens back to back, each document prefixed with BOS (uint16, or uint32
                         for vocabularies above 65536)
    shard_XXXXX.idx.npy  int64 [num_docs + 1], start offset of each document in the .bin (last entry = num tokens)
    meta.json            dtype, vocab size, BOS id, per-shard doc/token counts and split (val: see split_files)

    Why pretokenize: with the documents' token counts known up front, the packing plan of the loader depends only
    on document lengths, so every rank computes the same global row order cheaply and only reads its own rows'
    tokens. Resuming from a checkpoint and DDP-vs-single-process equivalence are then exact.
    Writes are atomic and finished shards are skipped, so an interrupted run can simply be started again.
    One writer at a time: a lock on <tokenized_dir>/.lock (nanochat.locks); a second call waits for the first, up to
    lock_wait_s seconds (it wants the same data). Data that are complete and match their inputs (see _meta_matches)
    are left alone: meta.json is not even rewritten, so a concurrent reader never sees complete false over complete
    data. The writer holding the lock removes the .tmp files a killed writer left.
    """
    if num_workers < 1:
        raise UserError(f"--num-workers must be >= 1 (got {num_workers})")
    files = [(f, "train") for f in split_files(source, "train")] + [(f, "val") for f in split_files(source, "val")]
    out_dir = tokenized_dir(source, tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    itemsize = np.dtype(dtype).itemsize
    bos = tokenizer.bos_token_id
    meta_path = os.path.join(out_dir, "meta.json")
    want = {"fields": {"source": source, "tokenizer_fingerprint": tokenizer.fingerprint,
                       "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size, "bos_token_id": bos},
            "shards": [(os.path.basename(p)[: -len(".parquet")], split, os.stat(p).st_size, os.stat(p).st_mtime_ns)
                       for p, split in files]}
    if _meta_matches(_read_meta(meta_path), want, out_dir, itemsize):
        print0(f"pretokenized {source}: already complete and current in {out_dir}")
        remove_stale_tmp_if_free(out_dir, "pretokenize")  # complete data take no lock: clean up only if it is free
        return out_dir
    with FileLock(os.path.join(out_dir, ".lock"), f"pretokenized data {out_dir}",
                  "wait for it to finish, or stop it", wait_s=lock_wait_s):
        previous = _read_meta(meta_path)
        if _meta_matches(previous, want, out_dir, itemsize):  # the writer we waited for made them
            print0(f"pretokenized {source}: already complete and current in {out_dir}")
            return out_dir
        remove_stale_tmp(out_dir, "pretokenize")
        return _pretokenize_locked(source, tokenizer, num_workers, files, out_dir, dtype, previous)


def _pretokenize_locked(source, tokenizer, num_workers, files, out_dir, dtype, previous_meta) -> str:
    itemsize = np.dtype(dtype).itemsize
    bos = tokenizer.bos_token_id
    meta_path = os.path.join(out_dir, "meta.json")
    shards = previous_meta.get("shards")
    previous = ({s["name"]: s for s in shards if isinstance(s, dict) and "name" in s}
                if isinstance(shards, list) else {})
    meta = {"source": source, "tokenizer_fingerprint": tokenizer.fingerprint, "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "bos_token_id": bos, "complete": False, "shards": [],
            "val_shard": None}

    def write_meta():
        with open(meta_path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(meta_path + ".tmp", meta_path)

    t0 = time.time()
    for path, split in progress(files, desc=f"pretokenize {source}", unit="shard"):
        name = os.path.basename(path)[: -len(".parquet")]
        st = os.stat(path)
        raw = {"raw_size": st.st_size, "raw_mtime_ns": st.st_mtime_ns}  # a rebuilt raw shard must be redone
        info = _shard_complete(out_dir, name, itemsize)
        old = previous.get(name, {})
        if info is None or any(old.get(k) != v for k, v in raw.items()):
            bin_path, idx_path = os.path.join(out_dir, name + ".bin"), os.path.join(out_dir, name + ".idx.npy")
            offsets = [0]
            with open(bin_path + ".tmp", "wb") as f:
                for texts in iter_shard_texts(path):
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
        meta["shards"].append({"name": name, "split": split, **info, **raw})
        write_meta()  # after every shard, so an interrupted run resumes where it stopped

    shards = meta["shards"]
    val = next(s for s in shards if s["split"] == "val")
    meta["val_shard"] = val["name"]
    meta["complete"] = True
    write_meta()
    n_train = sum(s["num_tokens"] for s in shards if s["split"] == "train")
    print0(f"pretokenized {source}: train {n_train:,} tokens, val {val['num_tokens']:,} tokens, "
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
    p.add_argument("--lock-wait", type=float, default=LOCK_WAIT_S, metavar="SECONDS",
                   help="while another job builds the same raw shards (the lock <raw dir>/.lock) or pretokenizes "
                        "the same data (<tokenized dir>/.lock), wait this long for it, then give up "
                        "(default %(default)g)")
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
        download_fineweb(args.num_shards, args.num_workers, lock_wait_s=args.lock_wait)
    else:
        build_local(seed=args.seed, val_fraction=args.val_fraction, force=args.force, lock_wait_s=args.lock_wait)
    if args.pretokenize:
        from nanochat.tokenizer import get_tokenizer
        pretokenize(args.source, get_tokenizer(), num_workers=args.num_workers, lock_wait_s=args.lock_wait)


if __name__ == "__main__":
    run_main(main)
