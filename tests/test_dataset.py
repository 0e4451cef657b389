"""Local source build (train splits only, no eval leakage), listing, errors, and pretokenization."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from nanochat.common import UserError
from nanochat.dataset import build_local, iter_documents, list_parquet_files, pretokenize

N_PROBES = 25  # eval questions checked for leakage per file


def _questions(path):
    with open(path) as f:
        return [json.loads(line)["question"] for line in f if line.strip()]


def _all_docs():
    return list(iter_documents("local", "train")), list(iter_documents("local", "val"))


def test_local_build_layout(tiny_base_dir):
    files = list_parquet_files("local")
    assert len(files) >= 2
    manifest = json.loads((tiny_base_dir.base_dir / "base_data" / "local" / "manifest.json").read_text())
    train, val = _all_docs()
    assert len(train) == manifest["num_train_docs"] and len(val) == manifest["num_val_docs"]
    assert sum(manifest["source_files"].values()) == len(train) + len(val)
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06  # --val-fraction 0.05
    assert not set(train) & set(val), "train and val documents overlap"
    # rebuilding without --force is a no-op; a different seed needs --force
    assert build_local(seed=0, val_fraction=0.05) == files
    with pytest.raises(UserError, match="--force"):
        build_local(seed=1, val_fraction=0.05)


def test_no_eval_split_leaks(tiny_base_dir):
    data = tiny_base_dir.data_dir
    train, val = _all_docs()
    corpus = "\n".join(train + val)
    # positive control: train questions are there
    probes = (_questions(data / "gsm8k" / "train.jsonl")[:N_PROBES]
              + _questions(data / "arc" / "ARC-Easy-train.jsonl")[:N_PROBES])
    for q in probes:
        assert q in corpus
    # upstream ARC repeats a few questions across splits; probe only eval questions absent from every train file
    train_text = (data / "tinyshakespeare" / "input.txt").read_text() + "\n".join(
        _questions(data / "gsm8k" / "train.jsonl") + _questions(data / "arc" / "ARC-Easy-train.jsonl")
        + _questions(data / "arc" / "ARC-Challenge-train.jsonl"))
    for rel in ("gsm8k/test.jsonl", "arc/ARC-Easy-test.jsonl", "arc/ARC-Challenge-test.jsonl",
                "arc/ARC-Easy-validation.jsonl", "arc/ARC-Challenge-validation.jsonl"):
        probes = list(itertools.islice((q for q in _questions(data / rel) if q not in train_text), N_PROBES))
        assert len(probes) == N_PROBES
        leaked = [q for q in probes if q in corpus]
        assert not leaked, f"{rel} questions found in the pretraining shards: {leaked[:2]}"


@pytest.mark.parametrize("setup", ["unset", "missing", "empty"])
def test_bad_data_dir(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    path = tmp_path / "data"
    if setup == "unset":
        monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
        match = "NANOCHAT_DATA_DIR"
    else:
        if setup == "empty":
            path.mkdir()
        monkeypatch.setenv("NANOCHAT_DATA_DIR", str(path))
        match = str(path)
    with pytest.raises(UserError, match=match):
        build_local()


def test_no_shards_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="nanochat.dataset --source local"):
        next(iter_documents("local", "train"))


def test_pretokenized_docs_decode_to_source(tiny_base_dir):
    tok = tiny_base_dir.tokenizer
    meta = json.loads((tiny_base_dir.token_dir / "meta.json").read_text())
    assert meta["complete"] and meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert [s["split"] for s in meta["shards"]] == ["train"] * (len(meta["shards"]) - 1) + ["val"]
    for split in ("train", "val"):
        docs = list(iter_documents("local", split))
        shards = [s for s in meta["shards"] if s["split"] == split]
        tokens = np.concatenate([np.fromfile(tiny_base_dir.token_dir / (s["name"] + ".bin"), dtype=np.uint16)
                                 for s in shards])
        offsets, base = [], 0
        for s in shards:
            idx = np.load(tiny_base_dir.token_dir / (s["name"] + ".idx.npy"))
            assert idx[0] == 0 and idx[-1] == s["num_tokens"] and len(idx) == s["num_docs"] + 1
            offsets.append(idx[:-1] + base)
            base += int(idx[-1])
        starts = np.concatenate(offsets + [np.array([base])])
        assert len(starts) == len(docs) + 1
        assert (tokens[starts[:-1]] == tok.bos_token_id).all()
        assert (tokens == tok.bos_token_id).sum() == len(docs)  # BOS nowhere else
        for i in list(range(0, len(docs), max(1, len(docs) // 50))):  # ~50 docs per split
            assert tok.decode(tokens[starts[i] + 1:starts[i + 1]].tolist()) == docs[i]
    # second run skips finished shards and leaves them unchanged
    before = {p.name: p.stat().st_mtime_ns for p in tiny_base_dir.token_dir.glob("*.bin")}
    pretokenize("local", tok, num_workers=1)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_base_dir.token_dir.glob("*.bin")} == before


def test_hub_small_writer_reproduces_the_shared_layout(shared_data_dir, tmp_path):
    """Hub-format rows in (the local copies, read as the hub serves them: HellaSwag from its HF arrow, label a
    string), the same files out, byte for byte."""
    import datasets

    from nanochat import hub_data

    def fetch_rows(hub_id, config, split):
        if hub_id == "Rowan/hellaswag":
            return [dict(r) for r in datasets.load_from_disk(str(shared_data_dir / "hellaswag" / "hf_validation"))]
        rel = f"gsm8k/{split}.jsonl" if hub_id == "openai/gsm8k" else f"arc/{config}-{split}.jsonl"
        return [json.loads(line) for line in open(shared_data_dir / rel, encoding="utf-8")]

    manifest = hub_data.write_hub_small(str(tmp_path), fetch_rows,
                                        lambda url: (shared_data_dir / "tinyshakespeare" / "input.txt").read_bytes())
    assert set(manifest) == set(hub_data.HUB_FILES) | set(hub_data.TEXT_FILES)
    for rel in manifest:
        assert (tmp_path / rel).read_bytes() == (shared_data_dir / rel).read_bytes(), rel
    assert manifest["gsm8k/test.jsonl"]["rows"] == 1319 and hub_data.is_complete(str(tmp_path))


def test_hub_small_without_network_is_one_clear_error(tmp_path, monkeypatch):
    from nanochat.dataset import main
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download the small datasets: HF_HUB_OFFLINE.*set NANOCHAT_DATA_DIR"):
        main(["--source", "hub-small", "--out", str(tmp_path / "data")])
    with pytest.raises(UserError, match="needs --out"):
        main(["--source", "hub-small"])


def test_hub_small_fails_at_the_first_name_resolution_error(tmp_path, monkeypatch):
    """No DNS (and no offline flag): one clear error at once, before datasets' five retries with backoff."""
    import socket
    import time

    from nanochat import hub_data
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(hub_data, "fetch_hub_rows", lambda *a: pytest.fail("the hub was tried"))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="huggingface.co does not resolve.*set NANOCHAT_DATA_DIR"):
        hub_data.write_hub_small(str(tmp_path))
    assert time.perf_counter() - t0 < 1.0
