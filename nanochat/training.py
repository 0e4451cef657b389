"""Training-loop helpers shared by the training scripts (base_train, sft_train, train_rl): a graceful stop on
SIGINT/SIGTERM and metrics files that stay consistent across a resume."""
from __future__ import annotations

import json
import os
import signal

import torch
import torch.distributed as dist


def truncate_metrics(path: str, step: int):
    """On resume, drop records logged after the checkpoint (and its evaluations -- val bpb, val answer loss, mHC
    statistics -- which are redone at that step) so the curves have no duplicated steps."""
    if not os.path.exists(path):
        return

    def keep(rec: dict) -> bool:
        redone = ("val_bpb", "val_answer_loss", "mhc")
        return rec["step"] < step or (rec["step"] == step and not any(k in rec for k in redone))

    with open(path) as f:
        kept = [line for line in f if line.strip() and keep(json.loads(line))]
    with open(path, "w") as f:
        f.writelines(kept)


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
