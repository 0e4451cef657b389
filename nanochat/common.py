"""Shared utilities: directories, errors, logging, distributed/device setup."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input (flag, file, key, value). Scripts print it without a traceback."""


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


SMOKE_PARAMS = 50e6  # below this a model is a smoke test of the pipeline, never a finding (docs/design.md, section 7)

INPUT_NAME_HINT = "a path goes in --checkpoint"  # a tag that names a checkpoint to read
OUTPUT_NAME_HINT = "$NANOCHAT_BASE_DIR and --results-dir say where its folders go"  # a tag that names what is written


def check_name(flag: str, value: str, required: bool = False, hint: str = INPUT_NAME_HINT):
    """The one rule for a name that becomes a folder or file name (a model tag, an output tag, an RL tag, a sweep or
    round name): letters, digits, '.', '_' and '-', and not '.' or '..'. Anything else could walk out of the base or
    results dir (a separator, an absolute path, '..'), so it is refused with the rule and `hint` (where a path goes
    instead; '' for none). An empty value passes unless required (a default applies)."""
    if not value and not required:
        return
    if not value or value in (".", "..") or not set(value) <= _NAME_CHARS:
        raise UserError(f"{flag} {value!r} is not a plain name: use letters, digits, '.', '_' and '-', not '.' or "
                        f"'..'" + (f" ({hint})" if hint else ""))


def get_base_dir() -> str:
    """Cache directory for tokenizer, datasets and checkpoints: $NANOCHAT_BASE_DIR or ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_data_dir() -> str | None:
    """$NANOCHAT_DATA_DIR: local copies of the datasets in their upstream formats (None when unset)."""
    return os.environ.get("NANOCHAT_DATA_DIR") or None


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """Commit of the code that produced a result ('unknown' outside a git checkout); '+dirty' if modified."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("+dirty" if sha and dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    """What produced a result, for the record every run and benchmark writes: the CPU model and its cores, the GPU,
    torch and its threads (numbers in the docs name the run and the machine they came from)."""
    import platform
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    bf16, capability = cpu_bf16_support()
    return dict(cpu=cpu, cpu_count=os.cpu_count(), cpu_capability=capability, cpu_native_bf16=bf16,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                torch=torch.__version__, threads=torch.get_num_threads(), platform=platform.platform())


# ---------------------------------------------------------------------------------------------------------------
# settings: a dataclass may nest another (GPTConfig.mhc, TrainConfig.mhc: an MHCConfig); outside the code each nested
# setting has one flat name, <field>_<setting> (mhc_gate_init): the flag --mhc-gate-init, the TOML key, the key in
# checkpoints and config.json. So a nested option is declared once, in its dataclass.

def nested_fields(cls) -> dict:
    """{field name: nested dataclass type} for the fields of `cls` that hold a dataclass (a default_factory)."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)
            if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)}


def flat_fields(cls) -> list[tuple[str, dataclasses.Field]]:
    """(flat name, field) of every setting of `cls`, nested ones as <outer>_<inner>, in declaration order."""
    nested = nested_fields(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in nested:
            out += [(f"{f.name}_{name}", inner) for name, inner in flat_fields(nested[f.name])]
        else:
            out.append((f.name, f))
    return out


def to_flat_dict(obj) -> dict:
    """A settings dataclass as a flat dict: the form of flags, TOML files, checkpoints and config.json."""
    nested = nested_fields(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in nested:
            out.update({f"{f.name}_{k}": v for k, v in to_flat_dict(value).items()})
        else:
            out[f.name] = value
    return out


def from_flat_dict(cls, values: dict, what: str = "config", _prefix: str = ""):
    """`cls` from flat (and, for nested fields, also already nested) settings; unknown keys are an error naming
    them."""
    nested = nested_fields(cls)
    own = {f.name for f in dataclasses.fields(cls)}
    kwargs, inner = {}, {name: {} for name in nested}
    for key, value in values.items():
        if key in nested and isinstance(value, dict):
            inner[key].update(value)
        elif key in own and key not in nested:
            kwargs[key] = value
        else:
            outer = next((n for n in nested if key.startswith(n + "_")), None)
            if outer is None:
                known = ", ".join(_prefix + name for name, _ in flat_fields(cls))
                raise UserError(f"unknown {what} key {_prefix + key!r} (known: {known})")
            inner[outer][key[len(outer) + 1:]] = value
    for name, sub in nested.items():
        kwargs[name] = from_flat_dict(sub, inner[name], what, f"{_prefix}{name}_")
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# distributed

def dist_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_master() -> bool:
    return dist_info()[1] == 0


def print0(*args, **kwargs):
    if is_master():
        print(*args, **kwargs, flush=True)


# Dense bf16 tensor-core peaks per GPU (NVIDIA datasheets, without sparsity), for MFU. Names are matched in order, so
# the PCIe and NVL cards (lower clocks and power) come before the SXM part whose name they contain.
PEAK_BF16_FLOPS = (("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H200 NVL", 835e12), ("GH200", 989e12),
                   ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU from its name (torch.cuda.get_device_name()), or None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS if k in device_name), None)


def autodetect_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_init(device_type: str = "auto", dist_timeout: float = 0, shared: dict | None = None):
    """Set up the device and (under torchrun) the process group: NCCL on CUDA, gloo on the CPU. dist_timeout
    (--dist-timeout, seconds; 0: torch's default): how long a collective waits for a frozen or lost peer before it
    fails, and run_main turns that failure into one line (peer_failure). shared: {flag: folder} that every node of a
    multi-node run must see, besides the base dir (check_shared_dirs).

    Returns (device_type, device, is_ddp, rank, local_rank, world_size).
    """
    if device_type == "auto":
        device_type = autodetect_device_type()
    if device_type not in ("cuda", "cpu"):
        raise UserError(f"--device-type must be one of auto, cuda, cpu (got {device_type!r})")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but no CUDA device is available")
    is_ddp, rank, local_rank, world_size = dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # No TF32: under bf16 autocast every large matrix product runs in bf16 anyway; the fp32 ones left are the
        # mHC coefficient math and mixing (small and memory-bound: TF32 would buy nothing there but its 10-bit
        # mantissa) and --dtype float32 runs, which ask for fp32. So fp32 means IEEE fp32 on the GPU as on the CPU.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        device = torch.device("cpu")
    if is_ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if dist_timeout < 0:
            raise UserError(f"--dist-timeout must be >= 0 seconds (got {dist_timeout})")
        timeout = {"timeout": timedelta(seconds=dist_timeout)} if dist_timeout > 0 else {}
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None, **timeout)
        _DIST_TIMEOUT[0] = dist_timeout
        dist.barrier()
        check_shared_dirs({"NANOCHAT_BASE_DIR": get_base_dir(), **(shared or {})})
    return device_type, device, is_ddp, rank, local_rank, world_size


def check_shared_dirs(dirs: dict[str, str]):
    """A multi-node run (WORLD_SIZE > LOCAL_WORLD_SIZE) needs every node to see the same folders: the launchers'
    c10d rendezvous ignores NODE_RANK, so any node may get rank 0, the only rank that writes checkpoints and results,
    and the other ranks read what it prepared (tokenizer, data, checkpoints). Rank 0 drops a marker file in each
    folder; one rank per node looks for it; a node that does not see it is refused, in one line, before any work."""
    world = dist.get_world_size()
    if world == int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        return
    import socket
    import uuid
    rank = dist.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = f".nanochat_shared_{token[0]}"
    if rank == 0:
        for folder in dirs.values():
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, marker), "w") as f:
                f.write(f"{socket.gethostname()}\n")
    dist.barrier()
    missing = [] if os.environ.get("LOCAL_RANK", "0") != "0" else \
        [f"{flag} {os.path.abspath(d)}" for flag, d in dirs.items() if not os.path.exists(os.path.join(d, marker))]
    seen = [None] * world
    dist.all_gather_object(seen, (socket.gethostname(), missing))
    if rank == 0:
        for folder in dirs.values():
            os.remove(os.path.join(folder, marker))
    bad = [(r, host, m) for r, (host, m) in enumerate(seen) if m]
    if bad:
        r, host, m = bad[0]
        raise UserError(f"multi-node run: the node of rank {r} ({host}) does not see rank 0's {' and '.join(m)}: "
                        f"every node must share the base dir and the results dir (one filesystem), since rank 0, the "
                        f"only writer, can be on any node (c10d rendezvous ignores NODE_RANK)")


# How long the other ranks wait for rank 0 to prepare shared data (pretokenizing a cold FineWeb cache on one rank
# takes hours); a barrier on the default group would give up after NCCL's 10 minutes.
RANK0_WAIT_TIMEOUT = timedelta(hours=6)


def rank0_first(fn, what: str):
    """Run fn() on rank 0 while the other ranks wait for it (on a gloo group with RANK0_WAIT_TIMEOUT, not the
    default group's NCCL timeout), then return its result (None on the other ranks). Without torch.distributed,
    just fn()."""
    if not dist.is_initialized():
        return fn()
    group = dist.new_group(backend="gloo", timeout=RANK0_WAIT_TIMEOUT)
    rank = dist.get_rank()
    if rank == 1:
        print(f"rank 1..{dist.get_world_size() - 1}: waiting for rank 0 ({what}; up to "
              f"{RANK0_WAIT_TIMEOUT.total_seconds() / 3600:.0f} h)", flush=True)
    result = fn() if rank == 0 else None
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return result


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def cpu_bf16_support(cpuinfo: str | None = None) -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, torch's CPU capability, e.g. 'AVX2'). Native = an avx512_bf16 or
    amx_bf16 flag (x86) or bf16 feature (Arm) in /proc/cpuinfo; unknown (no /proc/cpuinfo) counts as native, so that
    we never warn without evidence."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return True, capability
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}), capability


_warned_cpu_bf16 = False


def resolve_precision(device_type: str, dtype: str, compile_flag: str = "false"):
    """--dtype auto -> bfloat16 on CUDA, float32 on the CPU; --compile auto -> on CUDA only.
    Returns (dtype, use_compile, autocast context). Warns once when bf16 is asked for on a CPU without native bf16
    (emulated bf16 matmuls there run ~30x slower than float32)."""
    global _warned_cpu_bf16
    dtype = dtype if dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    use_compile = compile_flag == "true" or (compile_flag == "auto" and device_type == "cuda")
    if device_type == "cpu" and dtype == "bfloat16" and not _warned_cpu_bf16:
        native, capability = cpu_bf16_support()
        if not native:
            _warned_cpu_bf16 = True
            print0(f"warning: --dtype bfloat16 on a CPU without native bf16 (capability {capability}): expect ~30x "
                   f"slower than float32", file=sys.stderr)
    return dtype, use_compile, autocast_ctx(device_type, dtype)


def use_compile_cache() -> str:
    """Inductor's on-disk caches (compiled graphs, AOT autograd) under the base dir, so a second run of the same
    shapes skips most of the compile (docs/performance.md: cold vs warm). An explicit $TORCHINDUCTOR_CACHE_DIR
    wins. Returns the directory."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(get_base_dir(), "torchinductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def compile_model(model, use_compile: bool, dynamic: bool | None, backend="inductor"):
    """The forward an entry point runs (--compile): torch.compile(model, dynamic=dynamic) when asked, else the model
    itself. The compiled module shares the model's parameters and forwards attribute access to it (config, gate
    setters). dynamic: False for fixed shapes (pretraining), True where every batch has its own length (fine-tuning
    rows, RL scoring), None (PyTorch's automatic: static first, dynamic once a shape changes) for callers with both
    (evaluation: fixed-length bpb batches, then variable-length choices). Generation keeps the eager model (the
    KV cache is the engine's: nanochat.engine.Engine(compile=True)). backend: torch.compile's (tests: aot_eager)."""
    if not use_compile:
        return model
    use_compile_cache()
    return torch.compile(model, dynamic=dynamic, backend=backend)


def autocast_ctx(device_type: str, dtype: str):
    """bf16 autocast on request (default on CUDA); fp32 means no autocast."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# logging

class DummyWandb:
    """Stands in for a wandb run when logging is off (the default) or on non-master ranks."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run_name: str, project: str, config: dict, master: bool):
    """wandb only when asked for (run name other than 'dummy'); never prompts for a login."""
    if run_name == "dummy" or not master or os.environ.get("WANDB_MODE") == "disabled":
        return DummyWandb()
    import wandb
    try:
        return wandb.init(project=project, name=run_name, config=config)
    except Exception as e:  # noqa: BLE001 -- wandb raises many types; a missing key must not kill training
        raise UserError(f"wandb could not start for --run {run_name!r}: {e}. Set WANDB_MODE=offline to log "
                        f"locally, or use --run dummy to disable wandb.") from e


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm progress bar on rank 0 of long loops (evaluation, data, pretokenization). Quiet under CI
    (NANOCHAT_CI=1) and, tqdm's default, when the output is not a terminal."""
    from tqdm import tqdm
    disable = True if (not is_master() or os.environ.get("NANOCHAT_CI") == "1") else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True)


class WriteError(UserError):
    """A results file that cannot be written (a full, read-only or missing disk): one line naming the path and the
    errno, `cannot write /x/metrics.jsonl: [Errno 28] No space left on device`, never a traceback."""

    def __init__(self, path: str, error: OSError, hint: str = ""):
        self.path, self.error = path, error
        why = f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)
        super().__init__(f"cannot write {path}: {why}" + (f"; {hint}" if hint else ""))


def writes_results(fn):
    """The one error path of every writer of results files (fn(path, ...)): an OSError becomes a WriteError naming
    the path and the errno, and the writer's `<path>.tmp` (an atomic write cut short) is removed, so a full disk
    leaves no half-written file behind."""
    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except OSError as e:
            try:
                os.remove(str(path) + ".tmp")
            except OSError:
                pass
            raise WriteError(str(path), e) from None
    return wrapper


@writes_results
def atomic_write_text(path: str, text: str):
    """A reader (or a kill) never sees a half-written file: write a .tmp, then rename it over the old one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def check_writable(folder: str, flag: str = "--results-dir"):
    """Refuse, before any compute, a results folder that cannot be written: not a directory, read-only, or a full
    disk (a probe file is written, synced and removed). A folder this creates is removed again on refusal."""
    folder = os.path.abspath(folder)
    missing = folder
    while missing and not os.path.exists(os.path.dirname(missing)) and os.path.dirname(missing) != missing:
        missing = os.path.dirname(missing)  # the topmost folder makedirs would create
    created = not os.path.exists(folder)
    probe = os.path.join(folder, f".write_probe.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        if os.path.isfile(probe):
            os.remove(probe)
        if created and os.path.isdir(missing):
            shutil.rmtree(missing, ignore_errors=True)
        raise WriteError(folder, e, f"the results go there: free space, fix its permissions or choose another "
                                    f"{flag} (nothing was computed)") from None


def check_writable_on_all_ranks(folder: str, master: bool, device, flag: str = "--results-dir"):
    """check_writable on rank 0 (the one writer), with every rank told the outcome so a refused torchrun run stops
    on all of them instead of leaving them waiting at the next collective."""
    error = None
    if master:
        try:
            check_writable(folder, flag)
        except WriteError as e:
            error = e
    if dist.is_initialized():
        flag_t = torch.tensor([1 if error else 0], device=device)
        dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
        if flag_t.item() and error is None:
            raise UserError(f"rank 0 cannot write {folder} (its message is above)")
    if error:
        raise error


@writes_results
def append_jsonl(path: str, record: dict, sync: bool = False):
    """Append one record as one line. A file whose last line was cut short (a kill or a full disk mid-append) gets
    its newline first, so the new record is a line of its own instead of being glued onto the partial one.
    sync: on disk (fsync) before this returns (a record of finished work: nanochat.run_records)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "ab+") as f:  # appends go to the end; the read checks the last byte
        prefix = b""
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
        f.write(prefix + (json.dumps(record) + "\n").encode())
        if sync:
            f.flush()
            os.fsync(f.fileno())


def doc_summary(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph as one line (the first line alone can end
    mid-sentence)."""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


_DIST_TIMEOUT = [0.0]  # compute_init's --dist-timeout, for peer_failure's message
_GLOO_SOURCE = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ")  # gloo's "[.../pair.cc:537] " prefix


def silent_ranks(wait: float) -> list[int]:
    """After a collective timed out: the ranks that do not answer through the rendezvous store (a separate
    connection) within `wait` seconds -- each rank that is still alive marks itself there. [] when it cannot tell.
    The store is asked from a daemon thread: its host may be the frozen node, and a store query waits for its
    answer without a timeout, so this returns after `wait` (+1 s) whatever the store does."""
    import threading
    answer = []

    def ask():
        try:
            store = dist.distributed_c10d._get_default_store()
            rank, world = dist.get_rank(), dist.get_world_size()
            store.set(f"nanochat_answering/{rank}", "1")
            deadline = time.monotonic() + wait
            while True:
                silent = [r for r in range(world) if not store.check([f"nanochat_answering/{r}"])]
                if not silent or time.monotonic() > deadline:
                    answer.append(silent)
                    return
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 -- the store may be gone too (its host's node is down): say what we know
            return
    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(wait + 1)
    return answer[0] if answer else []


def peer_failure(e: BaseException) -> str | None:
    """The one line for a collective that failed because another rank froze or died (gloo/NCCL errors: a timeout,
    a reset connection), naming the silent rank when the store can tell; None for any other error."""
    if not dist.is_initialized() or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    timed_out = "timed out" in text.lower() or "timeout" in text.lower()
    lost = any(k in text for k in ("Connection reset", "Connection closed", "Broken pipe", "Connection refused",
                                   "ProcessGroupNCCL", "NCCL communicator was aborted"))
    if not (timed_out or lost or isinstance(e, getattr(dist, "DistError", ()))):
        return None
    cause = _GLOO_SOURCE.sub("", text.splitlines()[0]).split(". This is typically")[0]
    me = dist.get_rank()
    if timed_out:
        silent = silent_ranks(min(10.0, max(2.0, _DIST_TIMEOUT[0] or 10.0)))
        who = f"rank {', '.join(map(str, silent))}" if silent else "a peer rank"
        limit = f"--dist-timeout {_DIST_TIMEOUT[0]:g} s" if _DIST_TIMEOUT[0] else "torch's default timeout"
        return (f"rank {me}: {who} stopped answering (frozen, or its node is down) for {limit}; stopping. Continue "
                f"from the last checkpoint with --resume (cause: {cause})")
    return (f"rank {me}: lost the connection to a peer rank (killed, or its node went down); stopping. Continue "
            f"from the last checkpoint with --resume (cause: {cause})")


def run_main(main):
    """Run a script's main(); a UserError prints one clear line (no traceback) and exits with status 2; a peer rank
    that froze or died (peer_failure) one line too, exit status 1."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:
        line = peer_failure(e)
        if line is None:
            raise
        sys.stdout.flush()
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: destroying a process group whose peer is gone can hang
