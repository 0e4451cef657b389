"""The tiny CPU preset of speedrun.sh, end to end (a shortened smoke version to fit CI time)."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from test_faults_speedrun import TINY_STAGES

REPO = Path(__file__).resolve().parents[1]


def test_speedrun_tiny_smoke(shared_data_dir, tmp_path, monkeypatch):
    env = {**os.environ, "PRESET": "tiny", "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
           "NANOCHAT_DATA_DIR": str(shared_data_dir), "RESULTS_DIR": str(tmp_path / "results"),
           "EXTRA_TRAIN_ARGS": "--depth 2 --num-iterations 6 --eval-every 3 --eval-tokens 4096 --save-every 3",
           "EXTRA_EVAL_ARGS": "--eval-tokens 4096 --max-per-task 3 --max-new-tokens 8",
           "EXTRA_SFT_ARGS": "--num-iterations 4 --synthetic-count 200 --val-problems 16 --eval-every 2",
           "EXTRA_SWEEP_ARGS": "--grid 0,1 --per-layer-grid 0 --tokens 2048 --num-problems 4",
           "EXTRA_ORACLE_ARGS": "--num-problems 20 --folds 2",
           "EXTRA_RL_ARGS": "--total-timesteps 32 --n-steps 16 --num-envs 8 --batch-size 8 --n-epochs 1 "
                            "--train-problems 32 --eval-problems 8 --val-problems 8 --max-new-tokens 8 "
                            "--baselines grid --rloo-problems-per-step 2",
           "EXTRA_BENCH_ARGS": "--new-tokens 4 --prompt-len 8 --repeats 1",
           "EXTRA_LM_EVAL_ARGS": "--limit 3 --max-gen-toks 8"}
    out = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    stages = TINY_STAGES  # the one list of the tiny preset's stages (tests/test_faults_speedrun.py)
    for stage in stages:
        assert (tmp_path / "base" / "speedrun" / f"{stage}.done").exists(), stage
    tokens = {}
    for tag in ("tiny_baseline", "tiny_mhc"):
        metrics = [json.loads(l) for l in open(tmp_path / "results" / tag / "metrics.jsonl")]
        vals = [m["val_bpb"] for m in metrics if "val_bpb" in m]
        assert len(vals) == 3 and vals[-1] < vals[0]  # steps 0, 3, 6: the val-bpb curve is saved and falls
        steps = [m for m in metrics if "loss" in m]
        assert len(steps) == 6 and all(math.isfinite(m["loss"]) and 0 < m["grad_norm"] < 100 for m in steps)
        record = json.loads((tmp_path / "results" / tag / "eval.json").read_text())
        assert record["step"] == 6 and record["results"]["bpb"]["val_bpb"] > 0
        for task in ("gsm8k", "gsm8k_8shot", "hellaswag", "arc_easy", "arc_challenge"):
            assert record["results"][task]["n"] == 3, task
        config = json.loads((tmp_path / "results" / tag / "config.json").read_text())
        tokens[tag] = (config["train"]["total_batch_size"] * config["num_iterations"], config["tokenizer"])
        assert config["model"]["mhc_enabled"] == (tag == "tiny_mhc")
    assert tokens["tiny_baseline"] == tokens["tiny_mhc"]  # identical token budgets and tokenizer
    harness = json.loads((tmp_path / "results" / "tiny_mhc" / "lm_eval.json").read_text())  # through lm-eval itself
    assert {t: r["n"] for t, r in harness["results"].items()} == dict(gsm8k=3, hellaswag=3, arc_easy=3,
                                                                       arc_challenge=3)
    stats = json.loads((tmp_path / "results" / "tiny_mhc" / "mhc_stats.json").read_text())
    assert stats["step"] == 6 and len(stats["sublayers"]) == 4  # --depth 2: 2 layers x (attention, MLP)
    # the RL half: a fine-tuned checkpoint whose loss fell, a gate sweep, and two RL runs with every arm evaluated
    sft = [json.loads(l) for l in open(tmp_path / "results" / "tiny_mhc_sft" / "metrics.jsonl")]
    val = [m["val_answer_loss"] for m in sft if "val_answer_loss" in m]
    assert len(val) == 3 and val[-1] < val[0]
    # pretraining leaves the gate alone; fine-tuning, the model RL acts on, trains over the whole gate range
    assert json.loads((tmp_path / "results" / "tiny_mhc" / "config.json").read_text())["model"][
        "mhc_gate_sample_frac"] == 0.0
    assert json.loads((tmp_path / "results" / "tiny_mhc_sft" / "config.json").read_text())["model"][
        "mhc_gate_sample_frac"] == 0.25
    sweep = json.loads((tmp_path / "results" / "tiny_mhc_sft" / "gate_sweep.json").read_text())
    assert [p["gate"] for p in sweep["global_gate"]] == [0.0, 1.0] and len(sweep["per_layer"]) == 2
    assert (tmp_path / "results" / "tiny_mhc_sft" / "gate_sweep.png").stat().st_size > 0
    # the baseline fine-tuned with the same recipe on the same tokens
    sft_runs = [json.loads((tmp_path / "results" / t / "config.json").read_text()) for t in ("tiny_baseline_sft",
                                                                                              "tiny_mhc_sft")]
    assert sft_runs[0]["train_rows_sha256"] == sft_runs[1]["train_rows_sha256"]
    # the headroom before any learner, on both problem sources
    for source in ("synthetic", "gsm8k"):
        oracle = json.loads((tmp_path / "results" / "tiny_mhc_sft" / f"gate_oracle_{source}_dense_global.json")
                            .read_text())
        assert oracle["headroom"]["n_gates"] == 11 and oracle["verdict"] and oracle["baselines"]["folds"] == 2
    for run, algo in (("tiny_mhc_sft-synthetic-global-dense-rloo", "rloo"), ("tiny_mhc_sft-gsm8k-global-dense", "ppo")):
        ev = json.loads((tmp_path / "results" / "rl" / run / "eval.json").read_text())
        assert ev["policy_timesteps"] == 32 and ev["scale"] == "smoke" and ev["algo"] == algo
        assert {"default", "rl_policy", "rl_policy_stochastic", "rl_initial", "grid", "gate0", "gate1"} <= \
            set(ev["arms"]) <= {"default", "rl_policy", "rl_policy_stochastic", "rl_initial", "rl_last", "grid",
                                "gate0", "gate1"}
        assert all(a["exact"]["n"] == 8 for a in ev["arms"].values()), run

    # both fine-tuned models exported for transformers (each verified when written), and the mHC folder read back
    # by base_eval --hf with the checkpoint's own val bpb
    for model, model_type in (("baseline", "nanochat"), ("mhc", "nanochat_mhc")):
        folder = tmp_path / "results" / "hf" / f"tiny_{model}_sft"
        assert json.loads((folder / "config.json").read_text())["model_type"] == model_type
        assert json.loads((folder / "nanochat_meta.json").read_text())["verification"]["max_abs_logit_diff"] < 1e-4
    check = json.loads((tmp_path / "results" / "hf_check_tiny_mhc_sft" / "eval.json").read_text())
    sft_eval = json.loads((tmp_path / "results" / "tiny_mhc_sft" / "eval.json").read_text())
    assert check["hf_cross_check"]["done"]
    assert abs(check["results"]["bpb"]["val_bpb"] - sft_eval["results"]["bpb"]["val_bpb"]) < 1e-6

    # the report: every cell of the Phase-4 table filled, every figure present, every stage timed
    results = tmp_path / "results"
    table = json.loads((results / "comparison.json").read_text())
    assert table["missing"] == [] and table["scale"] == "smoke"
    # the RL-tuned column's non-GSM8K rows are n/a by design: a per-problem policy acts on GSM8K questions
    assert all("na" in c for r, c in table["columns"]["RL-tuned"]["cells"].items()
               if r not in ("GSM8K 0-shot", "inference latency", "peak memory"))
    rl_cell = table["columns"]["RL-tuned"]["cells"]["GSM8K 0-shot"]
    assert rl_cell["n"] == 8 and rl_cell["vs"]["test"] == "mcnemar_exact"   # the policy vs the learned gates
    assert table["columns"]["mHC + SFT"]["cells"]["GSM8K 0-shot"]["vs"]["test"] == "mcnemar_exact"  # vs baseline SFT
    # and the rows that bound it: fixed gate, best contextual baseline, split oracle (gate oracle), RL vs the grid
    assert [r["policy"].split(" (")[0] for r in table["gate_policies"]] == [
        "best fixed gate", "best contextual baseline", "per-problem oracle", "RL policy"]
    report = (results / "report.md").read_text()
    assert "Nothing: every cell and every figure is present." in report
    assert "## Is there anything for a context-dependent gate to win?" in report and "split headroom" in report
    assert "## Memory (estimated before training)" in report
    memory = json.loads((results / "bench" / "memory_estimate_mhc.json").read_text())["results"]
    assert memory["model"] == dict(n_layer=2, n_embd=128, mhc=True)  # the stage saw EXTRA_TRAIN_ARGS' --depth 2
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(figures) >= 10 and all((results / f).stat().st_size > 0 for f in figures), figures
    timed = {json.loads(l)["stage"] for l in open(results / "speedrun_stages.jsonl")}
    assert timed == set(stages)  # (the report itself is written before its own time is known)
    # both notebooks execute on the tiny run (papermill, the repo's kernel)
    import papermill
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    papermill.execute_notebook(str(REPO / "analysis" / "hres_heatmaps.ipynb"), str(tmp_path / "hres.ipynb"),
                               parameters=dict(model_tag="tiny_mhc", tokens=2048, out_dir=str(tmp_path / "nb1")),
                               cwd=str(REPO), progress_bar=False, kernel_name="python3")
    papermill.execute_notebook(str(REPO / "analysis" / "results_overview.ipynb"), str(tmp_path / "ov.ipynb"),
                               parameters=dict(results_dir=str(results), prefix="tiny_",
                                               out_dir=str(tmp_path / "nb2")),
                               cwd=str(REPO), progress_bar=False, kernel_name="python3")
    for name, n_images in (("hres.ipynb", 4), ("ov.ipynb", 2)):
        nb = json.loads((tmp_path / name).read_text())
        images = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
        assert len(images) == n_images, name

    # a second run skips every finished stage, except one whose output went missing (tests/test_faults_speedrun.py)
    (results / "tiny_mhc" / "mhc_stats.json").unlink()
    again = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert again.stdout.count("already done") == len(stages) - 1
    assert f"stats_mhc: rerunning: {results / 'tiny_mhc' / 'mhc_stats.json'} is missing" in again.stdout
    assert json.loads((results / "tiny_mhc" / "mhc_stats.json").read_text())["step"] == 6


def test_fresh_clone_without_shared_data_fetches_it_or_says_what_to_set(tmp_path):
    """A clone with no ../shared/data beside it: the tiny preset's first stage fetches the small sets from the hub;
    offline it stops at once with one clear message. The clone is a copy of the repo's files in a bare folder (a
    symlink would not do: the kernel resolves `..` through it, back to the real ../shared)."""
    clone = tmp_path / "clone" / "main"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    assert not (clone.parent.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_DATA_DIR"}
    env.update(PRESET="tiny", NANOCHAT_BASE_DIR=str(tmp_path / "base"), RESULTS_DIR=str(tmp_path / "results"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", NANOCHAT_VENV=str(Path(sys.prefix)))
    out = subprocess.run(["bash", str(clone / "speedrun.sh")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[speedrun] data_fetch: python -m nanochat.dataset --source hub-small" in out.stdout
    assert "cannot download the small datasets" in out.stderr and "set NANOCHAT_DATA_DIR" in out.stderr
    assert not (tmp_path / "base" / "speedrun" / "data_fetch.done").exists()
