"""Shared pytest fixtures. Data fixtures: `shared_data_dir`, `tiny_base_dir` (a built local source, a small
tokenizer and its pretokenized shards in a temporary NANOCHAT_BASE_DIR)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

TINY_VOCAB_SIZE = 1024  # small enough to train in well under a second, big enough to merge common words
TINY_TOKENIZER_DOCS = 3000  # subset of the train docs used to train the test tokenizer


@pytest.fixture
def one_thread():
    """Tiny models: threads only add synchronisation, which is ruinous on a busy 2-core box. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def skip_or_fail(reason: str):
    """Skip when running tests by hand; under CI (NANOCHAT_CI=1, set by .ci/run) a missing requirement is a failure,
    never a silent skip."""
    if os.environ.get("NANOCHAT_CI") == "1":
        pytest.fail(f"{reason} -- required under CI (NANOCHAT_CI=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Local data copies: $NANOCHAT_DATA_DIR, else <repo>/../shared/data; skip (fail under CI) if neither exists."""
    env = os.environ.get("NANOCHAT_DATA_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "gsm8k" / "train.jsonl").is_file():
        skip_or_fail(f"shared data not found at {path} (set NANOCHAT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def harness() -> Path:
    """lm-evaluation-harness (the [harness] extra): its tasks folder. Skip (fail under CI) when not installed."""
    try:
        import lm_eval
    except ImportError:
        skip_or_fail("lm-eval is not installed (pip install -e '.[harness]')")
    return Path(lm_eval.__file__).parent / "tasks"


@dataclass
class TinyBase:
    base_dir: Path  # NANOCHAT_BASE_DIR used while the fixture is alive
    data_dir: Path
    tokenizer_dir: Path
    token_dir: Path  # pretokenized local source
    tokenizer: object


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, shared_data_dir):
    """Build the local source, train a vocab-1024 tokenizer on a subset, pretokenize; restore the env afterwards."""
    from nanochat.dataset import build_local, iter_documents, pretokenize, tokenized_dir
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

    base = tmp_path_factory.mktemp("nanochat_base")
    saved = {k: os.environ.get(k) for k in ("NANOCHAT_BASE_DIR", "NANOCHAT_DATA_DIR")}
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    os.environ["NANOCHAT_DATA_DIR"] = str(shared_data_dir)
    try:
        build_local(seed=0, val_fraction=0.05)
        docs = itertools.islice(iter_documents("local", "train"), TINY_TOKENIZER_DOCS)
        tok = Tokenizer.train(docs, TINY_VOCAB_SIZE)
        tok.save(get_tokenizer_dir())
        pretokenize("local", tok, num_workers=2)
        yield TinyBase(base_dir=base, data_dir=shared_data_dir, tokenizer_dir=Path(get_tokenizer_dir()),
                       token_dir=Path(tokenized_dir("local", tok)), tokenizer=tok)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_mhc_checkpoint(tiny_base_dir):
    """A small random-init mHC checkpoint (2 layers, width 64, context 128) saved as base_train saves one, with the
    test tokenizer: for the RL env, fine-tuning and the gate sweep. Its logits are O(1) (lm_head scaled up) so that
    the gates visibly change the model's answers."""
    import torch

    from nanochat.checkpoint import checkpoint_root, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.mhc import MHCConfig

    tok = tiny_base_dir.tokenizer
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                    out_proj_init_scale=1.0, mhc=MHCConfig(enabled=True))
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    meta = dict(model_config=cfg.to_dict(), tokenizer=tok.fingerprint, seed=0,
                run_config=dict(model_tag="test_mhc", train=dict(data_source="local", seed=0)))
    return Path(save_checkpoint(checkpoint_root("test_mhc"), 1, model, [], meta))


@pytest.fixture(scope="session")
def tiny_baseline_checkpoint(tiny_base_dir):
    """The same small model without mHC."""
    import torch

    from nanochat.checkpoint import checkpoint_root, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=128, vocab_size=tiny_base_dir.tokenizer.vocab_size, n_layer=2, n_head=2,
                    n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    meta = dict(model_config=cfg.to_dict(), tokenizer=tiny_base_dir.tokenizer.fingerprint, seed=0,
                run_config=dict(model_tag="test_baseline", train=dict(data_source="local", seed=0)))
    return Path(save_checkpoint(checkpoint_root("test_baseline"), 1, model, [], meta))


class FullDisk:
    """An injected disk fault for one folder (tests run as root, which a chmod'ed read-only folder does not stop):
    every open-for-writing of a file under `folder` goes through builtins.open (json.dump, append_jsonl, the atomic
    writers); after `after` successful write() calls to files named `name` (any file when None) the disk is full:
    from then on every write under the folder raises OSError(`err`) -- at write() for ENOSPC, as a real full disk
    (the open succeeds), at open() for EROFS. `after=0`: unwritable from the start."""

    def __init__(self, monkeypatch, folder, err: int = 28, after: int = 0, name: str | None = None):
        import builtins
        self.folder, self.err, self.after, self.name = os.path.realpath(folder), err, after, name
        self.count, self.full = 0, after == 0 and name is None
        real_open = builtins.open
        disk = self

        class Faulty:
            def __init__(self, f, path):
                self._f, self._path = f, path

            def write(self, data):
                disk.on_write(self._path)
                return self._f.write(data)

            def writelines(self, lines):
                for line in lines:
                    self.write(line)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

            def __iter__(self):
                return iter(self._f)

            def __getattr__(self, attr):
                return getattr(self._f, attr)

        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)) and \
                    os.path.realpath(os.path.abspath(file)).startswith(disk.folder + os.sep):
                if disk.full and disk.err != 28:
                    raise OSError(disk.err, os.strerror(disk.err), str(file))
                return Faulty(real_open(file, mode, *args, **kwargs), str(file))
            return real_open(file, mode, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", fake_open)

    def on_write(self, path: str):
        if not self.full and (self.name is None or os.path.basename(path) == self.name):
            self.count += 1
            self.full = self.count > self.after
        if self.full:
            raise OSError(self.err, os.strerror(self.err))


@pytest.fixture
def full_disk(monkeypatch):
    """FullDisk(folder, err=errno, after=N, name=file name) for this test (undone afterwards)."""
    return lambda folder, **kw: FullDisk(monkeypatch, folder, **kw)
