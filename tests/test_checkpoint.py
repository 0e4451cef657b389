"""Checkpoint round trip, integrity checks, retention and atomicity."""
import json
import os

import pytest
import torch

from nanochat.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, load_model,
                                 resolve_checkpoint, save_checkpoint)
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import setup_optimizers

CFG = GPTConfig(sequence_len=16, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)


def trained_model():
    torch.manual_seed(0)
    model = GPT(CFG)
    model.init_weights()
    opts = setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
                            weight_decay=0.0, ns_dtype=torch.float32)
    x = torch.randint(0, 128, (2, 16))
    for _ in range(3):
        model(x, x).backward()
        for o in opts:
            o.step()
        model.zero_grad()
    return model, opts


def save(root, step, model, opts, keep=2):
    meta = {"model_config": CFG.to_dict(), "loader_state": {"rows_consumed": step}}
    return save_checkpoint(str(root), step, model, opts, meta, keep=keep, rng_state={"torch": torch.get_rng_state()})


def test_round_trip_identical_logits_and_optimizer(tmp_path):
    model, opts = trained_model()
    path = save(tmp_path, 3, model, opts)
    loaded, meta = load_model(path)
    x = torch.randint(0, 128, (2, 16))
    assert torch.equal(model(x), loaded(x))
    _, optim_payload, meta = load_checkpoint(path)
    assert meta["step"] == 3 and meta["loader_state"] == {"rows_consumed": 3}
    fresh_model, fresh_opts = trained_model()
    for opt, state in zip(fresh_opts, optim_payload["optimizers"]):
        opt.load_state_dict(state)
    muon_state = fresh_opts[1].state_dict()["state"]
    assert all(torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(muon_state.values(), opts[1].state_dict()["state"].values()))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    model, opts = trained_model()
    path = save(tmp_path, 1, model, opts)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    payload = os.path.join(path, "optim.pt")
    torch.save({"optimizers": [], "rng": {}, "evil": Evil()}, payload)
    meta = json.load(open(os.path.join(path, "meta.json")))
    from nanochat.checkpoint import _sha256, meta_digest
    meta["files"]["optim.pt"] = {"bytes": os.path.getsize(payload), "sha256": _sha256(payload)}
    meta["meta_sha256"] = meta_digest(meta)  # an attacker who also rewrites meta.json's own checksum
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_corrupted_checkpoint_is_named_and_previous_stays_usable(tmp_path, damage):
    model, opts = trained_model()
    good = save(tmp_path, 1, model, opts)
    bad = save(tmp_path, 2, model, opts)
    weights = os.path.join(bad, "model.safetensors")
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif damage == "flip":
        with open(weights, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "delete":
        os.remove(weights)
    else:
        with open(os.path.join(bad, "meta.json"), "w") as f:
            f.write("{not json")
    with pytest.raises(UserError, match="step_000002"):
        load_checkpoint(bad)
    loaded, _ = load_model(good)  # the previous checkpoint is intact
    x = torch.randint(0, 128, (1, 16))
    assert torch.equal(loaded(x), model(x))


def test_keep_last_k_and_tmp_dirs_ignored(tmp_path):
    model, opts = trained_model()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opts, keep=2)
    os.makedirs(tmp_path / "step_000005.tmp")  # a crash mid-write leaves only a .tmp folder
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["step_000003", "step_000004"]
    assert latest_checkpoint(str(tmp_path)).endswith("step_000004")


def test_missing_checkpoint_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint for model tag 'nope'"):
        resolve_checkpoint("nope")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing"))
