"""Damaged inputs are UserErrors that name the file (and line or row), never a bare traceback or a silently wrong
number: tokenizer files (token_bytes.npy, tokenizer.json), the local corpus, raw parquet shards, pretokenized
shards, a stray shard in the raw folder, and tokenizer training text that cannot give the asked vocab size.

Every test works on its own small copy (a few hundred documents), never on the shared session fixtures."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from nanochat.common import UserError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300  # small enough to train in milliseconds, above MIN_VOCAB_SIZE (265)
# (file, how many leading lines to keep) of the small local corpus
SUBSET = {"tinyshakespeare/input.txt": 1500, "gsm8k/train.jsonl": 150, "arc/ARC-Easy-train.jsonl": 80,
          "arc/ARC-Challenge-train.jsonl": 80}


def _env(monkeypatch, base: Path, data: Path | None = None):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    if data is not None:
        monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data))


@pytest.fixture(scope="module")
def small(tmp_path_factory, shared_data_dir):
    """A small local corpus (data dir), its built raw shards, a vocab-300 tokenizer and its pretokenized shards."""
    from nanochat.dataset import build_local, iter_documents, pretokenize, tokenized_dir
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    for rel, n in SUBSET.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        with open(shared_data_dir / rel, "rb") as f:
            (data / rel).write_bytes(b"".join(line for _, line in zip(range(n), f)))
    with pytest.MonkeyPatch.context() as mp:
        _env(mp, root / "base", data)
        build_local(seed=0, val_fraction=0.1)
        tok = Tokenizer.train(iter_documents("local", "train"), VOCAB)
        tok.save(get_tokenizer_dir())
        pretokenize("local", tok, num_workers=1)
        token_dir = Path(tokenized_dir("local", tok))
    return dict(data=data, base=root / "base", tok=tok, token_rel=token_dir.relative_to(root / "base"))


@pytest.fixture
def base(small, tmp_path, monkeypatch) -> Path:
    """A private copy of the small base dir (raw shards, tokenizer, pretokenized shards), set as NANOCHAT_BASE_DIR."""
    dst = tmp_path / "base"
    shutil.copytree(small["base"], dst)
    _env(monkeypatch, dst, small["data"])
    return dst


# ---- tokenizer files ---------------------------------------------------------------------------------------------

def test_tampered_token_bytes_refused(base):
    from nanochat.tokenizer import Tokenizer
    tdir = base / "tokenizer"
    npy = tdir / "token_bytes.npy"
    good = np.load(npy)
    assert Tokenizer.load(tdir).token_bytes().tolist() == good.tolist()  # positive control
    np.save(npy, good * 2)  # doubled byte counts would halve val bpb
    with pytest.raises(UserError, match=r"token_bytes\.npy does not match .*tokenizer\.json"):
        Tokenizer.load(tdir)
    np.save(npy, good.astype(np.float64) + 0.5)
    with pytest.raises(UserError, match=r"token_bytes\.npy holds float64"):
        Tokenizer.load(tdir)
    npy.unlink()  # derived data: recomputed when absent
    assert Tokenizer.load(tdir).token_bytes().tolist() == good.tolist()


def _edit_tokenizer(tdir: Path, edit) -> None:
    path = tdir / "tokenizer.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("fault, match", [
    ("duplicate_rank", r"duplicate mergeable token .* at ranks 100 and 290"),
    ("special_is_byte_token", r"special token '<\|bos\|>' has id 65, which is already the mergeable token b'A'"),
    ("special_is_merge", r"special token '<\|user_end\|>' has id 280, which is already the mergeable token"),
    ("specials_share_id", r"special tokens '<\|bos\|>' and '<\|user_start\|>' share id"),
    ("absurd_special_id", r"special token .<\|bos\|>. has id 1000000000, an absurd vocab size of 1000000001"),
    ("special_gap", r"special token ids must be 291\.\.299"),
    ("absurd_rank_count", r"vocab size 1048876 is outside \[265, 1048576\]"),
    ("missing_byte", r"1 of the 256 single-byte tokens are missing \(e\.g\. b'A'\)"),
])
def test_invalid_tokenizer_refused(base, fault, match):
    from nanochat.tokenizer import Tokenizer
    tdir = base / "tokenizer"
    (tdir / "token_bytes.npy").unlink()

    def edit(d):
        ranks, special = d["mergeable_ranks"], d["special_tokens"]
        if fault == "duplicate_rank":
            ranks[290] = ranks[100]
        elif fault == "special_is_byte_token":
            special["<|bos|>"] = 65
        elif fault == "special_is_merge":
            special["<|user_end|>"] = 280
        elif fault == "specials_share_id":
            special["<|user_start|>"] = special["<|bos|>"]
        elif fault == "absurd_special_id":
            special["<|bos|>"] = 10 ** 9
        elif fault == "special_gap":
            special["<|bos|>"] += 100
        elif fault == "absurd_rank_count":
            ranks.extend(ranks[-1:] * (1 << 20))
        elif fault == "missing_byte":
            ranks[65] = base64.b64encode(b"\x00zz\x01").decode()  # a new token instead of b"A"

    Tokenizer.load(tdir)  # positive control
    _edit_tokenizer(tdir, edit)
    with pytest.raises(UserError, match=r"tokenizer\.json is invalid: " + match):
        Tokenizer.load(tdir)


# ---- local corpus (build_local) ----------------------------------------------------------------------------------

def _replace_line(path: Path, lineno: int, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = new
    path.write_bytes(b"\n".join(lines))


def _row(path: Path, lineno: int) -> dict:
    return json.loads(path.read_bytes().split(b"\n")[lineno - 1])


@pytest.mark.parametrize("rel, lineno, fault, match", [
    ("gsm8k/train.jsonl", 3, "missing_key", r"gsm8k/train\.jsonl:3: missing key 'answer'"),
    ("gsm8k/train.jsonl", 7, "null_field", r"gsm8k/train\.jsonl:7: 'question' is null, expected a str"),
    ("gsm8k/train.jsonl", 5, "non_utf8", r"gsm8k/train\.jsonl:5 is not UTF-8 text \(byte 0xff\)"),
    ("arc/ARC-Easy-train.jsonl", 2, "array_row", r"ARC-Easy-train\.jsonl:2: expected a JSON object, got a list"),
    ("arc/ARC-Challenge-train.jsonl", 4, "null_choices", r"ARC-Challenge-train\.jsonl:4: 'choices' is null"),
    ("arc/ARC-Challenge-train.jsonl", 6, "choice_number",
     r"ARC-Challenge-train\.jsonl:6: choices need as many string labels as string texts"),
    ("arc/ARC-Easy-train.jsonl", 9, "not_json", r"ARC-Easy-train\.jsonl:9 is not valid JSON"),
    ("tinyshakespeare/input.txt", 40, "non_utf8", r"input\.txt:40 is not UTF-8 text"),
    ("tinyshakespeare/input.txt", 12, "binary", r"input\.txt:12 contains a NUL character"),
])
def test_bad_local_corpus_names_file_and_line(small, tmp_path, monkeypatch, rel, lineno, fault, match):
    from nanochat.dataset import build_local
    data = tmp_path / "data"
    shutil.copytree(small["data"], data)
    _env(monkeypatch, tmp_path / "base", data)
    path = data / rel
    if fault in ("non_utf8", "binary"):
        line = path.read_bytes().split(b"\n")[lineno - 1]
        _replace_line(path, lineno, line[:10] + (b"\xff\xfe" if fault == "non_utf8" else b"\x00\x01\x02") + line[10:])
    elif fault == "array_row":
        _replace_line(path, lineno, b'["a question", "an answer"]')
    elif fault == "not_json":
        _replace_line(path, lineno, b'{"question": ')
    else:
        row = _row(path, lineno)
        if fault == "missing_key":
            del row["answer"]
        elif fault == "null_field":
            row["question"] = None
        elif fault == "null_choices":
            row["choices"] = None
        elif fault == "choice_number":
            row["choices"]["label"] = row["choices"]["label"][:-1]
        _replace_line(path, lineno, json.dumps(row).encode())
    with pytest.raises(UserError, match=match) as e:
        build_local(seed=0, val_fraction=0.1)
    assert str(data) in str(e.value)  # the full path, not just the base name
    assert not (tmp_path / "base" / "base_data" / "local" / "manifest.json").exists()


def test_utf8_bom_in_jsonl_is_fine(small, tmp_path, monkeypatch):
    from nanochat.dataset import build_local, iter_documents
    data = tmp_path / "data"
    shutil.copytree(small["data"], data)
    _env(monkeypatch, tmp_path / "base", data)
    path = data / "gsm8k" / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    build_local(seed=0, val_fraction=0.1)
    assert any(_row(path, 2)["question"] in d for d in iter_documents("local", "train"))


# ---- raw parquet shards (iter_documents, pretokenize, tok_train) -------------------------------------------------

def _write_shard(path: Path, column, name="text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({name: column}), path, row_group_size=2)


@pytest.mark.parametrize("fault, match", [
    ("junk", r"shard_00001\.parquet is not a readable parquet file"),
    ("null_text", r"shard_00001\.parquet: row 3: `text` is null, expected a string"),
    ("int_text", r"shard_00001\.parquet: row 0: `text` is a int, expected a string"),
    ("binary_text", r"shard_00001\.parquet: row 0: `text` is a bytes, expected a string"),
    ("non_utf8_text", r"shard_00001\.parquet: row 3 is not UTF-8 text \(byte 0xff\)"),
    ("no_text_column", r"shard_00001\.parquet has no `text` column \(columns: content\)"),
])
@pytest.mark.parametrize("reader", ["iter_documents", "pretokenize", "tok_train"])
def test_bad_raw_shard_names_file_and_row(base, small, fault, match, reader):
    import pyarrow as pa

    from nanochat.dataset import iter_documents, pretokenize
    raw = base / "base_data" / "local"
    shard = raw / "shard_00001.parquet"
    if fault == "junk":
        shard.write_bytes(b"PAR1 this is not parquet at all")
    elif fault == "null_text":
        _write_shard(shard, ["a", "b", "c", None, "e"])
    elif fault == "int_text":
        _write_shard(shard, [1, 2, 3])
    elif fault == "binary_text":
        _write_shard(shard, pa.array([b"ok", b"\xff\xfe binary", b"x"], type=pa.binary()))
    elif fault == "non_utf8_text":  # a string column holding invalid UTF-8 (pyarrow does not validate on write)
        _write_shard(shard, pa.array([b"a", b"b", b"c", b"bad \xff", b"e"], type=pa.binary()).view(pa.string()))
    else:
        _write_shard(shard, ["a", "b"], name="content")
    with pytest.raises(UserError, match=match) as e:
        if reader == "iter_documents":
            list(iter_documents("local", "train"))
        elif reader == "pretokenize":
            pretokenize("local", small["tok"], num_workers=1)
        else:
            from scripts import tok_train
            tok_train.main(["--source", "local", "--vocab-size", str(VOCAB)])
    assert str(shard) in str(e.value)


# ---- pretokenized shards (PackedLoader) --------------------------------------------------------------------------

def _loader(base, small, split="val"):
    from nanochat.dataloader import PackedLoader
    return PackedLoader(str(base / small["token_rel"]), split, batch_size=2, seq_len=32)


def test_garbage_token_ids_name_the_bin(base, small):
    tdir = base / small["token_rel"]
    loader = _loader(base, small)
    for _ in range(3):
        x, _ = loader.next_batch()  # positive control
        assert int(x.max()) < small["tok"].vocab_size
    meta = json.loads((tdir / "meta.json").read_text())
    val = tdir / (meta["val_shard"] + ".bin")
    tokens = np.fromfile(val, dtype=np.uint16)
    tokens[1::7] = 60000  # ids far beyond the vocab (300): the embedding would raise IndexError
    tokens.tofile(val)
    with pytest.raises(UserError, match=rf"{meta['val_shard']}\.bin: token \d+ .* is id 60000, but the vocab size "
                                        rf"is {small['tok'].vocab_size}"):
        _loader(base, small).next_batch()


@pytest.mark.parametrize("fault, match", [
    ("truncated_bin", r"shard_00000\.bin and .*shard_00000\.idx\.npy do not agree with .*meta\.json"),
    ("missing_idx", r"pretokenized shard shard_00000 .* is missing or unreadable"),
    ("junk_meta", r"meta\.json is corrupted \(JSONDecodeError"),
    ("meta_no_shards", r"meta\.json is corrupted \(KeyError: 'shards'\)"),
])
def test_damaged_pretokenized_shards(base, small, fault, match):
    tdir = base / small["token_rel"]
    meta_path = tdir / "meta.json"
    if fault == "truncated_bin":
        data = (tdir / "shard_00000.bin").read_bytes()
        (tdir / "shard_00000.bin").write_bytes(data[: len(data) // 2])
    elif fault == "missing_idx":
        (tdir / "shard_00000.idx.npy").unlink()
    elif fault == "junk_meta":
        meta_path.write_text('{"complete": tr')
    else:
        meta = json.loads(meta_path.read_text())
        del meta["shards"]
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=match):
        _loader(base, small, "train")


# ---- which shard is val --------------------------------------------------------------------------------------------

def test_extra_local_shard_is_not_val(base, small):
    from nanochat.dataset import iter_documents, pretokenize, split_files
    val_before = list(iter_documents("local", "val"))
    train_before = list(iter_documents("local", "train"))
    stray = base / "base_data" / "local" / "shard_00099.parquet"
    _write_shard(stray, ["A STRAY DOCUMENT"])
    with pytest.warns(UserWarning, match=r"ignoring 1 unexpected shard file\(s\) in .*: shard_00099\.parquet"):
        assert list(iter_documents("local", "val")) == val_before
    with pytest.warns(UserWarning, match="shard_00099"):
        assert list(iter_documents("local", "train")) == train_before
    with pytest.warns(UserWarning, match="shard_00099"):
        out = Path(pretokenize("local", small["tok"], num_workers=1))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val_shard"] == "shard_00004" and "shard_00099" not in [s["name"] for s in meta["shards"]]
    # an older manifest without train_files (the number of train shards only) still resolves the same way
    manifest_path = base / "base_data" / "local" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["train_files"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="shard_00099"):
        assert [Path(p).name for p in split_files("local", "val")] == ["shard_00004.parquet"]
    # no manifest: an unfinished build, never "the last file is val"
    manifest_path.unlink()
    with pytest.raises(UserError, match="nanochat.dataset --source local"):
        split_files("local", "val")


def test_fineweb_val_is_the_named_shard(tmp_path, monkeypatch):
    from nanochat.dataset import iter_documents
    _env(monkeypatch, tmp_path)
    raw = tmp_path / "base_data" / "fineweb"
    raw.mkdir(parents=True)
    _write_shard(raw / "shard_00000.parquet", ["train 0"])
    _write_shard(raw / "shard_00001.parquet", ["train 1"])
    _write_shard(raw / "shard_01822.parquet", ["the val doc"])
    assert list(iter_documents("fineweb", "val")) == ["the val doc"]
    _write_shard(raw / "shard_01900.parquet", ["sorts last, but is not val"])
    with pytest.warns(UserWarning, match="shard_01900"):
        assert list(iter_documents("fineweb", "val")) == ["the val doc"]
    with pytest.warns(UserWarning, match="shard_01900"):
        assert list(iter_documents("fineweb", "train")) == ["train 0", "train 1"]
    (raw / "shard_01822.parquet").unlink()
    with pytest.raises(UserError, match=r"val shard shard_01822\.parquet"):
        list(iter_documents("fineweb", "train"))


# ---- tokenizer training input ------------------------------------------------------------------------------------

def test_empty_training_text_refused(tmp_path, monkeypatch):
    from nanochat.tokenizer import Tokenizer
    from scripts import tok_train
    _env(monkeypatch, tmp_path)
    raw = tmp_path / "base_data" / "local"
    raw.mkdir(parents=True)
    _write_shard(raw / "shard_00000.parquet", [""] * 20)
    _write_shard(raw / "shard_00001.parquet", ["val"])
    (raw / "manifest.json").write_text(json.dumps({"train_files": ["shard_00000.parquet"],
                                                   "val_shard": "shard_00001.parquet"}))
    with pytest.raises(UserError, match=r"vocabulary of only 265 tokens .* smaller than the 512 asked for"):
        tok_train.main(["--source", "local", "--vocab-size", "512"])
    assert not (tmp_path / "tokenizer" / "tokenizer.json").exists()
    # too little text for the asked size is the same error; enough for a smaller one is fine
    text = ["hello hello hello world"] * 50
    with pytest.raises(UserError, match=r"only 275 tokens .* than the 300 asked for"):
        Tokenizer.train(iter(text), 300)
    assert Tokenizer.train(iter(text), 275).vocab_size == 275


# ---- one writer per shared artefact (issue 21 item 2) -------------------------------------------------------------

def _hold(path: Path, seconds: float = 120) -> subprocess.Popen:
    """Another process holding the lock file `path` (nanochat.locks) for `seconds`; returns once it holds it."""
    code = ("import sys, time; from nanochat.locks import lock_file; lock_file(sys.argv[1], 'x', 'y'); "
            "print('locked', flush=True); time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(seconds)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_pretokenize_on_complete_data_writes_nothing(base, small):
    from nanochat.dataset import pretokenize
    tdir = base / small["token_rel"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tdir.iterdir()}
    assert pretokenize("local", small["tok"], num_workers=1) == str(tdir)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tdir.iterdir()} == before  # meta.json too
    # inputs that no longer match (a raw shard rebuilt) are redone, and the result is complete again
    raw = base / "base_data" / "local" / "shard_00001.parquet"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 1000))
    pretokenize("local", small["tok"], num_workers=1)
    meta = json.loads((tdir / "meta.json").read_text())
    assert meta["complete"] is True and (tdir / "meta.json").stat().st_ino != before["meta.json"][0]
    assert (tdir / "shard_00001.bin").stat().st_mtime_ns != before["shard_00001.bin"][1]  # redone
    assert (tdir / "shard_00000.bin").stat().st_mtime_ns == before["shard_00000.bin"][1]  # kept


def _poll_meta(meta_path: Path, stop: threading.Event, seen: list):
    """Read meta.json's `complete` until stop is set, then once more (the writers have finished by then)."""
    while True:
        done = stop.is_set()
        try:
            seen.append(json.loads(meta_path.read_text()).get("complete"))
        except (OSError, ValueError):
            seen.append("unreadable")
        if done:
            return


@pytest.mark.parametrize("from_scratch", [False, True])
def test_concurrent_pretokenize_never_shows_complete_data_as_incomplete(base, small, from_scratch):
    """Two writers at once, a reader polling meta.json: once the data are complete, no read sees complete false
    (today's data: each call a no-op; from scratch: one writer works, the other waits and then finds them done)."""
    from nanochat.dataset import pretokenize
    tdir = base / small["token_rel"]
    if from_scratch:
        shutil.rmtree(tdir)
    errors, seen, stop = [], [], threading.Event()

    def writer():
        try:
            for _ in range(1 if from_scratch else 15):
                pretokenize("local", small["tok"], num_workers=1)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    reader = threading.Thread(target=_poll_meta, args=(tdir / "meta.json", stop, seen))
    reader.start()
    writers = [threading.Thread(target=writer) for _ in range(2)]
    for t in writers:
        t.start()
    for t in writers:
        t.join(timeout=60)
    stop.set()
    reader.join()
    assert not errors, errors
    first_complete = seen.index(True)
    assert len(seen) > 50 and set(seen[first_complete:]) == {True}, sorted(set(map(str, seen[first_complete:])))
    if not from_scratch:
        assert first_complete == 0
    assert json.loads((tdir / "meta.json").read_text())["complete"] is True
    assert not list(tdir.glob("*.tmp"))
    _loader(base, small, "train").next_batch()


def test_pretokenize_waits_for_the_writer_and_cleans_its_leftovers(base, small, capsys):
    from nanochat.dataset import pretokenize
    tdir = base / small["token_rel"]
    meta = json.loads((tdir / "meta.json").read_text())
    (tdir / "meta.json").write_text(json.dumps({**meta, "complete": False}))  # a writer killed mid-run ...
    (tdir / "shard_00002.bin.tmp").write_bytes(b"partial")  # ... left its partial files
    (tdir / "shard_00003.idx.npy.tmp").write_bytes(b"partial")
    proc = _hold(tdir / ".lock")  # and another writer holds the data now
    try:
        with pytest.raises(UserError, match=rf"pretokenized data {re.escape(str(tdir))} is in use by another run \(PID "
                                            rf"{proc.pid}, lock {re.escape(str(tdir / '.lock'))}\) after waiting 0.5 s"):
            pretokenize("local", small["tok"], num_workers=1, lock_wait_s=0.5)
        assert "waiting for it, up to 0.5 s" in capsys.readouterr().err
        assert (tdir / "shard_00002.bin.tmp").exists()  # a waiting job never touches the holder's files
    finally:
        proc.kill()
        proc.wait()
    pretokenize("local", small["tok"], num_workers=1, lock_wait_s=30)  # kill -9 freed the lock
    assert f"removed 2 partial file(s) a stopped pretokenize left in {tdir}" in capsys.readouterr().out
    assert not list(tdir.glob("*.tmp"))
    assert json.loads((tdir / "meta.json").read_text())["complete"] is True


def test_pretokenize_on_complete_data_cleans_leftovers_only_when_the_lock_is_free(base, small, capsys):
    """The no-op on complete data takes no lock, yet removes a killed writer's .tmp files -- only when the lock is
    free at once: a live writer's .tmp files are kept, and the no-op never waits for it."""
    from nanochat.dataset import pretokenize
    tdir = base / small["token_rel"]
    meta = (tdir / "meta.json").stat().st_mtime_ns
    (tdir / "shard_00002.bin.tmp").write_bytes(b"partial")
    proc = _hold(tdir / ".lock")  # a live writer
    try:
        t0 = time.monotonic()
        pretokenize("local", small["tok"], num_workers=1, lock_wait_s=30)
        assert time.monotonic() - t0 < 10  # did not wait for the lock
        assert (tdir / "shard_00002.bin.tmp").exists()  # the holder's file is kept
    finally:
        proc.kill()
        proc.wait()
    capsys.readouterr()
    pretokenize("local", small["tok"], num_workers=1)  # the writer is gone (kill -9): its leftovers go
    out = capsys.readouterr().out
    assert f"removed 1 partial file(s) a stopped pretokenize left in {tdir}: shard_00002.bin.tmp" in out
    assert "already complete and current" in out and not list(tdir.glob("*.tmp"))
    assert (tdir / "meta.json").stat().st_mtime_ns == meta  # still a no-op on the data


def test_tokenizer_training_waits_for_the_other_writer(base, small, capsys):
    from scripts import tok_train
    tdir = base / "tokenizer"
    before = (tdir / "tokenizer.json").stat().st_mtime_ns
    (tdir / "tokenizer.json.tmp").write_text("{")  # a killed writer's partial file
    args = ["--source", "local", "--vocab-size", str(VOCAB)]
    proc = _hold(tdir / ".lock")
    try:
        with pytest.raises(UserError, match=rf"the tokenizer in {re.escape(str(tdir))} is in use by another run \(PID {proc.pid}, "):
            tok_train.main(args + ["--lock-wait", "0.3"])
        assert (tdir / "tokenizer.json").stat().st_mtime_ns == before  # nothing saved under the holder
        assert (tdir / "tokenizer.json.tmp").exists()
    finally:
        proc.kill()
        proc.wait()
    proc = _hold(tdir / ".lock", seconds=1.5)  # a holder that finishes: the second job waits, then trains
    t0 = time.monotonic()
    tok_train.main(args + ["--lock-wait", "60"])
    assert time.monotonic() - t0 > 0.5 and proc.wait() == 0
    out = capsys.readouterr()
    assert out.err.count(f"is in use by another job (PID {proc.pid}") == 1  # one line, not one per poll
    assert "removed 1 partial file(s) a stopped tokenizer training left" in out.out
    assert (tdir / "tokenizer.json").stat().st_mtime_ns != before and not list(tdir.glob("*.tmp"))


def test_a_raw_shard_build_waits_for_the_other_builder(base, small):
    """`python -m nanochat.dataset --source local` takes the raw folder's lock (as pretokenize): under a live
    holder it waits with one line naming it, then gives up in one line, writing nothing; once the holder is gone it
    builds and removes a killed builder's leftovers."""
    raw = base / "base_data" / "local"
    shutil.rmtree(raw)
    raw.mkdir()
    (raw / "shard_00001.parquet.tmp").write_bytes(b"partial")  # a killed builder's partial file
    cmd = [sys.executable, "-m", "nanochat.dataset", "--source", "local", "--val-fraction", "0.1"]
    proc = _hold(raw / ".lock")
    try:
        cli = subprocess.run(cmd + ["--lock-wait", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert cli.returncode == 2, cli.stderr
    assert cli.stderr.splitlines() == [
        f"raw shards {raw} is in use by another job (PID {proc.pid}, lock {raw / '.lock'}): waiting for it, up to "
        f"0.5 s",
        f"error: raw shards {raw} is in use by another run (PID {proc.pid}, lock {raw / '.lock'}) after waiting "
        f"0.5 s: wait for it to finish, or stop it"]
    assert sorted(p.name for p in raw.iterdir()) == [".lock", "shard_00001.parquet.tmp"]  # nothing written
    cli = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)  # kill -9 freed the lock
    assert cli.returncode == 0, cli.stderr
    assert f"removed 1 partial file(s) a stopped shard build left in {raw}" in cli.stdout
    assert (raw / "manifest.json").exists() and not list(raw.glob("*.tmp"))


def test_two_concurrent_raw_shard_builds_build_once(base, small, capsys):
    from nanochat.dataset import build_local, iter_documents
    shutil.rmtree(base / "base_data" / "local")
    errors = []

    def build():
        try:
            build_local(seed=0, val_fraction=0.1)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    builders = [threading.Thread(target=build) for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join(timeout=60)
    assert not errors, errors
    out = capsys.readouterr().out
    assert out.count("local source: ") == 1 and out.count("local source already built") == 1, out  # one build
    assert sum(1 for _ in iter_documents("local", "val")) > 0
