"""The small public datasets the tiny preset and the tests use, fetched from the hub and written in the layout of
shared/data (what $NANOCHAT_DATA_DIR points at), so a fresh clone without that folder can run the whole pipeline:

    python -m nanochat.dataset --source hub-small --out ~/.cache/nanochat-tiny/hub_small_data

| file | from | written as |
|---|---|---|
| gsm8k/{train,test}.jsonl | HF `openai/gsm8k` main | {"question", "answer"}, json.dumps defaults (openai's own files) |
| arc/ARC-{Easy,Challenge}-{split}.jsonl | HF `allenai/ai2_arc` | id/question/choices/answerKey, compact, `/` escaped (pandas' to_json) |
| hellaswag/hellaswag_val.jsonl | HF `Rowan/hellaswag` validation | rowanz's layout: label as int, json.dumps defaults |
| tinyshakespeare/input.txt | karpathy/char-rnn on GitHub | the file as it is |

Every file is written atomically; a MANIFEST.json with row counts and sha256 is written last. The writers are
tested on the local copies (hub-format rows in, the same bytes out: tests/test_dataset.py).
"""
from __future__ import annotations

import hashlib
import json
import os

from nanochat.common import UserError

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HELLASWAG_KEYS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings",
                  "source_id")


def gsm8k_lines(rows) -> str:
    return "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)


def arc_lines(rows) -> str:
    def one(r):
        choices = {"text": list(r["choices"]["text"]), "label": list(r["choices"]["label"])}
        line = json.dumps({"id": r["id"], "question": r["question"], "choices": choices, "answerKey": r["answerKey"]},
                          separators=(",", ":"))
        return line.replace("/", "\\/")  # the export's JSON writer (pandas' to_json) escapes forward slashes
    return "".join(one(r) + "\n" for r in rows)


def hellaswag_lines(rows) -> str:
    """HF rows (label a string) -> rowanz's jsonl (label an int, his key order)."""
    def one(r):
        row = {k: r[k] for k in HELLASWAG_KEYS}
        row["label"] = int(row["label"])
        row["endings"] = list(row["endings"])
        return json.dumps(row)
    return "".join(one(r) + "\n" for r in rows)


# relative path -> (hub id, config, split, writer); tinyshakespeare is fetched separately (a plain file)
HUB_FILES = {
    "gsm8k/train.jsonl": ("openai/gsm8k", "main", "train", gsm8k_lines),
    "gsm8k/test.jsonl": ("openai/gsm8k", "main", "test", gsm8k_lines),
    **{f"arc/ARC-{level}-{split}.jsonl": ("allenai/ai2_arc", f"ARC-{level}", split, arc_lines)
       for level in ("Easy", "Challenge") for split in ("train", "validation", "test")},
    "hellaswag/hellaswag_val.jsonl": ("Rowan/hellaswag", None, "validation", hellaswag_lines),
}
TEXT_FILES = {"tinyshakespeare/input.txt": TINYSHAKESPEARE_URL}


def _atomic_write(path: str, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def fetch_hub_rows(hub_id: str, config: str | None, split: str) -> list[dict]:
    """A split's rows from the HF hub through `datasets`; no network is one clear error."""
    import datasets
    try:
        return [dict(r) for r in datasets.load_dataset(hub_id, config, split=split)]
    except Exception as e:  # noqa: BLE001 -- offline, DNS, HTTP: all mean "cannot download"
        raise UserError(f"cannot download {hub_id}{'/' + config if config else ''} ({split}) from the HF hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, set "
                        f"NANOCHAT_DATA_DIR to a folder in the layout of shared/data (gsm8k/, arc/, hellaswag/, "
                        f"tinyshakespeare/)") from None


def fetch_url(url: str) -> bytes:
    import requests
    try:
        resp = requests.get(url, timeout=60)
        resp.raise_for_status()
        return resp.content
    except requests.RequestException as e:
        raise UserError(f"cannot download {url} ({type(e).__name__}). Offline, set NANOCHAT_DATA_DIR to a folder in "
                        f"the layout of shared/data") from None


OFFLINE_HINT = ("Offline, set NANOCHAT_DATA_DIR to a folder in the layout of shared/data (gsm8k/, arc/, hellaswag/, "
                "tinyshakespeare/)")


def check_hub_reachable(host: str = "huggingface.co"):
    """Fail at once, with one message, when the hub cannot be reached: offline mode set, or the host's name does not
    resolve. (datasets would otherwise retry each request 5 times with backoff, ~25 s, before failing.)"""
    import socket
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise UserError(f"cannot download the small datasets: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set. "
                        f"{OFFLINE_HINT}")
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise UserError(f"cannot download the small datasets: {host} does not resolve ({e}). {OFFLINE_HINT}") from None


def write_hub_small(out_dir: str, fetch_rows=None, fetch_text=None) -> dict:
    """Fetch every file of the layout and write it under out_dir (default fetchers: the HF hub and HTTP; tests pass
    their own). Returns the manifest."""
    if fetch_rows is None:
        check_hub_reachable()
        fetch_rows = fetch_hub_rows
    fetch_text = fetch_text or fetch_url
    manifest = {}
    for rel, (hub_id, config, split, writer) in HUB_FILES.items():
        data = writer(fetch_rows(hub_id, config, split)).encode("utf-8")
        _atomic_write(os.path.join(out_dir, rel), data)
        manifest[rel] = dict(source=f"hf:{hub_id}" + (f"/{config}" if config else "") + f":{split}",
                             rows=data.count(b"\n"), bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    for rel, url in TEXT_FILES.items():
        data = fetch_text(url)
        _atomic_write(os.path.join(out_dir, rel), data)
        manifest[rel] = dict(source=url, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _atomic_write(os.path.join(out_dir, "MANIFEST.json"), json.dumps(manifest, indent=2).encode())
    return manifest


def is_complete(data_dir: str) -> bool:
    return os.path.isfile(os.path.join(data_dir, "MANIFEST.json")) or all(
        os.path.isfile(os.path.join(data_dir, rel)) for rel in list(HUB_FILES) + list(TEXT_FILES))
