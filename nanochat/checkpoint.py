"""Checkpoints: safetensors weights + JSON metadata + optimizer state, written atomically.

Layout: <base_dir>/checkpoints/<model_tag>/step_<NNNNNN>/
    model.safetensors   weights (no pickle on load)
    optim.pt            optimizer states and RNG states, loaded with torch.load(weights_only=True)
    meta.json           model config, resolved run config, step, data position, seed, git commit,
                        the size + sha256 of the two files above, and its own sha256 (written last)
A checkpoint is written into step_<N>.tmp/ and renamed into place, so a crash mid-write never leaves a
half-written step_<N>/. Re-saving a step moves the old one aside (step_<N>.old/) before the rename, so a crash at
any point leaves a complete checkpoint (recover_interrupted_saves puts it back). Non-finite weights are never
written. On load a truncated or altered file, an edited meta.json or a step that disagrees with its folder name is
caught; latest_intact_checkpoint falls back to the newest checkpoint that passes, and says so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.common import INPUT_NAME_HINT, UserError, check_name, get_base_dir

STEP_DIR = re.compile(r"^step_(\d{6,})$")
ASIDE = ".old"  # a step being re-saved is moved to step_<N>.old/ until its replacement is in place


def warn(msg: str):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def checkpoint_root(model_tag: str, origin: str = "") -> str:
    """<base dir>/checkpoints/<model_tag>. The tag is never a path, wherever it comes from: origin says where a tag
    derived from something else (a checkpoint's meta) came from, for the refusal; without it the tag names a
    checkpoint to read, and a path goes in --checkpoint."""
    check_name("model tag", model_tag, required=True, hint=origin or INPUT_NAME_HINT)
    return os.path.join(get_base_dir(), "checkpoints", model_tag)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str) -> list[str]:
    """Completed checkpoint directories under root, oldest first (unfinished *.tmp dirs are ignored)."""
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def meta_digest(meta: dict) -> str:
    """sha256 of meta.json's content without its own digest (canonical JSON: sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def recover_interrupted_saves(root: str):
    """Undo what a crash mid-save leaves behind: a step_<N>.old/ whose replacement never arrived goes back into
    place; a leftover step_<N>.tmp/ (never complete: the rename is the commit) is removed, with a message."""
    if not os.path.isdir(root):
        return
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(ASIDE) and STEP_DIR.match(name[:-len(ASIDE)]):
            final = path[:-len(ASIDE)]
            if os.path.isdir(final):
                shutil.rmtree(path)
            else:
                os.rename(path, final)
                warn(f"restored {final}: a re-save of that step was interrupted before its replacement was in place")
        elif name.endswith(".tmp") and STEP_DIR.match(name[:-len(".tmp")]):
            shutil.rmtree(path, ignore_errors=True)
            warn(f"removed {path}: an unfinished checkpoint write from an interrupted run")


def _write_checkpoint_files(tmp: str, step: int, weights: dict, optimizers, meta: dict, rng_state: dict | None):
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng_state or {}},
               os.path.join(tmp, "optim.pt"))
    files = {}
    for name in ("model.safetensors", "optim.pt"):
        path = os.path.join(tmp, name)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    full = {**meta, "step": step, "files": files}
    full["meta_sha256"] = meta_digest(full)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(full, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _is_disk_full(e: BaseException) -> bool:
    # torch.save reports ENOSPC as a RuntimeError from its zip writer, safetensors as its own error type
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e) \
        or "enforce fail at inline_container" in str(e)


def save_checkpoint(root: str, step: int, model: torch.nn.Module, optimizers, meta: dict, keep: int = 2,
                    rng_state: dict | None = None) -> str:
    """Write step_<step>/ atomically, then delete all but the newest `keep` checkpoints. Returns its path.
    Refuses non-finite weights (the last good checkpoint stays the newest); a failed write (a full disk) removes
    its partial files and says which path failed and that the previous checkpoints are intact."""
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    bad = non_finite_tensors(weights)
    if bad:
        prev = latest_checkpoint(root)
        raise UserError(f"not saving step {step}: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:3])}"
                        f"{', ...' if len(bad) > 3 else ''}): the run diverged. The last good checkpoint is "
                        f"{prev or '(none)'}; lower the learning rates or resume from it")
    os.makedirs(root, exist_ok=True)
    recover_interrupted_saves(root)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    os.makedirs(tmp)
    try:
        _write_checkpoint_files(tmp, step, weights, optimizers, meta, rng_state)
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(root)
        what = "the disk is full" if _is_disk_full(e) else f"the write failed ({type(e).__name__}: {e})"
        raise UserError(f"cannot write checkpoint {tmp}: {what}. The previous checkpoint "
                        f"{prev or '(none)'} is intact; free space and resume from it") from None
    if os.path.exists(final):  # re-saving the same step: move the old one aside first, never delete it first
        os.rename(final, final + ASIDE)
        _fsync_dir(root)
    os.rename(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(final + ASIDE, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} is incomplete: meta.json is missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"checkpoint {path} is corrupted: meta.json is not valid JSON ({e})") from None
    for key in ("step", "model_config", "files"):
        if key not in meta:
            raise UserError(f"checkpoint {path} is corrupted: meta.json has no {key!r}")
    if "meta_sha256" in meta:
        if meta_digest(meta) != meta["meta_sha256"]:
            raise UserError(f"checkpoint {path} is corrupted: meta.json does not match its recorded sha256 "
                            f"(edited by hand?)")
    else:
        warn(f"checkpoint {path}: meta.json has no checksum (written by an older version); not verified")
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != meta["step"]:
        raise UserError(f"checkpoint {path} is corrupted: meta.json says step {meta['step']}, the folder says "
                        f"{int(m.group(1))}")
    return meta


def verify_checkpoint(path: str, meta: dict, names=("model.safetensors", "optim.pt")):
    """Compare each file's size and sha256 with meta.json; a mismatch names the file and what differs."""
    for name in names:
        fpath = os.path.join(path, name)
        expected = meta["files"].get(name)
        if expected is None:
            raise UserError(f"checkpoint {path} is corrupted: meta.json does not list {name}")
        if not os.path.isfile(fpath):
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing")
        size = os.path.getsize(fpath)
        if size != expected["bytes"]:
            raise UserError(f"checkpoint {path} is corrupted: {name} has {size} bytes, expected "
                            f"{expected['bytes']} (truncated?)")
        if _sha256(fpath) != expected["sha256"]:
            raise UserError(f"checkpoint {path} is corrupted: {name} does not match its recorded sha256")


def load_checkpoint(path: str, device="cpu", load_optimizer: bool = True):
    """Verify and load a checkpoint. Returns (model_state_dict, optimizer_payload or None, meta)."""
    meta = read_meta(path)
    verify_checkpoint(path, meta, ("model.safetensors", "optim.pt") if load_optimizer else ("model.safetensors",))
    try:
        weights = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"checkpoint {path}: model.safetensors cannot be read ({e})") from None
    optim = None
    if load_optimizer:
        try:
            optim = torch.load(os.path.join(path, "optim.pt"), map_location=device, weights_only=True)
        except Exception as e:  # noqa: BLE001 -- torch raises several types for unreadable or unsafe pickles
            raise UserError(f"checkpoint {path}: optim.pt cannot be loaded safely ({e})") from None
    return weights, optim, meta


def latest_checkpoint(root: str) -> str | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def latest_intact_checkpoint(root: str, load_optimizer: bool = True) -> str | None:
    """The newest checkpoint under root that passes its integrity checks (for --resume). A newer one that fails
    is reported, with why, and skipped; when checkpoints exist but none is intact, that is an error -- a resume
    never starts from scratch silently. None only when there is no checkpoint at all."""
    ckpts = list_checkpoints(root)
    names = ("model.safetensors", "optim.pt") if load_optimizer else ("model.safetensors",)
    failures = []
    for path in reversed(ckpts):
        try:
            verify_checkpoint(path, read_meta(path), names)
        except UserError as e:
            failures.append(str(e))
            warn(f"{e}; trying an older checkpoint")
            continue
        if failures:
            warn(f"falling back to {path}, the newest intact checkpoint")
        return path
    if ckpts:
        raise UserError(f"no intact checkpoint in {root}: " + "; ".join(failures) +
                        ". Nothing was overwritten: move the folder aside to start over")
    return None


def resolve_checkpoint(model_tag: str, step: int = -1) -> str:
    """The checkpoint of `model_tag` at `step` (-1 = newest), with an error that lists what exists."""
    root = checkpoint_root(model_tag)
    ckpts = list_checkpoints(root)
    if not ckpts:
        raise UserError(f"no checkpoint for model tag {model_tag!r} in {root}: train one with scripts.base_train "
                        f"(or pass --checkpoint PATH)")
    if step < 0:
        return ckpts[-1]
    path = os.path.join(root, f"step_{step:06d}")
    if path not in ckpts:
        have = ", ".join(os.path.basename(p) for p in ckpts)
        raise UserError(f"model tag {model_tag!r} has no checkpoint at step {step} (have: {have})")
    return path


def check_tokenizer(meta: dict, tokenizer, path: str):
    """A checkpoint is only meaningful with the tokenizer it was trained with (fingerprints in meta.json)."""
    if meta.get("tokenizer") not in (None, tokenizer.fingerprint):
        raise UserError(f"checkpoint {path} was trained with tokenizer {meta['tokenizer']}, but the tokenizer in "
                        f"the base dir is {tokenizer.fingerprint}")


def load_model(path: str, device="cpu"):
    """Rebuild the GPT of a checkpoint and load its weights (for evaluation). Returns (model, meta)."""
    from nanochat.gpt import GPT, GPTConfig  # local import: checkpoint I/O itself does not need the model code

    weights, _, meta = load_checkpoint(path, device=device, load_optimizer=False)
    model = GPT(GPTConfig.from_dict(meta["model_config"])).to(device)
    model.load_state_dict(weights)
    model.eval()
    return model, meta
