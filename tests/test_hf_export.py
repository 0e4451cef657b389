"""The Hugging Face export (nanochat/hf_export.py, scripts/export_hf.py): on trained tiny models, transformers' own
NanoChat (baseline) and our trust_remote_code model (mHC) compute our logits and our greedy generations; the
comparison catches a transposed weight or a dropped norm; base_eval --hf reads an export back; bad input is named.
Needs the [hf] extra (CI installs it; under CI a missing transformers fails, never skips)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanochat.common import UserError
from tests.conftest import skip_or_fail

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
ATOL = 1e-4  # the bound; measured differences are 0 to 1.5e-5 (rounding of the same float32 math)
PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "  whitespace\t\truns,  ünïcödé and 数学 too", "Q: What is 12 + 7?\nA: 19\nQ: What is 3 * 4?\nA:"]
TRAIN = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size",
         "4", "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "1024", "--eval-every", "-1",
         "--device-type", "cpu", "--dtype", "float32", "--compile", "false", "--num-iterations", "40",
         "--save-every", "-1"]


@pytest.fixture(scope="module")
def transformers_installed():
    try:
        import transformers  # noqa: F401
    except ImportError:
        skip_or_fail("transformers is not installed (pip install -e '.[hf]')")


@pytest.fixture(scope="module")
def trained(tiny_base_dir, tmp_path_factory, transformers_installed):
    """Two trained tiny models (40 steps): a GQA baseline (2 query heads, 1 kv head) and an mHC model."""
    from nanochat.checkpoint import load_model, resolve_checkpoint
    from scripts.base_train import main as base_train
    results = tmp_path_factory.mktemp("hf_results")
    out = {}
    for kind, flags in (("baseline", ["--num-kv-heads", "1"]), ("mhc", ["--mhc-enabled"])):
        tag = f"hf_{kind}"
        base_train(TRAIN + flags + ["--model-tag", tag, "--results-dir", str(results)])
        model, meta = load_model(resolve_checkpoint(tag))
        out[kind] = dict(tag=tag, model=model, meta=meta)
    return out


def export(tag: str, out, *flags):
    from scripts.export_hf import main
    return main(["--model-tag", tag, "--out", str(out), *flags])


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_exports")
    return {kind: Path(export(t["tag"], root / kind)["out"]) for kind, t in trained.items()}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, prepend=tokenizer.bos_token_id)


def padded(rows: list[list[int]], pad: int):
    """Left-padded ids [B, L] and attention mask [B, L]."""
    L = max(map(len, rows))
    ids = torch.tensor([[pad] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def logit_diffs(model, hf_model, tokenizer) -> list[float]:
    """Per prompt alone, then the 4 prompts as one left-padded batch: max |ours - transformers'|."""
    rows = [encode(tokenizer, p) for p in PROMPTS]
    ours = [model(torch.tensor([r]))[0] for r in rows]
    diffs = [(o - hf_model(torch.tensor([r])).logits[0]).abs().max().item() for o, r in zip(ours, rows)]
    ids, mask = padded(rows, tokenizer.bos_token_id)
    batch = hf_model(input_ids=ids, attention_mask=mask).logits
    diffs += [(o - b[m.bool()]).abs().max().item() for o, b, m in zip(ours, batch, mask)]
    return diffs


def load(folder, **overrides):
    from nanochat.hf_export import load_hf_model
    return load_hf_model(str(folder), **overrides)


@pytest.mark.parametrize("kind", ["baseline", "mhc"])
def test_exported_logits_equal_ours_alone_and_in_a_padded_batch(trained, exported, tiny_base_dir, kind):
    model, tok = trained[kind]["model"], tiny_base_dir.tokenizer
    hf_model = load(exported[kind])
    diffs = logit_diffs(model, hf_model, tok)
    assert len(diffs) == 8 and max(diffs) <= ATOL, diffs
    config = json.loads((exported[kind] / "config.json").read_text())
    files = os.listdir(exported[kind])
    if kind == "baseline":  # transformers' own class, no code of ours in the folder
        assert config["model_type"] == "nanochat" and not [f for f in files if f.endswith(".py")]
        assert type(hf_model).__module__ == "transformers.models.nanochat.modeling_nanochat"
        assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 2  # GQA mapped
    else:
        assert config["model_type"] == "nanochat_mhc" and config["mhc_gates"] is None
        assert {"configuration_nanochat_mhc.py", "modeling_nanochat_mhc.py"} <= set(files)
        assert type(hf_model).__name__ == "NanoChatMHCForCausalLM"
        # the modeling code depends on torch and transformers only (and the standard library)
        for name in ("configuration_nanochat_mhc.py", "modeling_nanochat_mhc.py"):
            source = open(os.path.join(exported[kind], name)).read()
            imports = [line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))]
            assert "transformers" in imports, imports
            assert all(m.split(".")[0] in ("torch", "transformers") or m.startswith(".")
                       or m.split(".")[0] in sys.stdlib_module_names for m in imports), imports


@pytest.mark.parametrize("kind", ["baseline", "mhc"])
def test_greedy_generation_gives_our_32_tokens(trained, exported, tiny_base_dir, kind):
    from nanochat.engine import Engine
    model, tok = trained[kind]["model"], tiny_base_dir.tokenizer
    hf_model = load(exported[kind])
    rows = [encode(tok, p) for p in PROMPTS]
    ours = [g.tokens for g in Engine(model, tok).generate(rows, 32)]
    assert all(len(o) == 32 for o in ours)
    # no eos: our engine was given no stop token either (32 tokens each, whatever they are). The attention mask
    # is given: without an eos, generate would infer one from the pad id (BOS) and mask the leading BOS out
    one = torch.tensor([rows[0]])
    single = hf_model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=32, do_sample=False,
                               eos_token_id=None)
    assert single[0, len(rows[0]):].tolist() == ours[0]
    ids, mask = padded(rows, tok.bos_token_id)
    batch = hf_model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert [b[ids.size(1):].tolist() for b in batch] == ours


def test_mhc_gates_in_the_config_equal_our_overrides(trained, exported, tiny_base_dir, tmp_path):
    """Two override gates: one global value stored at export (--mhc-gates 0.5), and one per sub-layer given to
    from_pretrained; each equals our model at the same gates, and differs from the learned gates."""
    from nanochat.engine import Engine
    model, tok = trained["mhc"]["model"], tiny_base_dir.tokenizer
    learned = load(exported["mhc"])
    export(trained["mhc"]["tag"], tmp_path / "g05", "--mhc-gates", "0.5")
    assert json.load(open(tmp_path / "g05" / "config.json"))["mhc_gates"] == 0.5
    per_sublayer = [0.0, 1.0, 0.3, 0.9]
    for hf_model, setter in ((load(tmp_path / "g05"), lambda: model.set_mhc_gate(0.5)),
                             (load(exported["mhc"], mhc_gates=per_sublayer),
                              lambda: model.set_mhc_gates_per_sublayer(per_sublayer))):
        setter()
        try:
            assert max(logit_diffs(model, hf_model, tok)) <= ATOL
            row = encode(tok, PROMPTS[1])
            ours = Engine(model, tok).generate([row], 32)[0].tokens
            one = torch.tensor([row])
            theirs = hf_model.generate(one, attention_mask=torch.ones_like(one), max_new_tokens=32, do_sample=False,
                                       eos_token_id=None)
            assert theirs[0, len(row):].tolist() == ours
            row_t = torch.tensor([encode(tok, PROMPTS[0])])
            with torch.no_grad():  # the override is not a no-op
                assert (hf_model(row_t).logits - learned(row_t).logits).abs().max().item() > 1e-2
        finally:
            model.clear_mhc_gates()


def test_the_comparison_catches_a_transposed_weight_or_a_dropped_norm(trained, exported, tiny_base_dir, tmp_path):
    """Mutations of a correct export: each moves the logits far beyond the bound, and verify_export refuses it."""
    from safetensors.torch import load_file, save_file

    from nanochat.hf_export import verify_export
    tok = tiny_base_dir.tokenizer
    for kind in ("baseline", "mhc"):
        model = trained[kind]["model"]
        assert verify_export(str(exported[kind]), model) <= ATOL  # the unmutated folder passes
        bad = tmp_path / f"{kind}_transposed"
        shutil.copytree(exported[kind], bad)
        weights = load_file(bad / "model.safetensors")
        key = "model.layers.0.self_attn.q_proj.weight"  # square ([64, 64]): loads, but computes something else
        weights[key] = weights[key].T.contiguous()
        save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
        assert min(logit_diffs(model, load(bad), tok)) > 1e-2
        with pytest.raises(UserError, match="does not compute what our model"):
            verify_export(str(bad), model)
        dropped = load(exported[kind])  # the QK norm of layer 0's keys removed
        dropped.model.layers[0].self_attn.k_norm = torch.nn.Identity()
        assert min(logit_diffs(model, dropped, tok)) > 1e-2
    # mHC only: a Sinkhorn cut short is caught too
    assert max(logit_diffs(trained["mhc"]["model"], load(exported["mhc"], mhc_sinkhorn_iters=1), tok)) > 1e-3


def test_a_bfloat16_export_keeps_the_coefficients_in_float32_and_verifies(trained, tmp_path):
    from safetensors import safe_open
    report = export(trained["mhc"]["tag"], tmp_path / "bf16", "--dtype", "bfloat16")
    assert report["max_abs_logit_diff"] <= ATOL  # transformers in float32 vs ours with the same rounded weights
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert dtypes["model.layers.0.attn_connection.phi"] == "F32" and dtypes["model.readout.b"] == "F32"
    meta = json.load(open(tmp_path / "bf16" / "nanochat_meta.json"))
    assert meta["dtype"] == "bfloat16" and meta["verification"]["max_abs_logit_diff"] <= ATOL


def test_base_eval_reads_an_export_back_with_the_checkpoints_numbers(trained, exported, tmp_path, tiny_base_dir):
    """base_eval --hf on the export gives the checkpoint's val bpb; an export with stored gates is evaluated at
    them (the same as --mhc-gates on the checkpoint); the cross-check with transformers is recorded."""
    from scripts.base_eval import main as base_eval
    export(trained["mhc"]["tag"], tmp_path / "mhc_g03", "--mhc-gates", "0.3")
    common = ["--tasks", "bpb", "--eval-tokens", "2048", "--device-batch-size", "4", "--results-dir",
              str(tmp_path / "res")]
    cases = [(["--model-tag", "hf_baseline"], ["--hf", str(exported["baseline"])]),
             (["--model-tag", "hf_mhc", "--mhc-gates", "0.3"], ["--hf", str(tmp_path / "mhc_g03")])]
    for i, (ckpt_flags, hf_flags) in enumerate(cases):
        base_eval(common + ckpt_flags + ["--output-tag", f"ckpt{i}"])
        base_eval(common + hf_flags + ["--output-tag", f"hf{i}"])
        ckpt = json.load(open(tmp_path / "res" / f"ckpt{i}" / "eval.json"))
        hf = json.load(open(tmp_path / "res" / f"hf{i}" / "eval.json"))
        assert hf["results"]["bpb"]["val_bpb"] == pytest.approx(ckpt["results"]["bpb"]["val_bpb"], abs=1e-6)
        assert hf["hf_cross_check"]["done"] and hf["hf_cross_check"]["max_abs_logit_diff"] <= ATOL
        assert hf["step"] == ckpt["step"] == 40
    # a different gate moves the bpb: the stored gates are really applied
    base_eval(common + ["--model-tag", "hf_mhc", "--output-tag", "learned"])
    learned = json.load(open(tmp_path / "res" / "learned" / "eval.json"))["results"]["bpb"]["val_bpb"]
    assert abs(learned - json.load(open(tmp_path / "res" / "hf1" / "eval.json"))["results"]["bpb"]["val_bpb"]) > 1e-4


def test_the_model_card_reports_the_results_and_the_scale(trained, tmp_path):
    results = tmp_path / "results"
    (results / "hf_baseline").mkdir(parents=True)
    record = dict(step=40, status="complete", results=dict(
        bpb=dict(val_bpb=2.345678), hellaswag=dict(metric="acc_norm", score=0.31, ci95=[0.2, 0.4], n=50)))
    (results / "hf_baseline" / "eval.json").write_text(json.dumps(record))
    export("hf_baseline", tmp_path / "card", "--results-dir", str(results))
    card = (tmp_path / "card" / "README.md").read_text()
    assert "library_name: transformers" in card and "**Smoke scale.**" in card
    assert "| bpb | val bits per byte | 2.3457 |" in card and "| hellaswag | acc_norm | 0.3100 |" in card
    assert trained["baseline"]["meta"]["git_commit"] in card and "Evaluated at step" not in card
    record["step"] = 20  # results of another step are flagged, not passed off as this model's
    (results / "hf_baseline" / "eval.json").write_text(json.dumps(record))
    export("hf_baseline", tmp_path / "card", "--results-dir", str(results), "--force")
    assert "**Evaluated at step 20, not at the exported step 40.**" in (tmp_path / "card" / "README.md").read_text()
    export("hf_baseline", tmp_path / "nocard", "--results-dir", str(tmp_path / "none"))
    assert "No evaluation was found" in (tmp_path / "nocard" / "README.md").read_text()


def test_push_to_hub_dry_run_lists_the_files_and_sends_nothing(trained, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the dry run touched the Hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    export("hf_mhc", tmp_path / "push", "--push-to-hub", "me/tiny-mhc", "--dry-run")
    out = capsys.readouterr().out
    assert "would upload" in out and "https://huggingface.co/me/tiny-mhc" in out
    for name in ("config.json", "model.safetensors", "modeling_nanochat_mhc.py", "tokenizer.json", "README.md"):
        assert f"  {name}  " in out


def test_bad_input_is_named(trained, tmp_path, tiny_base_dir, monkeypatch):
    from scripts.base_eval import main as base_eval
    out = tmp_path / "x"
    cases = [
        (["--model-tag", "no_such_tag", "--out", str(out)], "no checkpoint for model tag 'no_such_tag'"),
        (["--model-tag", "hf_baseline"], "pass --out DIR"),
        (["--model-tag", "hf_baseline", "--out", str(out), "--mhc-gates", "0.5"], "has no mHC"),
        (["--model-tag", "hf_mhc", "--out", str(out), "--mhc-gates", "0.5,0.5,0.5"], "3 gate values; this model "
                                                                                     "takes 1 .global., 2"),
        (["--model-tag", "hf_mhc", "--out", str(out), "--mhc-gates", "1.5"], "--mhc-gates must be"),
        (["--model-tag", "hf_mhc", "--out", str(out), "--dtype", "float16"], "--dtype must be one of"),
        (["--model-tag", "hf_mhc", "--out", str(out), "--dry-run"], "pass --push-to-hub"),
        (["--model-tag", "hf_mhc", "--out", str(out), "--push-to-hub", "noslash"], "expected a Hub repository id"),
        (["--model-tag", "../x", "--out", str(out)], "is not a plain name"),
    ]
    from scripts.export_hf import main as export_main
    for argv, message in cases:
        with pytest.raises(UserError, match=message):
            export_main(argv)
    assert not out.exists()  # a refused export writes nothing
    # a non-empty --out is refused without --force, and left as it was
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--out .* is not empty: choose another folder, or pass --force"):
        export("hf_baseline", busy)
    assert os.listdir(busy) == ["keep.txt"]
    export("hf_baseline", busy, "--force")  # replaced, with no temporary folder left beside it
    assert "keep.txt" not in os.listdir(busy) and "config.json" in os.listdir(busy)
    assert sorted(os.listdir(tmp_path)) == sorted(p for p in os.listdir(tmp_path) if not p.startswith("."))
    # an nGPT model is refused by name
    from nanochat.checkpoint import checkpoint_root, save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    cfg = GPTConfig(sequence_len=32, vocab_size=tiny_base_dir.tokenizer.vocab_size, n_layer=1, n_head=2,
                    n_kv_head=2, n_embd=64, arch="ngpt")
    ngpt = GPT(cfg)
    ngpt.init_weights()
    save_checkpoint(checkpoint_root("hf_ngpt"), 1, ngpt, [], dict(model_config=cfg.to_dict(),
                                                                  tokenizer=tiny_base_dir.tokenizer.fingerprint))
    with pytest.raises(UserError, match="ngpt model .* supports the GPT baseline and mHC only"):
        export("hf_ngpt", tmp_path / "ngpt")
    # a failure mid-export leaves neither a half folder nor a temporary one
    import nanochat.hf_export as hf_export

    def broken(*a, **k):
        raise UserError("injected")
    monkeypatch.setattr(hf_export, "verify_export", broken)
    with pytest.raises(UserError, match="injected"):
        export("hf_baseline", tmp_path / "half")
    assert not (tmp_path / "half").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".half")]
    monkeypatch.undo()
    # without transformers: one line naming the extra
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[hf\]'"):
        export("hf_baseline", tmp_path / "nohf")
    monkeypatch.undo()
    # base_eval --hf: a folder that is not an export, and --hf with --model-tag
    with pytest.raises(UserError, match="is not a folder written by scripts.export_hf"):
        base_eval(["--hf", str(tmp_path / "busy" / "nanochat_tokenizer"), "--output-tag", "x"])
    with pytest.raises(UserError, match="without --model-tag or --checkpoint"):
        base_eval(["--hf", str(busy), "--model-tag", "hf_baseline"])


@pytest.mark.parametrize("settings", [dict(dynamic=False), dict(readout="sum"), dict(num_streams=2, n_kv_head=1),
                                      dict(gate_learnable=False, gate_init=0.5), dict(sinkhorn_tau=0.5)],
                         ids=["static", "sum-readout", "2-streams-gqa", "fixed-gate", "tau"])
def test_every_mhc_variant_exports_exactly(tiny_base_dir, transformers_installed, tmp_path, settings):
    """The modeling code covers each MHCConfig choice that changes the numbers (the export verifies itself at
    1e-4; here also against our model on the test prompts, at random weights with O(1) logits)."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.hf_export import export_checkpoint
    from nanochat.mhc import MHCConfig
    tok = tiny_base_dir.tokenizer
    torch.manual_seed(0)
    n_kv = settings.pop("n_kv_head", 2)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=n_kv, n_embd=64,
                    out_proj_init_scale=1.0, mhc=MHCConfig(enabled=True, **settings))
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        for p in model.mhc_parameters():  # away from the init, so every coefficient matters
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    report = export_checkpoint(model, dict(step=0), tok, str(tmp_path / "x"))
    assert report["max_abs_logit_diff"] <= ATOL
    assert max(logit_diffs(model, load(tmp_path / "x"), tok)) <= ATOL


def test_the_rl_policys_mean_gates_can_be_exported(trained, tmp_path, tiny_base_dir):
    rl_eval = tmp_path / "eval.json"
    rl_eval.write_text(json.dumps(dict(arms=dict(rl_policy=dict(chosen_gates=dict(mean=[0.1, 0.7]))))))
    export("hf_mhc", tmp_path / "rl", "--mhc-gates-from", str(rl_eval))
    assert json.load(open(tmp_path / "rl" / "config.json"))["mhc_gates"] == [0.1, 0.7]  # per layer (L = 2)
    model = trained["mhc"]["model"]
    model.set_mhc_gates_per_layer([0.1, 0.7])
    try:
        assert max(logit_diffs(model, load(tmp_path / "rl"), tiny_base_dir.tokenizer)) <= ATOL
    finally:
        model.clear_mhc_gates()
    with pytest.raises(UserError, match="not an RL eval.json"):
        export("hf_mhc", tmp_path / "rl2", "--mhc-gates-from", str(tmp_path / "missing.json"))


def test_a_full_disk_mid_export_is_one_line_and_leaves_nothing(trained, tmp_path, monkeypatch):
    import safetensors.torch

    from nanochat.common import WriteError

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(WriteError, match=r"cannot write .*full: \[Errno 28\] No space left on device"):
        export("hf_baseline", tmp_path / "full")
    assert os.listdir(tmp_path) == []
