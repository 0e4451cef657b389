"""Checkpoints: safetensors weights + JSON metadata + optimizer state, written atomically.

Layout: <base_dir>/checkpoints/<model_tag>/step_<NNNNNN>/
    model.safetensors   weights (no pickle on load)
    optim.pt            optimizer states and RNG states, loaded with torch.load(weights_only=True)
    meta.json           model config, resolved run config, step, data position, seed, git commit,
                        and the size + sha256 of the two files above (written last)
A checkpoint is written into step_<N>.tmp/ and renamed into place, so a crash mid-write never leaves a
half-written step_<N>/; a truncated or altered file is caught by the recorded sha256 on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanochat.common import UserError, get_base_dir

STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_root(model_tag: str) -> str:
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


def save_checkpoint(root: str, step: int, model: torch.nn.Module, optimizers, meta: dict, keep: int = 2,
                    rng_state: dict | None = None) -> str:
    """Write step_<step>/ atomically, then delete all but the newest `keep` checkpoints. Returns its path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"))
    torch.save({"optimizers": [opt.state_dict() for opt in optimizers], "rng": rng_state or {}},
               os.path.join(tmp, "optim.pt"))
    files = {}
    for name in ("model.safetensors", "optim.pt"):
        path = os.path.join(tmp, name)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "step": step, "files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
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
