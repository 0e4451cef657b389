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


def test_memory_estimate_writes_json_for_a_named_config(tmp_path):
    from benchmarks import memory_estimate
    from nanochat.memory import GIB
    out = tmp_path / "me.json"
    memory_estimate.main(["--config", "tiny_cpu_mhc", "--vocab-size", "512", "--dtype", "float32",
                          "--device-batch-size", "2", "--gpu-memory-gib", "4", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    by_mode = results["by_mode"]
    assert set(by_mode) == {"off", "mhc", "full"} and results["device_batch_size"] == 2
    assert by_mode["off"]["peak"] > by_mode["mhc"]["peak"] > by_mode["full"]["peak"]
    assert all(r["fits"] == (r["peak"] <= results["budget_bytes"]) for r in by_mode.values())
    assert results["budget_bytes"] < 4 * GIB


def test_checkpointing_and_traffic_write_json(tmp_path):
    from benchmarks import checkpointing, mhc_traffic
    out = tmp_path / "ck.json"
    checkpointing.main(TINY + ["--mhc", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    import statistics
    assert set(results["time_ratio_vs_off"]) == {"off", "mhc", "full"} and results["time_ratio_vs_off"]["off"] == 1
    for mode, times in results["step_time_s"].items():
        ratios = [t / o for t, o in zip(times, results["step_time_s"]["off"])]
        assert results["time_ratio_vs_off"][mode] == pytest.approx(statistics.median(ratios))
    out = tmp_path / "tr.json"
    mhc_traffic.main(["--depth", "2", "--head-dim", "32", "--seq-len", "32", "--batch-size", "2", "--vocab-size",
                      "300", "--out", str(out)])
    r = json.loads(out.read_text())["results"]
    assert r["excess_bytes"] == r["bytes"]["mhc"] - r["bytes"]["baseline"] > 0
    assert r["excess_passes_per_sublayer"] == pytest.approx(r["excess_bytes"] / (r["stream_pass_bytes"] * 4))


@pytest.mark.slow
def test_gpu_check_script_runs_its_stages_on_the_cpu(tmp_path, shared_data_dir):
    """scripts/gpu_check.sh with SMOKE=1: every stage of the GPU acceptance check at a tiny scale, so the script a
    GPU session runs is known to work (its GPU-only pytest stage aside)."""
    import os
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "RESULTS_DIR": str(tmp_path), "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "NANOCHAT_DATA_DIR": str(shared_data_dir)}
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check" / "summary.json").read_text())
    assert set(summary) == {"baseline", "mhc", "mhc_eager"}
    assert all(s["steps"] == 3 and s["estimate"]["peak"] > 0 for s in summary.values())
    assert (tmp_path / "gpu_check" / "mhc_overhead.json").is_file()


@pytest.mark.slow  # ~40 s: every section compiles (aot_eager) twice per architecture
def test_gpu_acceptance_smoke_runs_every_section_on_the_cpu(tmp_path, monkeypatch):
    """`python -m benchmarks.gpu_acceptance --smoke`: every section at depth 1 through torch.compile's aot_eager
    backend, one JSON whose figures agree with each other; without --smoke a CPU is refused in one line."""
    from benchmarks import gpu_acceptance
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = tmp_path / "ga.json"
    gpu_acceptance.main(["--smoke", "--out", str(out)])
    record = json.loads(out.read_text())
    r = record["results"]
    assert r["scale"] == "smoke" and r["checks"] == {"loss_agreement_baseline": True, "loss_agreement_mhc": True}
    train = r["train"]
    import statistics
    for arch in ("baseline", "mhc"):
        assert train[arch]["step_s"] == statistics.median(train[arch]["step_s_all"])
        assert train[arch]["tok_per_s"] == pytest.approx(train["tokens_per_step"] / train[arch]["step_s"])
        assert train[arch]["mfu"] is None  # no card, no peak: no made-up MFU
        agree = r["loss_agreement"][arch]
        assert agree["rel_diff"] <= agree["tolerance"] == 1e-4 and agree["eager"] > 5  # ~ln(512) at init
    assert train["mhc"]["num_params"] > train["baseline"]["num_params"]
    d = r["decode"]
    for arch in ("baseline", "mhc"):
        for b in ("1", "8"):
            assert d["compiled_over_eager"][arch][b] == pytest.approx(d["tok_per_s"][arch]["compiled"][b]
                                                                      / d["tok_per_s"][arch]["eager"][b])
    assert d["cuda_graphs"] is False
    for reward in ("dense", "exact"):
        rl = r["rl_env"][reward]
        assert rl["compiled_over_eager"] == pytest.approx(rl["compiled"]["steps_per_s"] / rl["eager"]["steps_per_s"])
    with pytest.raises(SystemExit, match="no GPU here"):
        gpu_acceptance.main(["--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="unknown --sections"):
        gpu_acceptance.main(["--smoke", "--sections", "train,bogus", "--out", str(tmp_path / "x.json")])
