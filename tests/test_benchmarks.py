"""The benchmark scripts run and write JSON whose figures agree with each other (no timing assertions: figures
are measured, not tested)."""
import json

import pytest

from benchmarks import mhc_overhead, train_throughput
from nanochat.common import UserError

TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16", "--batch-size", "2",
        "--vocab-size", "300", "--warmup", "0", "--steps", "2"]


def test_train_throughput_writes_json(tmp_path):
    out = tmp_path / "tt.json"
    train_throughput.main(TINY + ["--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"float32", "bfloat16", "bf16_speedup"}
    import statistics
    r = record["results"]["float32"]
    assert len(r["step_times_s"]) == 2 and r["median_step_s"] == statistics.median(r["step_times_s"])
    assert r["tok_per_sec"] == pytest.approx(2 * 16 / r["median_step_s"])  # --batch-size 2 x --seq-len 16
    assert record["results"]["bf16_speedup"] == pytest.approx(r["median_step_s"] /
                                                              record["results"]["bfloat16"]["median_step_s"])


def test_mhc_overhead_writes_json(tmp_path):
    out = tmp_path / "mo.json"
    mhc_overhead.main(TINY + ["--out", str(out)])
    results = json.loads(out.read_text())["results"]
    import statistics
    params, mem, med = results["num_params"], results["peak_memory_mib"], results["median_step_s"]
    assert params["mhc"] > params["baseline"]
    assert results["param_overhead_pct"] == pytest.approx(100 * (params["mhc"] - params["baseline"]) / params["baseline"])
    assert mem["baseline"] > 50 and results["peak_memory_ratio"] == pytest.approx(mem["mhc"] / mem["baseline"])
    for name in ("baseline", "mhc"):
        assert med[name] == statistics.median(results["step_times_s"][name])
    ratios = [m / b for m, b in zip(results["step_times_s"]["mhc"], results["step_times_s"]["baseline"])]
    assert results["step_time_ratio"] == pytest.approx(statistics.median(ratios))
    sk = results["sinkhorn"]
    assert sk["speedup"] == pytest.approx(sk["fwd_bwd_ms"]["log_reference"] / sk["fwd_bwd_ms"]["fast"])


def test_rl_env_throughput_writes_json(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from benchmarks import rl_env_throughput
    out = tmp_path / "rl.json"
    rl_env_throughput.main(["--checkpoint", str(tiny_mhc_checkpoint), "--steps", "8", "--repeats", "1",
                            "--num-envs", "4", "--max-new-tokens", "4", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dense", "exact"}
    for r in results.values():
        lo, hi = r["speedup_range"]
        assert lo <= r["speedup"] <= hi and r["single_env_steps_per_s"] > 0  # one repeat: lo == speedup == hi
        assert r["speedup"] == pytest.approx(r["vec_env_steps_per_s"] / r["single_env_steps_per_s"])


def test_ngpt_step_writes_json(tmp_path):
    from benchmarks import ngpt_step
    out = tmp_path / "ngpt.json"
    ngpt_step.main(["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16",
                    "--batch-size", "2", "--vocab-size", "256", "--rounds", "3", "--warmup", "1", "--lazy-proj-freq", "3",
                    "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    import statistics
    assert set(results["step_times_s"]) == {"gpt", "ngpt_every_step", "ngpt_every_3"}
    med = results["median_step_s"]
    for name, times in results["step_times_s"].items():
        assert len(times) == 3 and med[name] == statistics.median(times)
    assert results["ngpt_vs_gpt"] == pytest.approx(med["ngpt_every_step"] / med["gpt"])
    assert results["lazy_vs_every_step"] == pytest.approx(med["ngpt_every_3"] / med["ngpt_every_step"])
    with pytest.raises(UserError, match="--lazy-proj-freq"):
        ngpt_step.main(["--lazy-proj-freq", "0", "--out", str(out)])
