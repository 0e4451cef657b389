"""Shared utilities: directories, errors, logging, distributed/device setup."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input (flag, file, key, value). Scripts print it without a traceback."""


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


def compute_init(device_type: str = "auto"):
    """Set up the device and (under torchrun) the process group: NCCL on CUDA, gloo on the CPU.

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
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return device_type, device, is_ddp, rank, local_rank, world_size


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


def append_jsonl(path: str, record: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def doc_summary(doc: str) -> str:
    """A script's --help description: its docstring's first paragraph as one line (the first line alone can end
    mid-sentence)."""
    paragraph = doc.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def run_main(main):
    """Run a script's main(); a UserError prints one clear line (no traceback) and exits with status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
