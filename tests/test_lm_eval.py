"""lm-evaluation-harness through our adapter gives the same per-example results as our own evaluator, and the
script's bad input. Needs the [harness] extra (CI installs it; under CI a missing harness fails, never skips)."""
from __future__ import annotations

import json
import re
from contextlib import nullcontext

import pytest
import torch

from nanochat.common import UserError
from nanochat.tokenizer import SPECIAL_TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TASKS = ["gsm8k", "hellaswag", "arc_easy", "arc_challenge"]
N = 50


def random_long_context_checkpoint(tiny_base, tag: str, mhc: bool, n_kv_head: int = 2):
    """A random model with a 512-token context (every 0-shot GSM8K prompt fits with the generation, so the
    harness's and our context rules never differ) and O(1) logits (no near-ties between choices or tokens)."""
    from nanochat.checkpoint import checkpoint_root, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.mhc import MHCConfig
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=512, vocab_size=tiny_base.tokenizer.vocab_size, n_layer=2, n_head=2,
                    n_kv_head=n_kv_head, n_embd=64, out_proj_init_scale=1.0, mhc=MHCConfig(enabled=mhc))
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    meta = dict(model_config=cfg.to_dict(), tokenizer=tiny_base.tokenizer.fingerprint, seed=0,
                run_config=dict(model_tag=tag, train=dict(data_source="local", seed=0)))
    return save_checkpoint(checkpoint_root(tag), 1, model, [], meta)


@pytest.fixture(scope="module")
def long_context_checkpoint(tiny_base_dir):
    return random_long_context_checkpoint(tiny_base_dir, "lm_eval_mhc", mhc=True)


def test_the_harness_through_the_adapter_equals_our_evaluator(harness, long_context_checkpoint):
    from nanochat.evaluate import evaluate_task
    from nanochat.lm_eval_adapter import NanochatLM
    from scripts.lm_eval import run_harness
    lm = NanochatLM(checkpoint=long_context_checkpoint, batch_size=8, max_gen_toks=16)
    results, samples, source = run_harness(lm, TASKS, "local", num_fewshot=0, limit=N, max_gen_toks=16)
    assert source == "local" and all(results[t]["n"] == N for t in TASKS)
    ours = {}
    for task in TASKS:
        summary, records = evaluate_task(task, lm.model, lm.tokenizer, autocast_ctx=nullcontext(), batch_size=8,
                                         max_per_task=N, max_new_tokens=16, task_data="local", seed=None)
        assert summary["n"] == N and summary["skipped"] == 0 and summary["cut"] == 0
        ours[task] = {r["id"]: r for r in records}
    for task in ("hellaswag", "arc_easy", "arc_challenge"):
        rows = [s for s in samples if s["task"] == task]
        assert len(rows) == N
        for s in rows:
            mine = ours[task][str(s["doc"]["ind"] if task == "hellaswag" else s["doc"]["id"])]
            assert [ll for ll, _ in s["filtered_resps"]] == pytest.approx(mine["lls"], abs=1e-4)
            assert bool(s["acc"]) == mine["acc"] and bool(s["acc_norm"]) == mine["acc_norm"], (task, s["doc_id"])
        assert results[task]["acc,none"] == pytest.approx(sum(r["acc"] for r in ours[task].values()) / N)
        assert results[task]["acc_norm,none"] == pytest.approx(sum(r["acc_norm"] for r in ours[task].values()) / N)
    for flt, key in (("strict-match", "exact_match_strict"), ("flexible-extract", "exact_match_flexible")):
        rows = [s for s in samples if s["task"] == "gsm8k" and s["filter"] == flt]
        assert len(rows) == N
        for s in rows:
            mine = ours["gsm8k"][f"test-{s['doc_id']}"]
            assert s["resps"][0][0] == mine["completion"]  # the same generation, token for token
            assert s["filtered_resps"][0] == mine["extracted_" + key.split("_")[-1]]
            assert bool(s["exact_match"]) == mine[key], (flt, s["doc_id"])
        assert results["gsm8k"][f"exact_match,{flt}"] == pytest.approx(
            sum(r[key] for r in ours["gsm8k"].values()) / N)
    # analysis.harness_agreement, on the same records, agrees (and finds one flipped verdict)
    from analysis.harness_agreement import compare
    records = [r for task in TASKS for r in ours[task].values()]
    agreement = compare(records, samples)
    assert {t: (r["compared"], len(r["disagreements"])) for t, r in agreement.items()} == {t: (N, 0) for t in TASKS}
    flipped = next(r for r in records if r["task"] == "arc_easy")
    flipped["acc"] = not flipped["acc"]
    assert [d["field"] for d in compare(records, samples)["arc_easy"]["disagreements"]] == ["acc"]


def test_harness_agreement_script(tmp_path):
    """The command line: agreement exits 0 and writes its JSON; a flipped verdict exits 1; no overlap is named."""
    from analysis.harness_agreement import main
    ours, harness = tmp_path / "ours", tmp_path / "harness"
    ours.mkdir()
    harness.mkdir()
    mine = [dict(task="hellaswag", id="7", acc=True, acc_norm=False),
            dict(task="gsm8k", id="test-3", completion=" 5", extracted_strict="[invalid]", extracted_flexible="5",
                 exact_match_strict=False, exact_match_flexible=True)]
    theirs = [dict(task="hellaswag", doc_id=0, doc=dict(ind=7), acc=1.0, acc_norm=0.0),
              dict(task="gsm8k", doc_id=3, filter="strict-match", resps=[[" 5"]], filtered_resps=["[invalid]"],
                   exact_match=0.0),
              dict(task="gsm8k", doc_id=3, filter="flexible-extract", resps=[[" 5"]], filtered_resps=["5"],
                   exact_match=1.0)]

    def write(folder, name, rows):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write(ours, "eval_examples.jsonl", mine)
    write(harness, "lm_eval_samples.jsonl", theirs)
    result = main(["--ours", str(ours), "--harness", str(harness)])
    assert {t: (r["compared"], r["disagreements"]) for t, r in result.items()} == {"hellaswag": (1, []),
                                                                                    "gsm8k": (1, [])}
    assert json.loads((ours / "harness_agreement.json").read_text())["tasks"]["gsm8k"]["compared"] == 1
    theirs[2]["filtered_resps"] = ["6"]
    write(harness, "lm_eval_samples.jsonl", theirs)
    with pytest.raises(SystemExit) as e:
        main(["--ours", str(ours), "--harness", str(harness)])
    assert e.value.code == 1
    write(ours, "eval_examples.jsonl", [dict(task="hellaswag", id="8", acc=True, acc_norm=True)])
    write(harness, "lm_eval_samples.jsonl", theirs[:1])
    with pytest.raises(UserError, match="no example is in both"):
        main(["--ours", str(ours), "--harness", str(harness)])


def test_lm_eval_script_bad_input(harness, long_context_checkpoint, tmp_path, monkeypatch):
    from scripts.lm_eval import main
    with pytest.raises(UserError, match="no local copy"):
        main(["--checkpoint", long_context_checkpoint, "--tasks", "mmlu", "--task-data", "local"])
    with pytest.raises(UserError, match="unknown lm-evaluation-harness task.*not_a_task"):
        main(["--checkpoint", long_context_checkpoint, "--tasks", "not_a_task", "--task-data", "hub"])
    with pytest.raises(UserError, match="--model-tag"):
        main(["--tasks", "gsm8k"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no tokenizer there
    with pytest.raises(UserError, match="no tokenizer"):
        main(["--checkpoint", long_context_checkpoint, "--tasks", "hellaswag", "--task-data", "local"])
    # the harness missing: the message says how to install it
    import builtins
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    from scripts.lm_eval import import_harness
    with pytest.raises(UserError, match=r"pip install -e '\.\[harness\]'"):
        import_harness()


@pytest.fixture(scope="module")
def long_context_baseline(tiny_base_dir):
    """long_context_checkpoint's baseline twin (no mHC, GQA): for the export to transformers' own NanoChat."""
    return random_long_context_checkpoint(tiny_base_dir, "lm_eval_base", mhc=False, n_kv_head=1)


@pytest.mark.slow  # about 35 s each (the harness runs 4 tasks twice); CI runs the slow tests too
@pytest.mark.parametrize("kind", ["baseline", "mhc"])
def test_the_harness_hf_model_on_an_export_agrees_with_our_adapter(harness, long_context_baseline,
                                                                   long_context_checkpoint, tmp_path, kind):
    """An independent check of the export and of our evaluator: lm-eval's own `hf` model (transformers, the exported
    folder) and our adapter on the checkpoint give the same log-likelihoods (within 1e-4), verdicts and greedy
    generations on 50 examples of 4 tasks."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        from tests.conftest import skip_or_fail
        skip_or_fail("transformers is not installed (pip install -e '.[hf]')")
    from nanochat.lm_eval_adapter import NanochatLM
    from scripts.export_hf import main as export_hf
    from scripts.lm_eval import main as lm_eval_main
    from scripts.lm_eval import run_harness
    checkpoint = str(long_context_baseline if kind == "baseline" else long_context_checkpoint)
    folder = tmp_path / f"export_{kind}"
    export_hf(["--checkpoint", checkpoint, "--out", str(folder)])
    lm = NanochatLM(checkpoint=checkpoint, batch_size=8, max_gen_toks=16)
    _, ours, _ = run_harness(lm, TASKS, "local", num_fewshot=0, limit=N, max_gen_toks=16)
    record = lm_eval_main(["--hf", str(folder), "--tasks", ",".join(TASKS), "--task-data", "local", "--num-fewshot",
                           "0", "--limit", str(N), "--max-gen-toks", "16", "--batch-size", "8", "--results-dir",
                           str(tmp_path / "results")])
    assert record["model"] == "hf" and all(record["results"][t]["n"] == N for t in TASKS)
    theirs = [json.loads(line) for line in open(tmp_path / "results" / f"export_{kind}" / "lm_eval_samples.jsonl")]
    key = lambda s: (s["task"], s["doc_id"], s.get("filter"))  # noqa: E731
    ours, theirs = {key(s): s for s in ours}, {key(s): s for s in theirs}
    specials = "|".join(re.escape(t) for t in SPECIAL_TOKENS)
    assert set(ours) == set(theirs) and len(ours) == N * (3 + 2)  # gsm8k has two filters
    for k, mine in ours.items():
        other = theirs[k]
        if k[0] == "gsm8k":
            # the same greedy generation; the harness's hf model decodes with skip_special_tokens (ours keeps a
            # special token's text: a random model does generate them, a trained one hardly ever)
            assert other["resps"][0][0] == re.sub(specials, "", mine["resps"][0][0]), k
            assert other["exact_match"] == mine["exact_match"], k
        else:
            assert [ll for ll, _ in other["filtered_resps"]] == pytest.approx(
                [ll for ll, _ in mine["filtered_resps"]], abs=1e-4), k
            assert (other["acc"], other["acc_norm"]) == (mine["acc"], mine["acc_norm"]), k
