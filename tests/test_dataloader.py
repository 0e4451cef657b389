"""Packing loader: BOS-aligned rows, world-size independent global stream, exact resume, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nanochat.common import UserError
from nanochat.dataloader import PackedLoader, pack_window

B, T = 4, 64
WINDOW = 200  # small windows, so the tiny train split has many of them (window order matters)


def make(tiny, split="train", **kw):
    args = dict(batch_size=B, seq_len=T, window_docs=WINDOW)
    args.update(kw)
    return PackedLoader(str(tiny.token_dir), split, **args)


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_pack_window_best_fit():
    rows = pack_window(np.array([5, 3, 9, 2, 4]), 8)
    # row 1: longest fitting (5), then 3 fills it; row 2: 4, then 2, then nothing fits -> crop the 9 to 2
    assert rows == [[(0, 5), (1, 3)], [(4, 4), (3, 2), (2, 2)]]
    for row in rows:
        assert sum(n for _, n in row) == 8
    assert pack_window(np.array([3, 2]), 8) == []  # partial final row is dropped


def test_rows_start_with_bos_and_shift(tiny_base_dir):
    bos = tiny_base_dir.tokenizer.bos_token_id
    loader = make(tiny_base_dir)
    for x, y in batches(loader, 20):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all()
        assert torch.equal(x[:, 1:], y[:, :-1])
    # rows decode to text that appears in the source documents
    text = tiny_base_dir.tokenizer.decode(x[0].tolist()).split("<|bos|>")[1]
    assert text and text[:40] in "\n".join(open_docs(tiny_base_dir))


def open_docs(tiny):
    from nanochat.dataset import iter_documents
    return list(iter_documents("local", "train"))


def test_ranks_partition_the_global_batch(tiny_base_dir):
    single = make(tiny_base_dir)
    r0 = make(tiny_base_dir, rank=0, world_size=2)
    r1 = make(tiny_base_dir, rank=1, world_size=2)
    for _ in range(5):
        a, b = single.next_batch(), single.next_batch()  # one 2-micro-batch step of the 1-rank run
        x0, y0 = r0.next_batch()
        x1, y1 = r1.next_batch()
        assert torch.equal(x0, a[0]) and torch.equal(y0, a[1])
        assert torch.equal(x1, b[0]) and torch.equal(y1, b[1])
        assert not {tuple(r) for r in x0.tolist()} & {tuple(r) for r in x1.tolist()}
    assert r0.state_dict() == r1.state_dict() == single.state_dict() == {"rows_consumed": 5 * 2 * B, "epoch": 0}


def test_resume_exact(tiny_base_dir):
    loader = make(tiny_base_dir)
    batches(loader, 7)
    sd = loader.state_dict()
    expected = batches(loader, 3)
    fresh = make(tiny_base_dir)
    fresh.load_state_dict(sd)
    for (x, y), (ex, ey) in zip(batches(fresh, 3), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    # a 2-rank loader resumes from a 1-rank state: its rank-0 rows are the next global rows
    r0 = make(tiny_base_dir, rank=0, world_size=2)
    r0.load_state_dict(sd)
    assert torch.equal(r0.next_batch()[0], expected[0][0])


def test_epoch_boundary_and_resume(tiny_base_dir):
    loader = make(tiny_base_dir)
    n = loader.rows_per_epoch
    assert n > 10 * B
    loader.load_state_dict({"epoch": 0, "rows_consumed": n - B - 1})  # next-but-one batch straddles the boundary
    loader.next_batch()
    sd_before = loader.state_dict()
    straddle = loader.next_batch()
    assert loader.state_dict() == {"epoch": 1, "rows_consumed": B - 1}
    after = loader.next_batch()
    fresh = make(tiny_base_dir)
    fresh.load_state_dict(sd_before)
    assert torch.equal(fresh.next_batch()[0], straddle[0])
    fresh2 = make(tiny_base_dir)
    fresh2.load_state_dict({"epoch": 1, "rows_consumed": B - 1})
    assert torch.equal(fresh2.next_batch()[0], after[0])
    # a state at the very end of an epoch equals the start of the next one
    a, b = make(tiny_base_dir), make(tiny_base_dir)
    a.load_state_dict({"epoch": 0, "rows_consumed": n})
    b.load_state_dict({"epoch": 1, "rows_consumed": 0})
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(UserError, match="rows_consumed"):
        a.load_state_dict({"epoch": 0, "rows_consumed": n + 1})


def test_epochs_differ_and_val_wraps(tiny_base_dir):
    train = make(tiny_base_dir)
    first = train.next_batch()[0]
    train.load_state_dict({"epoch": 1, "rows_consumed": 0})
    assert not torch.equal(train.next_batch()[0], first)  # epoch 1 has its own window order
    val = make(tiny_base_dir, split="val")
    steps = val.rows_per_epoch // B
    assert steps > 2
    first_val = val.next_batch()[0]
    batches(val, steps - 1)
    # val order is fixed: after wrapping, the next epoch starts with the same rows when rows_per_epoch % B == 0
    fresh = make(tiny_base_dir, split="val")
    fresh.load_state_dict({"epoch": 5, "rows_consumed": 0})
    assert torch.equal(fresh.next_batch()[0], first_val)
    assert val.state_dict()["epoch"] in (0, 1)


def test_determinism_and_seed(tiny_base_dir):
    a, b, c = make(tiny_base_dir, seed=0), make(tiny_base_dir, seed=0), make(tiny_base_dir, seed=1)
    xa = torch.cat([x for x, _ in batches(a, 5)])
    xb = torch.cat([x for x, _ in batches(b, 5)])
    xc = torch.cat([x for x, _ in batches(c, 5)])
    assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_errors(tiny_base_dir, tmp_path):
    with pytest.raises(UserError, match="pretokenize"):
        PackedLoader(str(tmp_path / "nope"), "train", B, T)
    with pytest.raises(UserError, match="batch size"):
        make(tiny_base_dir, batch_size=0)
    with pytest.raises(UserError, match="sequence length"):
        make(tiny_base_dir, seq_len=0)
    with pytest.raises(UserError, match="split"):
        make(tiny_base_dir, split="test")
    with pytest.raises(UserError, match="too small"):
        make(tiny_base_dir, split="val", seq_len=10_000_000).next_batch()
