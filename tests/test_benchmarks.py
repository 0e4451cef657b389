"""The benchmark scripts run and write their JSON (no timing assertions: figures are measured, not tested)."""
import json

from benchmarks import mhc_overhead, train_throughput

TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "32", "--seq-len", "16", "--batch-size", "2",
        "--vocab-size", "300", "--warmup", "0", "--steps", "2"]


def test_train_throughput_writes_json(tmp_path):
    out = tmp_path / "tt.json"
    train_throughput.main(TINY + ["--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"float32", "bfloat16", "bf16_speedup"}
    assert record["results"]["float32"]["tok_per_sec"] > 0 and len(record["results"]["float32"]["step_times_s"]) == 2


def test_mhc_overhead_writes_json(tmp_path):
    out = tmp_path / "mo.json"
    mhc_overhead.main(TINY + ["--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert results["num_params"]["mhc"] > results["num_params"]["baseline"]
    assert results["param_overhead_pct"] > 0 and results["step_time_ratio"] > 0
    assert results["peak_memory_mib"]["baseline"] > 0 and results["peak_memory_ratio"] > 0
    assert set(results["sinkhorn"]["fwd_bwd_ms"]) == {"fast", "log_reference"} and results["sinkhorn"]["speedup"] > 0


def test_rl_env_throughput_writes_json(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from benchmarks import rl_env_throughput
    out = tmp_path / "rl.json"
    rl_env_throughput.main(["--checkpoint", str(tiny_mhc_checkpoint), "--steps", "8", "--repeats", "1",
                            "--num-envs", "4", "--max-new-tokens", "4", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"dense", "exact"}
    for r in results.values():
        assert r["single_env_steps_per_s"] > 0 and r["vec_env_steps_per_s"] > 0 and r["speedup"] > 0
