"""Training-loop helpers shared by the training scripts (base_train, sft_train, train_rl): a graceful stop on
SIGINT/SIGTERM, one writer per run (an OS file lock), resume that refuses changed settings, and metrics files
that stay consistent across a resume."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

from nanochat.common import UserError


def read_metrics(path: str) -> list[dict]:
    """metrics.jsonl's records. A partial last line (a crash or a full disk mid-append) is dropped with a warning;
    a bad line elsewhere is an error naming the file and line."""
    with open(path) as f:
        lines = f.readlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError("not a record with a 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}:{i + 1}: dropping a partial last line ({e})", file=sys.stderr, flush=True)
                continue
            raise UserError(f"{path}:{i + 1}: not a metrics record ({e}); fix or remove that line") from None
        records.append(rec)
    return records


def truncate_metrics(path: str, step: int):
    """On resume, drop records logged after the checkpoint (and its evaluations -- val bpb, val answer loss, mHC
    statistics -- which are redone at that step) so the curves have no duplicated steps. Rewritten atomically."""
    if not os.path.exists(path):
        return

    def keep(rec: dict) -> bool:
        redone = ("val_bpb", "val_answer_loss", "mhc")
        return rec["step"] < step or (rec["step"] == step and not any(k in rec for k in redone))

    kept = [rec for rec in read_metrics(path) if keep(rec)]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in kept)
    os.replace(path + ".tmp", path)


_HELD: dict[str, object] = {}  # lock path -> open file, held by this process


class RunLock:
    """One writer per run: an exclusive OS lock (flock) on <folder>/.lock for each folder the run owns (its
    checkpoints, its results). The kernel releases it when the process exits, crashes or is killed with -9, so a
    stale lock never blocks a later run. A second run gets an error naming the holder's PID. Within one process
    a new lock on the same folder replaces the old one: runs in one process are sequential (a main() that raised
    may still be referenced by a traceback, e.g. in tests)."""

    def __init__(self, folders: list[str], what: str):
        self.files = []
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            path = os.path.realpath(os.path.join(folder, ".lock"))
            if path in _HELD:
                _HELD.pop(path).close()
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                self.release()
                raise UserError(f"{what} is in use by another run (PID {holder}, lock {path}): wait for it to "
                                f"finish or stop it, or choose another tag") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self.files.append(f)
            _HELD[path] = f

    def release(self):
        for f in self.files:
            _HELD.pop(os.path.realpath(f.name), None)
            f.close()  # closing the descriptor releases the flock
        self.files = []


def acquire_run_lock(folders: list[str], what: str, master: bool, device) -> RunLock | None:
    """RunLock on rank 0, with every rank told the outcome (so a refused torchrun run stops on all ranks)."""
    lock, error = None, ""
    if master:
        try:
            lock = RunLock(folders, what)
        except UserError as e:
            error = str(e)
    if dist.is_initialized():
        flag = torch.tensor([1 if error else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not error:
            error = f"{what} is in use by another run (see rank 0's message)"
    if error:
        raise UserError(error)
    return lock


# Settings that change only logging, evaluation, saving or placement, not the trained model: these may change
# on --resume (the change is recorded in metrics.jsonl); any other difference is refused.
RESUMABLE_CHANGES = ("run", "model_tag", "resume", "log_every", "eval_every", "eval_tokens", "save_every",
                     "keep_checkpoints", "results_dir", "mhc_log_every", "device_type", "compile", "device_batch_size",
                     "activation_checkpointing", "memory_check", "peak_flops")


def check_resume_settings(saved: dict, now: dict, path: str, allowed=RESUMABLE_CHANGES) -> dict:
    """Compare the run settings stored in the checkpoint with this invocation's. Returns the allowed changes
    ({key: [old, new]}); any other difference is refused with the keys named (the checkpoint's optimizer state,
    schedule and data order would silently keep the old values while config.json recorded the new ones)."""
    changed = {k: [saved.get(k), v] for k, v in now.items() if k in saved and saved[k] != v}
    refused = {k: ov for k, ov in changed.items() if k not in allowed}
    if refused:
        detail = "; ".join(f"--{k.replace('_', '-')}: checkpoint {o!r}, now {n!r}" for k, (o, n) in refused.items())
        raise UserError(f"cannot resume from {path} with different settings ({detail}). Resume with the "
                        f"checkpoint's values, or start a new run under another --model-tag")
    return {k: ov for k, ov in changed.items() if k in allowed}


def seed_rank(seed: int, rank: int):
    """Call after the model init (identical on every rank). Rank r > 0 reseeds torch's generators (CPU and every
    device) with seed + r, so the random draws of training (gate noise, gate sampling) differ between ranks instead
    of repeating rank 0's; rank 0 keeps the stream a single process has. Reproducible for a given world size."""
    if rank > 0:
        torch.manual_seed(seed + rank)


def rng_states(device_type: str) -> list[dict]:
    """Every rank's generator states (CPU, and CUDA on GPUs), gathered on every rank (a collective: all ranks call
    it). Saved with a checkpoint, so that a resumed run draws what the uninterrupted one would have, rank by rank."""
    mine = {"torch": torch.get_rng_state()}
    if device_type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def restore_rng(rng: dict, rank: int, world_size: int, device_type: str, seed: int):
    """Set this rank's generators from a checkpoint's rng payload ({"ranks": [...]}; older checkpoints hold rank 0's
    state only, as {"torch", "cuda"}). With another world size than the checkpoint's, rank r > 0 reseeds (seed_rank),
    and the draws of the resumed run differ from an uninterrupted one (said once)."""
    ranks = rng.get("ranks") or ([{k: v for k, v in rng.items() if k in ("torch", "cuda")}] if rng else [])
    if rank < len(ranks) and len(ranks) in (1, world_size):
        state = ranks[rank] if len(ranks) == world_size else (ranks[0] if rank == 0 else None)
    else:
        state = None
    if state is None:
        if rank == 1 or (rank == 0 and not ranks):
            print(f"warning: the checkpoint holds generator states for {len(ranks)} rank(s), this run has "
                  f"{world_size}: the random draws (gate noise/sampling) after the resume are new ones",
                  file=sys.stderr, flush=True)
        seed_rank(seed, rank)
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and device_type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu())


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary instead of dying mid-step."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived signal {signum}: saving a checkpoint after this step", flush=True)

    def synced(self, device) -> int:
        """All ranks agree (max) so that they save and exit at the same step."""
        if not dist.is_initialized():
            return self.signum
        t = torch.tensor([self.signum], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
