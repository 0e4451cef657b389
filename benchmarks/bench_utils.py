"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import torch


def add_tiny_shape_args(p):
    """The model and batch shape flags of the training-step benchmarks; defaults = the tiny CPU config (depth 4,
    width 256, seq 256, batch 8, vocab 4096)."""
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=4096)


def timed_train_step(model, optimizers, x, y, ctx, device_type: str) -> float:
    """One training step (forward, backward, every optimizer), synchronised; returns its wall time in seconds."""
    t0 = time.perf_counter()
    with ctx:
        loss = model(x, y)
    loss.backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_generate(engine, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """One greedy generation of new_tokens tokens for every row of prompts [B, P] through a nanochat.engine.Engine.
    Returns (prefill seconds, decode seconds per forward), from the engine's own clock (Engine.last_timings)."""
    engine.generate(prompts.tolist(), new_tokens)
    t = engine.last_timings
    return t["prefill_s"], t["decode_s"] / max(1, t["decode_forwards"])


def time_single_env(env, steps: int, rng) -> float:
    """Env steps per second of one gymnasium env scoring one problem per step, random actions."""
    t0 = time.perf_counter()
    for _ in range(steps):
        env.reset(seed=int(rng.integers(1 << 30)))
        env.step(rng.uniform(0, 1, env.action_space.shape).astype("float32"))
    return steps / (time.perf_counter() - t0)


def time_vec_env(vec, steps: int, rng) -> float:
    """Env steps (problems scored) per second of a vec env stepping all its sub-environments at once."""
    vec.reset()
    iters = max(1, steps // vec.num_envs)
    t0 = time.perf_counter()
    for _ in range(iters):
        vec.step(rng.uniform(0, 1, (vec.num_envs, *vec.action_space.shape)).astype("float32"))
    return iters * vec.num_envs / (time.perf_counter() - t0)


def own_peak_memory_mib(device_type: str) -> float:
    """This process's peak memory: CUDA max allocated, or the peak RSS (VmHWM; ru_maxrss would include the
    parent's pages at fork time, so a child process measured that way inherits its parent's high-water mark)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def child_peak_memory_mib(module: str, child_arg: str, args, exclude: tuple = ()) -> float:
    """Run `python -m module --_memory-child child_arg` with the same flags in a fresh process (so the measured
    model does not share a high-water mark with the others) and read the MiB it prints last."""
    cmd = [sys.executable, "-m", module, "--_memory-child", child_arg]
    for k, v in vars(args).items():
        if k in exclude + ("memory_child",):
            continue
        if isinstance(v, bool):  # store_true flags: present or absent
            cmd += [f"--{k.replace('_', '-')}"] if v else []
        else:
            cmd.append(f"--{k.replace('_', '-')}={v}")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def write_record(path: str, benchmark: str, args, device_type: str, results: dict, **extra) -> dict:
    """Write a benchmark's JSON: its flags and results plus the environment that produced them."""
    from nanochat.common import git_commit, machine_info  # local: the helpers above need nothing from nanochat

    record = dict(benchmark=benchmark, config=vars(args), device=device_type,
                  device_name=torch.cuda.get_device_name() if device_type == "cuda" else platform.processor(),
                  platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=machine_info(), git_commit=git_commit(), **extra, results=results)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return record
