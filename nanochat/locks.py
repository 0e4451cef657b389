"""One writer per shared artefact: an exclusive OS lock (flock) on a lock file, the holder's PID written in it.

The kernel releases a flock when the holder exits, crashes or is killed with -9, so a stale lock never blocks a
later job. Every lock of the repo is this one mechanism:
- each training run's checkpoint and results folders (nanochat.training.RunLock; a second run is refused),
- the tokenizer folder (scripts/tok_train.py), a source's raw shards (nanochat.dataset.build_local and
  download_fineweb) and a pretokenized data folder (nanochat.dataset.pretokenize): a second job wants the same
  artefact, so it waits for the first (one line naming the holder), up to a timeout,
- a sweep's --out (scripts/sweep.py; a second sweep is refused),
- the speedrun on one base dir (scripts/stage.sh's stage_lock, through `python -m nanochat.locks`: the shell holds
  the descriptor, so the lock lasts as long as the speedrun and its stages; a second speedrun is refused).
"""
from __future__ import annotations

import fcntl
import os
import sys
import time

from nanochat.common import UserError

_HELD: dict[str, object] = {}  # lock path -> open file, held by this process (see lock_file's replace)
POLL_S = 0.2


def _acquire(f, path: str, what: str, hint: str, wait_s: float, pid: int) -> None:
    """flock f (an open lock file) exclusively, then write pid in it. Busy: with wait_s > 0, say once who holds it
    and wait up to wait_s seconds; then (or at once without wait_s) a UserError naming the holder's PID."""
    deadline = None
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            if wait_s > 0 and deadline is None:
                print(f"{what} is in use by another job (PID {holder}, lock {path}): waiting for it, up to "
                      f"{wait_s:g} s", file=sys.stderr, flush=True)
                deadline = time.monotonic() + wait_s
            if deadline is None or time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:g} s" if deadline is not None else ""
                raise UserError(f"{what} is in use by another run (PID {holder}, lock {path}){waited}: {hint}") \
                    from None
            time.sleep(POLL_S)
    f.seek(0)
    f.truncate()
    f.write(f"{pid}\n")
    f.flush()


def lock_file(path: str, what: str, hint: str, wait_s: float = 0.0, replace: bool = True):
    """Take the lock on the file `path` (created with its folder) and return the open file: the lock is held until
    it is closed (release) or the process ends. replace=True: a new lock on the same path in this process replaces
    the old one (runs in one process are sequential; a main() that raised may still be referenced by a traceback,
    e.g. in tests). replace=False: the path is locked as if by another process (threads of one process exclude
    each other); use it with a scope that releases the lock (FileLock)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    path = os.path.realpath(path)
    if replace and path in _HELD:
        _HELD.pop(path).close()
    f = open(path, "a+")
    try:
        _acquire(f, path, what, hint, wait_s, os.getpid())
    except BaseException:
        f.close()
        raise
    if replace:
        _HELD[path] = f
    return f


def release(f) -> None:
    if _HELD.get(os.path.realpath(f.name)) is f:
        _HELD.pop(os.path.realpath(f.name))
    f.close()  # closing the descriptor releases the flock


def remove_stale_tmp(folder: str, what: str) -> list[str]:
    """Remove the .tmp files a killed writer of `what` left in folder. Call only while holding folder's lock (nobody
    else writes there then); says how many it removed. Returns their names."""
    stale = sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))
    for f in stale:
        os.remove(os.path.join(folder, f))
    if stale:
        print(f"removed {len(stale)} partial file(s) a stopped {what} left in {folder}: "
              f"{', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}", flush=True)
    return stale


def remove_stale_tmp_if_free(folder: str, what: str) -> list[str]:
    """remove_stale_tmp for a path that takes no lock (pretokenize on complete data: readers never wait), so that
    .tmp files a killed writer left do not stay forever: only if folder's lock is free at once. A held lock is a
    live writer, whose .tmp files are kept; a lock file that cannot be opened (read-only data) leaves them too."""
    if not any(f.endswith(".tmp") for f in os.listdir(folder)):
        return []
    try:
        with FileLock(os.path.join(folder, ".lock"), f"{what} output {folder}", "", wait_s=0):
            return remove_stale_tmp(folder, what)
    except (UserError, OSError):
        return []


class FileLock:
    """`with FileLock(path, what, hint, wait_s):` one writer of a shared artefact for the block's duration."""

    def __init__(self, path: str, what: str, hint: str, wait_s: float = 0.0):
        self.args = (path, what, hint, wait_s)
        self.file = None

    def __enter__(self):
        self.file = lock_file(*self.args, replace=False)
        return self

    def __exit__(self, *exc):
        release(self.file)
        self.file = None


def main(argv=None):
    """`python -m nanochat.locks FD PATH PID WHAT HINT`: lock the descriptor FD (a shell's `exec 9<>PATH`, inherited)
    for the shell PID. The flock belongs to the open file, which the shell keeps open after this process exits: the
    lock lasts until the shell (and every stage it started, which inherits the descriptor) has ended."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 5:
        raise UserError("usage: python -m nanochat.locks FD PATH PID WHAT HINT")
    fd, path, pid, what, hint = argv
    with open(int(fd), "r+", closefd=False) as f:
        _acquire(f, path, what, hint, 0.0, int(pid))


if __name__ == "__main__":
    from nanochat.common import run_main
    run_main(main)
