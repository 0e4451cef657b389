"""Supervised fine-tuning: loss on the answer tokens only, the answer loss falls, exact resume, bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nanochat import task_gsm8k
from nanochat.checkpoint import checkpoint_root, latest_checkpoint
from nanochat.common import UserError
from nanochat.sft_data import ANSWER_END, SFTLoader, collate, encode_rows
from nanochat.synthetic_gsm8k import as_examples, generate_problems


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_loss_falls_on_the_answer_tokens_only(tiny_base_dir):
    tok = tiny_base_dir.tokenizer
    problems = as_examples(generate_problems(6, seed=0, steps=(1, 2)), "t")
    rows, dropped = encode_rows(tok, problems, max_len=256)
    assert dropped == 0 and len(rows) == 6
    x, y = collate(rows, "cpu")
    for b, (p, (ids, n_answer)) in enumerate(zip(problems, rows)):
        prompt_ids = tok.encode(p.prompt, prepend=tok.bos_token_id)
        # inputs are the row shifted by one; targets are -1 on every prompt position and on the padding
        assert x[b, :len(ids) - 1].tolist() == ids[:-1]
        assert (y[b, :len(prompt_ids) - 1] == -1).all() and (y[b, len(ids) - 1:] == -1).all()
        scored = y[b][y[b] >= 0].tolist()
        assert tok.decode(scored) == task_gsm8k.gold_continuation(p.extra["answer"]) + ANSWER_END
        assert len(scored) == n_answer
    # a row that cannot fit is dropped and counted, never cut; when none fits, the context is named as the cause
    with pytest.raises(UserError, match="6 of them because they do not fit the model's context.*context is 20"):
        encode_rows(tok, problems, max_len=20)


def test_loader_order_is_rank_independent_and_resumable():
    rows = [([1, 2, i + 3], 1) for i in range(10)]
    one = SFTLoader(rows, 4, seed=1)
    two = [SFTLoader(rows, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(5):  # crosses epoch boundaries
        x, _ = one.next_batch()
        parts = [l.next_batch()[0] for l in two]
        assert torch.equal(x, torch.cat(parts))
    resumed = SFTLoader(rows, 4, seed=1)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_batch()[0], one.next_batch()[0])
    with pytest.raises(UserError, match="cannot resume"):
        SFTLoader(rows[:5], 4, seed=1).load_state_dict(one.state_dict())


def sft_args(ckpt, results, tag, *extra):
    return ["--checkpoint", str(ckpt), "--output-tag", tag, "--results-dir", str(results), "--data", "synthetic",
            "--synthetic-count", "300", "--synthetic-steps", "1", "--synthetic-max-value", "10", "--val-problems",
            "32", "--device-batch-size", "8", "--log-every", "100", *extra]


def test_sft_lowers_the_answer_loss_and_resumes_exactly(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    from scripts.sft_train import main
    main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_a", "--num-iterations", "30", "--eval-every", "30",
                  "--lr-scale", "1.0"))
    val = [json.loads(l)["val_answer_loss"] for l in open(tmp_path / "sft_a" / "metrics.jsonl")
           if "val_answer_loss" in l]
    assert len(val) == 2 and val[1] < 0.7 * val[0], val
    meta = json.loads(open(latest_checkpoint(checkpoint_root("sft_a")) + "/meta.json").read())
    assert meta["base_checkpoint"] == str(tiny_mhc_checkpoint) and meta["run_config"]["train"]["data_source"] == \
        "local"  # downstream tools find the pretraining data of the base run
    assert meta["model_config"]["mhc_gate_sample_frac"] == 0.25  # fine-tuned over the gate range by default
    # exact resume: stop after step 3 (drop the later checkpoint), resume, compare with the straight run
    main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_b", "--num-iterations", "6", "--save-every", "3"))
    straight = load_file(latest_checkpoint(checkpoint_root("sft_b")) + "/model.safetensors")
    # a fresh run with the same seed repeats it (gate sampling included)
    main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_c", "--num-iterations", "6", "--save-every", "3"))
    again = load_file(latest_checkpoint(checkpoint_root("sft_c")) + "/model.safetensors")
    assert all(torch.equal(straight[k], again[k]) for k in straight)
    shutil.rmtree(latest_checkpoint(checkpoint_root("sft_b")))
    main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_b", "--num-iterations", "6", "--save-every", "3",
                  "--resume"))
    resumed = load_file(latest_checkpoint(checkpoint_root("sft_b")) + "/model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(UserError, match="--lr-scale: checkpoint 0.2, now 0.5"):
        main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_b", "--num-iterations", "6", "--resume",
                      "--lr-scale", "0.5"))
    with pytest.raises(UserError, match="--resume"):
        main(sft_args(tiny_mhc_checkpoint, tmp_path, "sft_b", "--num-iterations", "6"))


def test_sft_bad_input_is_named(tiny_base_dir, tiny_mhc_checkpoint, tiny_baseline_checkpoint, tmp_path):
    from scripts.sft_train import main
    with pytest.raises(UserError, match="unknown source"):
        main(sft_args(tiny_mhc_checkpoint, tmp_path, "bad", "--data", "mmlu"))
    with pytest.raises(UserError, match="base model has no mHC"):
        main(sft_args(tiny_baseline_checkpoint, tmp_path, "bad", "--mhc-gate-sample-frac", "0.5"))
    with pytest.raises(UserError, match="--mhc-gate-noise must be in"):
        main(sft_args(tiny_mhc_checkpoint, tmp_path, "bad", "--mhc-gate-noise", "2"))
    with pytest.raises(UserError, match="no checkpoint for model tag"):
        main(["--model-tag", "does_not_exist"])


def test_two_ranks_equal_one_process(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    """torchrun with 2 gloo ranks of 4 rows gives the losses of 1 process with 8 rows (a token-weighted mean over
    the global batch, whatever each rank's share of answer tokens)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--checkpoint", str(tiny_mhc_checkpoint), "--results-dir", str(tmp_path), "--data", "synthetic",
              "--synthetic-count", "200", "--synthetic-steps", "1", "--synthetic-max-value", "10", "--val-problems",
              "16", "--num-iterations", "4", "--eval-every", "-1", "--mhc-gate-sample-frac", "0"]
    one = subprocess.run([sys.executable, "-m", "scripts.sft_train", *common, "--output-tag", "sft_one",
                          "--device-batch-size", "8"], cwd=repo, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "scripts.sft_train", "--", *common, "--output-tag", "sft_two", "--device-batch-size", "4"],
                         cwd=repo, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    def losses(tag):
        return [json.loads(l)["loss"] for l in open(tmp_path / tag / "metrics.jsonl") if '"loss"' in l]
    assert len(losses("sft_one")) == 4
    assert losses("sft_two") == pytest.approx(losses("sft_one"), abs=1e-5)


def test_two_ranks_draw_their_own_gates_and_resume_exactly(tiny_base_dir, tiny_mhc_checkpoint, tmp_path):
    """Gate sampling under torchrun: each rank draws its own gates (seed + rank after the shared init), and every
    rank's generators are saved, so 2 steps + resume + 2 steps give the weights of 4 straight steps. Restoring only
    rank 0's state (the old checkpoints) would restart rank 1's draws and fail this."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--checkpoint", str(tiny_mhc_checkpoint), "--results-dir", str(tmp_path), "--data", "synthetic",
              "--synthetic-count", "200", "--synthetic-steps", "1", "--synthetic-max-value", "10", "--val-problems",
              "16", "--eval-every", "-1", "--mhc-gate-sample-frac", "0.5", "--device-batch-size", "4"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
              "scripts.sft_train", "--"]

    def run(*extra):
        out = subprocess.run(launch + common + list(extra), cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run("--output-tag", "ddp_straight", "--num-iterations", "4")
    run("--output-tag", "ddp_split", "--num-iterations", "4", "--save-every", "2")
    shutil.rmtree(latest_checkpoint(checkpoint_root("ddp_split")))  # as if stopped after step 2
    run("--output-tag", "ddp_split", "--num-iterations", "4", "--save-every", "2", "--resume")
    straight = load_file(latest_checkpoint(checkpoint_root("ddp_straight")) + "/model.safetensors")
    resumed = load_file(latest_checkpoint(checkpoint_root("ddp_split")) + "/model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_rank_seeds_differ_after_a_shared_init():
    from nanochat.training import restore_rng, seed_rank
    draws = []
    for rank in (0, 1):
        torch.manual_seed(7)
        torch.randn(10)  # the model init every rank shares
        seed_rank(7, rank)
        draws.append(torch.rand(5))
    assert not torch.equal(draws[0], draws[1])
    # a checkpoint of two ranks restores each rank's own stream
    states = []
    for rank in (0, 1):
        torch.manual_seed(100 + rank)
        states.append({"torch": torch.get_rng_state()})
    expected = torch.rand(3)  # rank 1's next draws
    restore_rng({"ranks": states}, 1, 2, "cpu", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_baseline_sft_and_mhc_sft_see_identical_tokens(tiny_base_dir, tiny_mhc_checkpoint, tiny_baseline_checkpoint,
                                                       tmp_path):
    """The Phase-4 comparison fine-tunes both models with the same recipe: the same rows in the same order."""
    from scripts.sft_train import main
    for ckpt, tag in ((tiny_baseline_checkpoint, "base_sft"), (tiny_mhc_checkpoint, "mhc_sft")):
        main(sft_args(ckpt, tmp_path, tag, "--num-iterations", "2", "--synthetic-mix", "mixed"))
    metas = [json.loads(open(latest_checkpoint(checkpoint_root(t)) + "/meta.json").read())["run_config"]
             for t in ("base_sft", "mhc_sft")]
    assert metas[0]["train_rows_sha256"] == metas[1]["train_rows_sha256"]
    assert metas[0]["train_rows"] == metas[1]["train_rows"] > 0
    assert metas[0]["data"] == metas[1]["data"]
    assert not metas[0]["model"]["mhc_enabled"] and metas[1]["model"]["mhc_enabled"]


def test_rows_digest_tells_different_data_apart():
    from nanochat.sft_data import rows_digest
    rows = [([1, 2, 3], 2), ([4, 5], 1)]
    assert rows_digest(rows, 0) == rows_digest([list(r) for r in rows], 0)
    assert rows_digest(rows, 0) != rows_digest(rows[::-1], 0) != rows_digest(rows, 1)
    assert rows_digest(rows, 0) != rows_digest([([1, 2, 3], 1), ([4, 5], 1)], 0)
