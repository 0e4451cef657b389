"""Fault injection, logs and silence (issue 21, items 3 and 6): a run from scratch starts a fresh metrics.jsonl (the
old one moved aside, never deleted), every append starts on a fresh line, dropped data rows are counted and located,
an all-dropped data set names the context as the cause, a diverging loss is warned about (or stops the run), and
generation past the trained context is said."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from nanochat import checkpoint as ckpt
from nanochat.common import UserError, append_jsonl
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import DIVERGENCE_MARGIN, DIVERGENCE_WINDOW, Run, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# the tiny training run of test_faults.py: a step in ~10 ms on 2 cores
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
        "4", "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--compile", "false"]


# ---------------------------------------------------------------------------------------------------------------
# a fresh log per run

def test_a_run_from_scratch_moves_the_old_log_aside_and_logs_only_its_own_steps(tiny_base_dir, tmp_path, capsys):
    """kill -9 before the first checkpoint left a metrics.jsonl (and an older run a metrics.jsonl.1): --resume finds
    no checkpoint, starts from scratch, and its log holds its own steps only; both old logs are kept as they were."""
    from scripts.base_train import main
    folder = tmp_path / "results" / "faults_fresh"
    folder.mkdir(parents=True)
    killed = "".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3))
    (folder / "metrics.jsonl").write_text(killed)
    (folder / "metrics.jsonl.1").write_text('{"step": 1, "loss": 98.0}\n')
    capsys.readouterr()
    main(TINY + ["--num-iterations", "3", "--model-tag", "faults_fresh", "--resume",
                 "--results-dir", str(tmp_path / "results")])
    out = capsys.readouterr().out
    path = folder / "metrics.jsonl"
    assert f"starting a new log: moved the earlier run's {path} to {path}.2" in out
    assert (folder / "metrics.jsonl.2").read_text() == killed
    assert (folder / "metrics.jsonl.1").read_text() == '{"step": 1, "loss": 98.0}\n'
    records = read_metrics(str(path))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] != 99.0 for r in records if "loss" in r)


def test_the_frame_starts_a_fresh_log_only_without_a_checkpoint(tmp_path, capsys):
    """The one implementation (Run.resume_path) that base_train, sft_train and train_rl call: no checkpoint, with or
    without --resume, moves the log aside; with a checkpoint to resume, the log stays."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.jsonl").write_text('{"step": 1}\n')
    run = Run("test run", str(tmp_path / "ckpt"), str(results), tag_flag="--tag")
    assert run.resume_path(False) is None
    assert sorted(os.listdir(results)) == [".lock", "metrics.jsonl.1"]
    assert run.resume_path(True) is None  # no log now: nothing to move, nothing said
    assert sorted(os.listdir(results)) == [".lock", "metrics.jsonl.1"]
    assert capsys.readouterr().out.count("starting a new log") == 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    saved = ckpt.save_checkpoint(str(tmp_path / "ckpt"), 2, model, [], dict(model_config={}, seed=0))
    (results / "metrics.jsonl").write_text('{"step": 1}\n')
    assert run.resume_path(True) == saved  # a resume continues its log (truncated to the checkpoint's step)
    assert (results / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert "starting a new log" not in capsys.readouterr().out
    run.lock.release()


def test_an_append_after_a_partial_last_line_starts_on_a_fresh_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')  # killed mid-append
    append_jsonl(str(path), {"step": 2, "loss": 2.5})
    append_jsonl(str(path), {"step": 3, "loss": 2.0})
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 3.0}', '{"step": 2, "lo',
                                             '{"step": 2, "loss": 2.5}', '{"step": 3, "loss": 2.0}']
    fresh = tmp_path / "new.jsonl"
    append_jsonl(str(fresh), {"step": 1})  # a new file gets no leading newline
    assert fresh.read_text() == '{"step": 1}\n'


# ---------------------------------------------------------------------------------------------------------------
# silent drops

def write_gsm8k(data_dir, lines: list[str]) -> str:
    path = data_dir / "gsm8k" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_gsm8k_rows_are_counted_and_the_first_is_located(tmp_path, monkeypatch, capsys):
    from envs.gsm8k_env import load_problems
    good = json.dumps({"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=5\n#### 5"})
    path = write_gsm8k(tmp_path, [good, "", json.dumps({"question": "no answer"}), good, "{not json", good])
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    problems, where = load_problems("gsm8k", split="train", task_data="local")
    assert len(problems) == 3 and where == f"local:{path}"
    err = capsys.readouterr().err
    assert (f"warning: dropped 2 malformed GSM8K row(s) of local:{path}; the first: {path}:3: needs string fields "
            f"'question' and 'answer'") in err  # line 3: the blank line 2 is no row


class ByteTokenizer:
    """One token per byte: row lengths are the texts' lengths."""
    bos_token_id = 0

    def encode(self, text: str, prepend=None) -> list[int]:
        return ([prepend] if prepend is not None else []) + list(text.encode())


def test_when_every_row_is_too_long_the_error_names_the_context(capsys):
    from nanochat.sft_data import encode_rows
    from nanochat.task_common import GenExample
    problems = [GenExample(id=str(n), prompt="Question: " + "x" * n + "\nAnswer:", reference="2",
                           extra={"answer": "1+1=2\n#### 2"}) for n in (40, 50)]
    shortest = min(len(ByteTokenizer().encode(p.prompt + " 1+1=2\n#### 2\n\n", 0)) for p in problems)
    with pytest.raises(UserError) as e:
        encode_rows(ByteTokenizer(), problems, 32)
    assert str(e.value) == (f"every one of the 2 problems was dropped, 2 of them because they do not fit the model's "
                            f"context: the shortest needs {shortest} tokens, the context is 32 (+ 1) tokens (the "
                            f"base run's --max-seq-len): fine-tune a model trained with a longer context, or use "
                            f"shorter problems")
    rows, dropped = encode_rows(ByteTokenizer(), problems, 256)  # it fits: no error
    assert len(rows) == 2 and dropped == 0
    assert encode_rows(ByteTokenizer(), [], 32) == ([], 0)  # no problems (no val rows): nothing to say


# ---------------------------------------------------------------------------------------------------------------
# silent divergence

def test_the_divergence_check_counts_steps_in_a_row_after_the_warm_up(tmp_path, capsys):
    run = Run("test run", str(tmp_path / "ckpt"), str(tmp_path / "results"), tag_flag="--tag")
    high = math.log(64) + DIVERGENCE_MARGIN + 0.5
    for step in range(1, 6):  # warm-up: not counted
        run.check_loss(step, high, 64, "warn", warmup_steps=5)
    for step in range(6, 6 + DIVERGENCE_WINDOW - 1):
        run.check_loss(step, high, 64, "warn", warmup_steps=5)
    run.check_loss(20, 1.0, 64, "warn", warmup_steps=5)  # one good step: the count starts again
    for step in range(21, 21 + DIVERGENCE_WINDOW - 1):
        run.check_loss(step, high, 64, "warn", warmup_steps=5)
    assert "diverging" not in capsys.readouterr().err
    with pytest.raises(UserError, match=rf"training is diverging: at step 30 the loss {high:.3f} has been above "
                                        rf"ln\(vocab_size 64\) \+ 1\.0 = {math.log(64) + 1:.3f} for 10 steps; "
                                        rf"stopped by --divergence-check stop"):
        run.check_loss(30, high, 64, "stop", warmup_steps=5)
    run.check_loss(31, 1e9, 64, "off")
    run.lock.release()


def inflate_training_loss(monkeypatch, by: float):
    """A finite loss far above ln(vocab) (what all LRs at 1e4 gave: ~22), so check_finite lets it through."""
    real_forward = GPT.forward

    def inflated(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        return out + by if targets is not None and self.training else out
    monkeypatch.setattr(GPT, "forward", inflated)


def test_a_diverging_run_warns_once(tiny_base_dir, tmp_path, monkeypatch, capsys):
    from scripts.base_train import main
    inflate_training_loss(monkeypatch, 15.0)
    main(TINY + ["--num-iterations", str(2 * DIVERGENCE_WINDOW + 2), "--model-tag", "faults_diverge_warn",
                 "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err
    threshold = math.log(tiny_base_dir.tokenizer.vocab_size) + DIVERGENCE_MARGIN
    assert err.count("warning: training is diverging") == 1
    assert (f"warning: training is diverging: at step {DIVERGENCE_WINDOW} the loss " in err
            and f"has been above ln(vocab_size {tiny_base_dir.tokenizer.vocab_size}) + {DIVERGENCE_MARGIN} = "
                f"{threshold:.3f} for {DIVERGENCE_WINDOW} steps" in err)
    main(TINY + ["--num-iterations", str(DIVERGENCE_WINDOW + 2), "--model-tag", "faults_diverge_off",
                 "--divergence-check", "off", "--results-dir", str(tmp_path / "results")])
    assert "diverging" not in capsys.readouterr().err


def test_divergence_check_stop_ends_the_run_and_saves_nothing_after(tiny_base_dir, tmp_path, monkeypatch):
    from scripts.base_train import main
    inflate_training_loss(monkeypatch, 15.0)
    with pytest.raises(UserError, match=rf"training is diverging: at step {DIVERGENCE_WINDOW} .*stopped by "
                                        rf"--divergence-check stop with nothing saved since the last checkpoint"):
        main(TINY + ["--num-iterations", str(2 * DIVERGENCE_WINDOW), "--save-every", "4", "--model-tag",
                     "faults_diverge_stop", "--divergence-check", "stop", "--results-dir", str(tmp_path / "results")])
    root = tiny_base_dir.base_dir / "checkpoints" / "faults_diverge_stop"
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(root))] == ["step_000004", "step_000008"]


def test_an_unknown_divergence_mode_is_refused():
    from scripts.base_train import main
    with pytest.raises(UserError, match=r"--divergence-check must be one of warn, stop, off \(got 'halt'\)"):
        main(TINY + ["--divergence-check", "halt"])


# ---------------------------------------------------------------------------------------------------------------
# generation past the trained context

def test_generation_past_the_trained_context_is_warned_once_per_engine(capsys):
    from nanochat.engine import Engine
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    model.eval()
    engine = Engine(model)
    engine.generate([[1, 2, 3]], max_new_tokens=13)  # 16: the trained context exactly
    assert "warning" not in capsys.readouterr().err
    engine.generate([[1, 2, 3]], max_new_tokens=14)
    engine.generate([[1, 2, 3, 4]], max_new_tokens=20)
    err = capsys.readouterr().err
    assert err.splitlines() == [f"warning: a prompt of 3 tokens + up to 14 new tokens runs past the model's trained "
                                f"context of 16 tokens: positions beyond it were never trained (the rotary table "
                                f"reaches {engine.max_context}), so the output may degrade"]
    Engine(model).generate([[1, 2, 3]], max_new_tokens=14)  # another engine says it again
    assert capsys.readouterr().err.count("runs past the model's trained context") == 1
