"""The NS ablation harness: records, resume after an interruption, divergence handling, bad input."""
from __future__ import annotations

import json

import pytest

from nanochat.common import UserError
from nanochat.run_records import read_records

# the smallest model that still trains: 1 layer x 64 wide, 32-token rows, 3 steps
FAST = ["--preset", "tiny", "--depth", "1", "--seq-len", "32", "--batch-size", "2", "--steps", "3",
        "--eval-batches", "2"]


def runs(out_dir) -> list[dict]:
    with open(out_dir / "runs.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_interrupted_run_resumes_and_skips_finished_variants(tiny_base_dir, tmp_path, monkeypatch):
    from scripts import ns_ablation

    argv = FAST + ["--variants", "baseline,fewer-iter,handover8", "--out-dir", str(tmp_path)]
    real_train = ns_ablation.train_variant
    calls = []

    def interrupted(variant, *a, **kw):  # the second variant is "killed" mid-run
        calls.append(variant.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(variant, *a, **kw)

    monkeypatch.setattr(ns_ablation, "train_variant", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ns_ablation.main(argv)
    first = runs(tmp_path)
    assert [r["variant"] for r in first] == ["baseline"]
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"variant": "fewer-iter", "val_lo')  # a torn write from the crash is ignored, not fatal

    calls.clear()

    def counting(variant, *a, **kw):
        calls.append(variant.name)
        return real_train(variant, *a, **kw)

    monkeypatch.setattr(ns_ablation, "train_variant", counting)
    ns_ablation.main(argv)
    assert calls == ["fewer-iter", "handover8"]  # baseline was not trained again
    done = read_records(str(tmp_path / "runs.jsonl"))
    assert [r["variant"] for r in done] == ["baseline", "fewer-iter", "handover8"]
    assert done[0] == first[0]  # the recorded baseline is untouched
    for r in done:
        assert r["status"] == "ok" and r["steps_done"] == 3
        assert 0 < r["val_loss"] < 10 and 0 <= r["val_accuracy"] <= 1
        assert r["val_perplexity"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    # NS quality: handover8 is near-exact over s in [1e-3, 1], the 3-step quintic is not
    h8 = done[2]["band_interval"]
    assert abs(h8[0] - 1) < 2e-3 and abs(h8[1] - 1) < 2e-3
    assert done[1]["band_interval"][0] < 0.1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["variant"] for r in summary["ranked"]] == sorted(
        ["baseline", "fewer-iter", "handover8"], key=lambda v: next(r["val_loss"] for r in done if r["variant"] == v))
    assert "| 1 |" in (tmp_path / "summary.md").read_text()

    calls.clear()
    ns_ablation.main(argv + ["--force", "--variants", "fewer-iter"])  # --force redoes only what is selected
    assert calls == ["fewer-iter"]
    assert sorted(r["variant"] for r in runs(tmp_path)) == ["baseline", "fewer-iter", "handover8"]


def test_diverging_variant_is_recorded_and_the_harness_goes_on(tiny_base_dir, tmp_path):
    from scripts.ns_ablation import main

    # (1e30, 0, 0) multiplies the update by 1e30 per step: inf in fp32 after two steps, so the weights go NaN
    main(FAST + ["--variants", "baseline", "--extra-variant", "explode=1e30,0,0", "--out-dir", str(tmp_path)])
    by_name = {r["variant"]: r for r in runs(tmp_path)}
    assert list(by_name) == ["baseline", "explode"]  # the run went on past the diverging variant
    assert by_name["explode"]["status"] == "diverged" and by_name["explode"]["diverged"]
    assert by_name["explode"]["val_loss"] is None and by_name["explode"]["band_interval"] is None
    assert by_name["baseline"]["status"] == "ok"
    md = (tmp_path / "summary.md").read_text()
    assert "diverged at step" in md
    ranked = json.loads((tmp_path / "summary.json").read_text())["ranked"]
    assert [r["variant"] for r in ranked] == ["baseline", "explode"]  # diverged runs rank last


def test_bad_input(tiny_base_dir, tmp_path):
    from scripts.ns_ablation import main

    with pytest.raises(UserError, match="unknown nope"):
        main(FAST + ["--variants", "baseline,nope", "--out-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--extra-variant 'x=1,2'.*got 2 values"):
        main(FAST + ["--extra-variant", "x=1,2", "--out-dir", str(tmp_path)])
    with pytest.raises(UserError, match="built-in variant"):
        main(FAST + ["--extra-variant", "baseline=1,2,3", "--out-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--steps must be > 0"):
        main(FAST + ["--steps", "0", "--out-dir", str(tmp_path)])
    (tmp_path / "runs.jsonl").write_text(json.dumps({"variant": "baseline", "settings_hash": "other"}) + "\n")
    with pytest.raises(UserError, match="other settings"):
        main(FAST + ["--variants", "baseline", "--out-dir", str(tmp_path)])
