"""What the training scripts (base_train, sft_train, train_rl) share: the Run frame (one writer per run, resume or
refuse, the settings check, config.json and metrics.jsonl, saves with every rank's generators, the divergence
check, stop signals), the horizon rule of --extend-to, and per-rank seeds."""
from __future__ import annotations

import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from nanochat.checkpoint import latest_checkpoint, latest_intact_checkpoint, recover_interrupted_saves, save_checkpoint
from nanochat.common import (UserError, WriteError, append_jsonl, check_writable_on_all_ranks, compute_cleanup,
                             flat_fields, print0, to_flat_dict, writes_results)
from nanochat.locks import lock_file, release as release_lock


DIVERGENCE_MARGIN = 1.0  # nats above ln(vocab), a uniform guess's loss: that far above it, worse than guessing
DIVERGENCE_WINDOW = 10  # steps in a row above the threshold: one bad batch is noise, ten in a row is a trend


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


@writes_results
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


class RunLock:
    """One writer per run: an exclusive OS lock (flock) on <folder>/.lock for each folder the run owns (its
    checkpoints, its results). The kernel releases it when the process exits, crashes or is killed with -9, so a
    stale lock never blocks a later run. A second run gets an error naming the holder's PID. Within one process
    a new lock on the same folder replaces the old one: runs in one process are sequential (a main() that raised
    may still be referenced by a traceback, e.g. in tests). The mechanism is nanochat.locks.lock_file, shared by
    every lock of the repo."""

    def __init__(self, folders: list[str], what: str):
        self.files = []
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            try:
                f = lock_file(os.path.join(folder, ".lock"), what,
                              "wait for it to finish or stop it, or choose another tag")
            except UserError:
                self.release()
                raise
            self.files.append(f)

    def release(self):
        for f in self.files:
            release_lock(f)
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


def resumable_settings(cls) -> set[str]:
    """The flat names of the settings that may change on --resume: those whose field metadata says resumable (they
    change only logging, evaluation cadence, saving, placement or speed, never what is trained)."""
    return {name for name, f in flat_fields(cls) if f.metadata.get("resumable")}


def check_resume_settings(saved: dict, now: dict, path: str, allowed, tag_flag: str = "--model-tag") -> dict:
    """Compare the run settings stored in the checkpoint with this invocation's (flat dicts). Returns the allowed
    changes ({key: [old, new]}); any other difference is refused with the keys named (the checkpoint's optimizer
    state, schedule and data order would silently keep the old values while config.json recorded the new ones).
    Keys the checkpoint does not have (settings added since) are not compared."""
    changed = {k: [saved.get(k), v] for k, v in now.items() if k in saved and saved[k] != v}
    refused = {k: ov for k, ov in changed.items() if k not in allowed}
    if refused:
        detail = "; ".join(f"--{k.replace('_', '-')}: checkpoint {o!r}, now {n!r}" for k, (o, n) in refused.items())
        raise UserError(f"cannot resume from {path} with different settings ({detail}). Resume with the "
                        f"checkpoint's values, or start a new run under another {tag_flag}")
    return {k: ov for k, ov in changed.items() if k in allowed}


class Run:
    """The frame of a training run, the same for base_train, sft_train and train_rl:
    - one writer per run: an OS lock on its checkpoint and results folders (every rank learns the outcome), and
      the recovery of a save a crash interrupted;
    - resume-or-refuse: checkpoints without --resume are refused; --resume takes the newest intact one;
    - the settings check on resume: only settings declared resumable (field metadata) may differ, and those
      changes are recorded in metrics.jsonl at the resume step;
    - config.json written atomically, metrics.jsonl appended (rank 0) and truncated to the resume step;
    - saves with every rank's generator states (CPU and CUDA);
    - the divergence check before an optimizer step;
    - SIGINT/SIGTERM: a flag checked at step boundaries; finish() exits 128 + signal after the save."""

    def __init__(self, what: str, ckpt_root: str, results_dir: str, *, tag_flag: str, master: bool = True,
                 device=None):
        self.what, self.ckpt_root, self.results_dir, self.tag_flag = what, ckpt_root, results_dir, tag_flag
        self.master, self.device = master, device
        self.metrics_path = os.path.join(results_dir, "metrics.jsonl")
        check_writable_on_all_ranks(results_dir, master, device)  # before any lock, folder or compute
        self.lock = acquire_run_lock([ckpt_root, results_dir], what, master, device)
        if master:
            recover_interrupted_saves(ckpt_root)
        if dist.is_initialized():
            dist.barrier()
        self.stop: StopFlag | None = None
        self.write_error: WriteError | None = None  # a results write that failed (log): save, then stop
        self.saved: str | None = None  # the newest checkpoint this run wrote
        self.steps_above, self.divergence_warned = 0, False  # the divergence check's state (check_loss)

    def resume_path(self, resume: bool, *, allow_without_resume: bool = False) -> str | None:
        """The checkpoint to resume from: None for a fresh run. Checkpoints without --resume are refused (unless
        allow_without_resume: an evaluation of the run); --resume falls back past a damaged newest one."""
        existing = latest_checkpoint(self.ckpt_root)
        if existing and not (resume or allow_without_resume):
            raise UserError(f"checkpoints already exist in {self.ckpt_root}: pass --resume to continue that run, or "
                            f"choose another {self.tag_flag} (or delete the folder to start over)")
        if not existing:
            if resume:
                print0(f"--resume: no checkpoint in {self.ckpt_root} yet, starting from scratch")
            self.fresh_log()
            return None
        path = latest_intact_checkpoint(self.ckpt_root)  # says why when it falls back
        if path is None:
            self.fresh_log()
        return path

    def fresh_log(self):
        """A run from scratch starts a new metrics.jsonl: an old one (a run killed before its first checkpoint) is
        moved aside to metrics.jsonl.N, the first free N, never overwritten or deleted, so the two runs' steps are
        not mixed in one curve."""
        if not self.master or not os.path.exists(self.metrics_path):
            return
        n = 1
        while os.path.exists(f"{self.metrics_path}.{n}"):
            n += 1
        os.replace(self.metrics_path, f"{self.metrics_path}.{n}")
        print0(f"starting a new log: moved the earlier run's {self.metrics_path} to {self.metrics_path}.{n}")

    def check_settings(self, saved: dict, cfg, path: str) -> dict:
        """Refuse a changed setting that is not resumable (names them); returns the resumable changes."""
        return check_resume_settings(saved, to_flat_dict(cfg), path, resumable_settings(type(cfg)), self.tag_flag)

    def resumed_at(self, step: int, changes: dict):
        """metrics.jsonl continues from the checkpoint's step: later records go, the changes are recorded."""
        if self.master:
            truncate_metrics(self.metrics_path, step)
            if changes:  # what changed at this step, so the curves can be read honestly
                append_jsonl(self.metrics_path, {"step": step, "config_change": changes})

    def write_config(self, run_config: dict):
        if self.master:
            atomic_json(os.path.join(self.results_dir, "config.json"), run_config)

    def log(self, record: dict):
        """Append to metrics.jsonl (rank 0). A write that fails (a full results disk) does not kill the step: the
        record goes to stdout, nothing more is written, and the stop flag makes every rank save a checkpoint at the
        next step boundary; finish() then exits with one line naming the path and the errno."""
        if not self.master:
            return
        if self.write_error is None:
            try:
                append_jsonl(self.metrics_path, record)
                return
            except WriteError as e:
                self.write_failed(e)
        print(f"not written to {self.metrics_path}: {json.dumps(record)}", flush=True)

    def write_failed(self, e: WriteError):
        """A results write failed (log, or another results file the loop writes, e.g. train_rl's episode monitor):
        the first error is kept and the stop flag makes the loop save a checkpoint and stop (finish names it).
        Without a loop yet there is nothing to save: the error is raised."""
        if self.write_error is None:
            self.write_error = e
        if self.stop is None:  # no step loop yet to save from
            raise e
        self.stop.write_failed = True

    def save(self, step: int, model, optimizers, meta: dict, keep: int, device_type: str) -> str | None:
        """A checkpoint with every rank's generators (call on every rank: gathering them is a collective)."""
        rng = rng_states(device_type)
        path = None
        if self.master:
            path = self.save_with(lambda: save_checkpoint(self.ckpt_root, step, model, optimizers, meta, keep=keep,
                                                          rng_state={"ranks": rng}))
            print0(f"saved checkpoint {path}")
        return path

    def save_with(self, write) -> str:
        """A checkpoint that write() saves and returns the path of (save, or a learner's own format: train_rl),
        remembered for finish's message; after a failed results write, a failed save says both errors."""
        try:
            path = write()
        except UserError as e:
            if self.write_error is None:
                raise
            raise UserError(f"{self.write_error}; and {e}") from None  # both disks full: say both
        self.saved = path
        return path

    def check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int, hint: str):
        """Before the optimizer step (one device sync): a non-finite loss or gradient norm stops the run, with no
        update applied and nothing saved."""
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            raise UserError(f"training diverged at step {step}: loss {loss.item()} / grad norm {grad_norm.item()} is "
                            f"not finite; no update was applied and nothing was saved. {hint}, or resume from the "
                            f"last checkpoint in {self.ckpt_root}")

    def check_loss(self, step: int, loss: float, vocab_size: int, mode: str, warmup_steps: int = 0):
        """After the warm-up, a loss above ln(vocab) + DIVERGENCE_MARGIN for DIVERGENCE_WINDOW steps in a row is a
        diverging run (a finite loss, so check_finite lets it through): warned once (mode warn) or stopped before
        the next save, so nothing diverged is written (mode stop); off does nothing. Call with the loss every rank
        agrees on (all-reduced), so that every rank stops alike."""
        if mode == "off" or step <= warmup_steps:
            return
        threshold = math.log(vocab_size) + DIVERGENCE_MARGIN
        self.steps_above = self.steps_above + 1 if loss > threshold else 0
        if self.steps_above < DIVERGENCE_WINDOW:
            return
        what = (f"training is diverging: at step {step} the loss {loss:.3f} has been above ln(vocab_size "
                f"{vocab_size}) + {DIVERGENCE_MARGIN} = {threshold:.3f} for {DIVERGENCE_WINDOW} steps")
        if mode == "stop":
            raise UserError(f"{what}; stopped by --divergence-check stop with nothing saved since the last checkpoint "
                            f"in {self.ckpt_root}. Lower the learning rates, or resume from that checkpoint")
        if not self.divergence_warned:
            self.divergence_warned = True
            print0(f"warning: {what} (lower the learning rates; --divergence-check stop makes this an error)",
                   file=sys.stderr)

    def stop_flag(self) -> StopFlag:
        """SIGINT/SIGTERM handlers from here on (a signal finishes the step, then saves)."""
        self.stop = self.stop or StopFlag()
        return self.stop

    def finish(self, step: int, signum: int = 0):
        """Release the run; after a signal, say how to continue and exit 128 + signal."""
        compute_cleanup()
        if self.lock:
            self.lock.release()
        if signum == WRITE_FAILED:  # rank 0's results write failed; the checkpoint was saved at this step
            if not self.master:
                sys.exit(2)  # rank 0 says why, once
            raise UserError(f"{self.write_error}; saved checkpoint {self.saved or '(none)'} at step {step}: free "
                            f"space and continue with --resume (the unwritten records are on stdout)")
        if signum:
            print0(f"stopped by signal {signum} at step {step}; continue with --resume")
            sys.exit(128 + signum)


@writes_results
def atomic_json(path: str, obj):
    """A reader (or a kill) never sees a half-written file: write a .tmp, then rename it over the old one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def horizon(derived: int, saved: int | None, extend_to: int, step: int) -> tuple[int, dict]:
    """The number of steps a run trains for: the derived one for a fresh run, the checkpoint's on a resume, and N
    with --extend-to N (beyond the resume step and the checkpoint's horizon). Returns (steps, the change to record).
    The LR schedule is recomputed for the new horizon (docs/design.md, "Training longer")."""
    steps = derived if saved is None else saved
    if not extend_to:
        return steps, {}
    if saved is None:
        raise UserError("--extend-to continues an existing run: add --resume (a new run takes --num-iterations)")
    if extend_to <= max(step, saved):
        raise UserError(f"--extend-to {extend_to} must be beyond the checkpoint's step {step} and its horizon "
                        f"{saved}")
    return extend_to, {"num_iterations": [saved, extend_to]}


def restore_training_state(meta: dict, optim_payload: dict, weights: dict, model, optimizers, loader, rank: int,
                           world_size: int, device_type: str, seed: int) -> int:
    """Put a checkpoint back into a model, its optimizers, its data loader and this rank's generators; returns the
    checkpoint's step. The one restore of base_train and sft_train, so the two resume exactly alike."""
    model.load_state_dict(weights)
    for opt, state in zip(optimizers, optim_payload["optimizers"]):
        opt.load_state_dict(state)
    loader.load_state_dict(meta["loader_state"])
    restore_rng(optim_payload.get("rng", {}), rank, world_size, device_type, seed)
    return meta["step"]


def resume_horizon(run: "Run", derived: int, meta: dict | None, extend_to: int, changes: dict, decay_start: float,
                   resume_path: str | None) -> int:
    """The horizon of a fresh or resumed run (horizon() with the checkpoint's), recorded at the resume step with the
    other allowed changes. decay_start is the fraction of the horizon where the LR starts to fall (1 - warmdown
    ratio; 0 for a linear decay): an extension from inside it raises the LR back, which the run says."""
    step = meta["step"] if meta else 0
    saved = meta.get("run_config", {}).get("num_iterations", derived) if meta else None
    steps, extended = horizon(derived, saved, extend_to, step)
    changes = {**changes, **extended}
    if resume_path:
        run.resumed_at(step, changes)
        print0(f"resumed from {resume_path} at step {step}" + (f" (changed: {', '.join(changes)})" if changes else ""))
        if extended and step > round(saved * decay_start):
            print0(f"note: step {step} is inside the old horizon's LR decay (from step {round(saved * decay_start)});"
                   f" the schedule of {steps} steps raises the LR back to its value there")
    return steps


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


WRITE_FAILED = -1  # StopFlag.synced's value when rank 0 could not write its results: save, then stop (Run.finish)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary instead of dying mid-step. A failed
    results write (Run.log) sets write_failed, which stops the loop the same way (synced() gives WRITE_FAILED)."""

    def __init__(self):
        self.signum = 0
        self.write_failed = False
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
            return self.signum or (WRITE_FAILED if self.write_failed else 0)
        t = torch.tensor([self.signum, int(self.write_failed)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t[0].item()) or (WRITE_FAILED if t[1].item() else 0)
