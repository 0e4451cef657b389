"""A crash-safe record of finished runs, shared by the experiment runners (scripts/sweep.py, scripts/ns_ablation.py):
one JSON line per finished run, flushed and fsync'd before the next run starts, so a crash loses at most the runs in
flight; reading tolerates a line torn by a crash mid-write (that run is simply not finished), and an append starts
on a fresh line (common.append_jsonl). A write that fails (a full disk) is one line naming the path and the errno
and leaves no .tmp (common.writes_results)."""
from __future__ import annotations

import json
import os
import sys

from nanochat.common import append_jsonl, writes_results


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
    append_jsonl(path, record, sync=True)


@writes_results
def rewrite_records(path: str, records: list[dict]):
    """Replace the file's records (a .tmp renamed over it: never half-written)."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
