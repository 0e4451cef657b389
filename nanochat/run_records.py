"""A crash-safe record of finished runs, shared by the experiment runners (scripts/sweep.py, scripts/ns_ablation.py):
one JSON line per finished run, flushed and fsync'd before the next run starts, so a crash loses at most the runs in
flight; reading tolerates a line torn by a crash mid-write (that run is simply not finished), and repair() removes
it so that the next append does not land on its end."""
from __future__ import annotations

import json
import os
import sys


def read_records(path: str, repair: bool = False) -> list[dict]:
    """The records of a runs.jsonl (empty when the file does not exist). A torn line is skipped with a note; with
    repair=True the file is rewritten without it."""
    if not os.path.isfile(path):
        return []
    records, torn = [], False
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn = True
                print(f"ignoring a malformed line in {path} (an interrupted write): {line[:80]!r}", file=sys.stderr)
    if torn and repair:
        rewrite_records(path, records)
    return records


def append_record(path: str, record: dict):
    """One line for one finished run, on disk before this returns."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_records(path: str, records: list[dict]):
    """Replace the file's records (a .tmp renamed over it: never half-written)."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
