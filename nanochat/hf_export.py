"""Export a checkpoint to a Hugging Face transformers folder, and read one back.

    python -m scripts.export_hf --model-tag d12 --out exports/d12          (scripts/export_hf.py)

What a folder holds:
- the baseline GPT (mHC off) as transformers' own NanoChat architecture (`NanoChatForCausalLM`, no custom code):
  config.json, model.safetensors, generation_config.json. Every tensor and architectural choice maps one to one
  (docs/hf_export.md lists them, and the one difference: the RMSNorm epsilon, which the config carries exactly);
- an mHC model as `NanoChatMHCForCausalLM`, whose configuration_/modeling_nanochat_mhc.py (nanochat/hf_remote/,
  torch and transformers only) are copied beside the weights and registered in config.json's auto_map, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads it. Its gates are config.mhc_gates;
- tokenizer.json and tokenizer_config.json (nanochat/hf_tokenizer.py): AutoTokenizer gives our ids;
- README.md, the model card: the training config, tokens, val bpb and the eval table from results/, the commit,
  and the "smoke scale" label under 50 M parameters;
- nanochat_meta.json (our model config, step, run config, tokenizer fingerprint, the verification) and
  nanochat_tokenizer/ (our tokenizer's own files): what `scripts.base_eval --hf DIR` reads back.

An export is verified before it is kept: transformers loads the folder, and its float32 logits must equal ours
within VERIFY_ATOL on a probe batch (a left-padded row included); otherwise nothing is written. Folders are written
to a temporary sibling and renamed into place, so an interrupted export leaves no half folder. nGPT models and the
orthostochastic H_res constraint are refused by name (no modeling code for them yet).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile

import torch

from nanochat.common import SMOKE_PARAMS, UserError, WriteError, git_commit

REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_CODE_FILES = ("configuration_nanochat_mhc.py", "modeling_nanochat_mhc.py")
META_JSON = "nanochat_meta.json"
OUR_TOKENIZER_DIR = "nanochat_tokenizer"
# float32 logits of the same weights through two implementations differ by rounding only (measured on the tiny
# speedrun's models: 0 to 5e-6 per prompt, up to 1.5e-5 with a left-padded row); 1e-4 is the acceptance bound, far
# below any real difference (a dropped norm or a transposed weight moves them by more than 1e-2)
VERIFY_ATOL = 1e-4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# what every export's tokenizer must encode as ours does (tests/test_hf_tokenizer.py checks far more): unicode,
# whitespace runs, digit groups, contractions and a special token's text inside ordinary text (text, not special)
TOKENIZER_CHECK_TEXTS = ["Hello world! It's 2026: 1234567 apples, I'LL see.", "  tabs\t\tand\r\n\n\nnewlines   ",
                         "ünïcödé, 数学, emoji 🙂, עברית", "hello <|bos|> world <|assistant_end|>"]

# our state-dict names -> transformers' (a prefix each; layer keys are transformer.h.<i>.<suffix>)
TOP_KEYS = (("transformer.wte.", "model.embed_tokens."), ("lm_head.", "lm_head."),
            ("stream_ends.embed", "model.stream_embed"), ("stream_ends.readout.", "model.readout."))
LAYER_KEYS = (("attn.c_q.", "self_attn.q_proj."), ("attn.c_k.", "self_attn.k_proj."),
              ("attn.c_v.", "self_attn.v_proj."), ("attn.c_proj.", "self_attn.o_proj."),
              ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."),
              ("mhc_attn.", "attn_connection."), ("mhc_mlp.", "mlp_connection."))


def require_hf():
    """transformers, tokenizers and safetensors, or one line saying how to install them."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"the Hugging Face export needs transformers and tokenizers ({e}): pip install -e '.[hf]'") \
            from None


def _rename(key: str, pairs, reverse: bool) -> str | None:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _map_key(key: str, reverse: bool) -> str | None:
    """One state-dict key through the tables (ours -> exported, or back with reverse); None when none matches."""
    src, dst = ("model.layers.", "transformer.h.") if reverse else ("transformer.h.", "model.layers.")
    if key.startswith(src):
        i, rest = key[len(src):].split(".", 1)
        new = _rename(rest, LAYER_KEYS, reverse)
        if new is not None:
            return f"{dst}{i}.{new}"
    return _rename(key, TOP_KEYS, reverse)


def hf_key(key: str) -> str:
    """Our state-dict key -> the exported one (transformer.h.3.attn.c_q.weight ->
    model.layers.3.self_attn.q_proj.weight)."""
    new = _map_key(key, reverse=False)
    if new is None:
        raise UserError(f"the export has no Hugging Face name for the weight {key!r}")
    return new


def our_key(key: str) -> str:
    """The inverse of hf_key."""
    new = _map_key(key, reverse=True)
    if new is None:
        raise UserError(f"an exported folder holds a weight this repo does not know: {key!r}")
    return new


def check_exportable(config):
    """The architectures the modeling code covers: the GPT baseline, and mHC with the Sinkhorn constraint."""
    if config.arch != "gpt":
        raise UserError(f"this checkpoint is an {config.arch} model (arch {config.arch!r}): the Hugging Face export "
                        f"supports the GPT baseline and mHC only")
    if config.mhc.enabled and config.mhc.constraint != "sinkhorn":
        raise UserError(f"this mHC checkpoint uses the {config.mhc.constraint!r} H_res constraint: the Hugging Face "
                        f"export supports the sinkhorn constraint only")


def gate_list(gates) -> list:
    """config.mhc_gates (one number or a list) as the flat list GPT.set_mhc_gates_by_count takes."""
    return list(gates) if isinstance(gates, (list, tuple)) else [gates]


def special_ids(tokenizer) -> dict:
    """bos = <|bos|> (every document starts with it); generation stops at <|assistant_end|> (chat) or <|bos|> (a new
    document); padding uses <|bos|> (masked out, so its value never matters)."""
    bos = tokenizer.bos_token_id
    return dict(bos_token_id=bos, eos_token_id=[tokenizer.encode_special("<|assistant_end|>"), bos],
                pad_token_id=bos)


def hf_config_dict(config, tokenizer, gates=None) -> dict:
    """config.json for GPTConfig `config`: transformers' NanoChat (mHC off) or our NanoChatMHC (mHC on)."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
                  num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                  num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
                  # F.rms_norm's default epsilon, float32's machine epsilon: every norm of ours (embedding, QK,
                  # pre-norm, final) uses it in float32
                  rms_norm_eps=torch.finfo(torch.float32).eps,
                  final_logit_softcapping=config.logit_softcap or None,
                  tie_word_embeddings=False, **special_ids(tokenizer))
    if not config.mhc.enabled:
        return dict(model_type="nanochat", architectures=["NanoChatForCausalLM"], hidden_act="relu2",
                    attention_bias=False, attention_dropout=0.0,
                    rope_parameters={"rope_type": "default", "rope_theta": config.rope_base}, **common)
    m = config.mhc
    return dict(model_type="nanochat_mhc", architectures=["NanoChatMHCForCausalLM"],
                auto_map={"AutoConfig": "configuration_nanochat_mhc.NanoChatMHCConfig",
                          "AutoModelForCausalLM": "modeling_nanochat_mhc.NanoChatMHCForCausalLM"},
                rope_theta=config.rope_base, mhc_num_streams=m.num_streams, mhc_sinkhorn_iters=m.sinkhorn_iters,
                mhc_sinkhorn_tau=m.sinkhorn_tau, mhc_dynamic=m.dynamic, mhc_readout=m.readout,
                mhc_gate_learnable=m.gate_learnable, mhc_gates=gates, **common)


def hf_state_dict(model, dtype: torch.dtype) -> dict:
    """Our weights under the exported names; matrices and embeddings in `dtype`, mHC's coefficients in float32
    (the exported model computes them in float32, as training did)."""
    out = {}
    for key, value in model.state_dict().items():
        name = hf_key(key)
        keep_fp32 = "_connection." in name or name.startswith(("model.readout.", "model.stream_embed"))
        out[name] = value.detach().to(torch.float32 if keep_fp32 else dtype).contiguous()
    return out


def probe_batch(vocab_size: int, seq_len: int, bos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed probe: 3 rows of T tokens (T = min(24, seq_len)), the last left-padded by a third.
    Returns (ids [3, T], attention_mask [3, T])."""
    T = min(24, seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (3, T), generator=g)
    ids[:, 0] = bos
    mask = torch.ones(3, T, dtype=torch.long)
    pad = T // 3
    mask[2, :pad] = 0
    ids[2, :pad] = bos
    ids[2, pad] = bos
    return ids, mask


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Our model's float32 logits for each row's real tokens, each row alone (no padding): [T_row, V] per row."""
    rows = []
    for row, m in zip(ids, mask):
        real = row[m.bool()][None]
        rows.append(model(real)[0].float())
    return rows


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """transformers' logits for the same rows as one padded batch, cut back to each row's real tokens."""
    out = hf_model(input_ids=ids, attention_mask=mask).logits.float()
    return [o[m.bool()] for o, m in zip(out, mask)]


def max_logit_diff(model, hf_model, ids, mask) -> float:
    return max((a - b).abs().max().item() for a, b in zip(reference_logits(model, ids, mask),
                                                          hf_logits(hf_model, ids, mask)))


def load_hf_model(folder: str, dtype: torch.dtype = torch.float32, **config_overrides):
    """AutoModelForCausalLM on an exported folder (its own code for mHC), in eval mode."""
    require_hf()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a loading bar per verification is noise in a script's output
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **config_overrides)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval()


def verify_export(folder: str, model, ids=None, mask=None) -> float:
    """Load `folder` with transformers in float32 and compare its logits with `model`'s (ours, with the exported
    weights and gates) on the probe batch. Returns the largest absolute difference; raises when it exceeds
    VERIFY_ATOL (a folder that computes something else is never kept)."""
    config = model.config
    if ids is None:
        ids, mask = probe_batch(config.vocab_size, config.sequence_len, bos=0)
    diff = max_logit_diff(model, load_hf_model(folder), ids, mask)
    if not diff <= VERIFY_ATOL:
        raise UserError(f"the model in {folder}, loaded with transformers, does not compute what our model with its "
                        f"weights computes: the logits differ by up to {diff:.3g} (allowed {VERIFY_ATOL})")
    return diff


def rounded_copy(model, dtype: torch.dtype):
    """Our model with its exported tensors rounded to `dtype` and back to float32 (what a bfloat16 export holds,
    computed in float32): the reference the verification compares with."""
    if dtype == torch.float32:
        return model
    twin = copy.deepcopy(model)
    state = hf_state_dict(model, dtype)
    twin.load_state_dict({our_key(k): v.float() for k, v in state.items()})
    return twin.eval()


def read_results(results_dir: str, model_tag: str) -> dict | None:
    """results/<tag>/eval.json when it exists and is complete enough to report (its `results`)."""
    path = os.path.join(results_dir, model_tag, "eval.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return dict(path=path, step=record.get("step"), status=record.get("status"), results=record.get("results", {}))


def model_card(meta: dict, config, num_params: int, model_tag: str, results: dict | None, gates, dtype: str,
               mhc: bool) -> str:
    """README.md: what the model is, how it was trained, what it scores, how to load it."""
    run = meta.get("run_config", {})
    train = run.get("train", {})
    smoke = num_params < SMOKE_PARAMS
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [nanochat, " + ("mhc, hyper-connections, custom_code" if mhc else "nanochat-baseline") + "]",
             "---", "", f"# {model_tag}", ""]
    if smoke:
        lines += [f"> **Smoke scale.** {num_params / 1e6:.1f} M parameters (under {SMOKE_PARAMS / 1e6:.0f} M): a test "
                  "of the pipeline, not a finding about mHC.", ""]
    kind = (f"GPT with Dynamic Manifold-Constrained Hyper-Connections (mHC, arXiv 2512.24880): "
            f"{config.mhc.num_streams} residual streams, Sinkhorn-Knopp H_res ({config.mhc.sinkhorn_iters} "
            f"iterations)" if mhc else "the nanochat GPT baseline (transformers' own NanoChat architecture)")
    trust = ", trust_remote_code=True" if mhc else ""  # the modeling code beside the weights (AutoTokenizer too)
    lines += [f"A {config.n_layer}-layer {kind}, trained with nanochat-mHC at commit "
              f"`{meta.get('git_commit', 'unknown')}` (exported at `{git_commit()}`).", "",
              "## Load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH" + trust + ")",
              "model = AutoModelForCausalLM.from_pretrained(PATH" + trust + ")",
              "inputs = tok(\"The capital of France is\", return_tensors=\"pt\")  # BOS first, as in training",
              "print(tok.decode(model.generate(**inputs, max_new_tokens=16, do_sample=False)[0]))", "```", "",
              "The tokenizer puts `<|bos|>` first (`add_special_tokens=False` leaves it out), and encodes a special "
              "token's text typed inside ordinary text as text, never as the special token. Generation stops at "
              "`<|assistant_end|>` or `<|bos|>` (the start of a new document).", ""]
    if mhc:
        lines += ["The gates g of H_res := (1 - g) I + g H_res are `config.mhc_gates`: "
                  + ("the learned ones (null)" if gates is None else f"set at export to {gates}")
                  + "; pass `mhc_gates=` to `from_pretrained` (one value, one per layer or one per sub-layer) to "
                    "change them.", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|",
              f"| parameters | {num_params:,} |",
              f"| layers / width / heads (kv) | {config.n_layer} / {config.n_embd} / {config.n_head} "
              f"({config.n_kv_head}) |",
              f"| context | {config.sequence_len} |", f"| vocabulary | {config.vocab_size} |",
              f"| step | {meta.get('step')} |",
              f"| pretraining data | {train.get('data_source', 'unknown')} |"]
    if "sft" in run:  # a fine-tuned model: its base and its fine-tuning data
        lines += [f"| fine-tuned from | `{run.get('base_checkpoint', '?')}` (step {run.get('base_step', '?')}) |",
                  f"| fine-tuning data | {', '.join(run.get('data', [])) or '?'}, {run.get('train_rows', '?')} rows |"]
    else:
        lines.append(f"| pretraining tokens | {run['tokens']:,} |" if isinstance(run.get("tokens"), int)
                     else "| pretraining tokens | unknown |")
    lines += [f"| training dtype | {run.get('dtype', 'unknown')} |", f"| exported dtype | {dtype} |", ""]
    lines += ["## Evaluation", ""]
    if not results or not results.get("results"):
        lines += ["No evaluation was found in the results folder when this model was exported.", ""]
    else:
        r = results["results"]
        stale = results.get("step") != meta.get("step")
        lines += [f"From `{results['path']}` (step {results.get('step')}, status {results.get('status')}), computed "
                  "as lm-evaluation-harness does" + (f". **Evaluated at step {results.get('step')}, not at the "
                                                     f"exported step {meta.get('step')}.**" if stale else ":"), "",
                  "| task | metric | score | 95% CI | n |", "|---|---|---|---|---|"]
        if "bpb" in r:
            lines.append(f"| bpb | val bits per byte | {r['bpb'].get('val_bpb', float('nan')):.4f} | | |")
        for name, s in r.items():
            if name == "bpb" or not isinstance(s, dict) or "score" not in s:
                continue
            lo, hi = s.get("ci95", [float("nan")] * 2)
            lines.append(f"| {name} | {s.get('metric', '')} | {s['score']:.4f} | [{lo:.3f}, {hi:.3f}] | {s.get('n')} |")
        lines.append("")
    return "\n".join(lines)


def export_checkpoint(model, meta: dict, tokenizer, out_dir: str, dtype: str = "float32", gates=None,
                      force: bool = False, model_tag: str = "", results_dir: str = "results",
                      checkpoint_path: str = "") -> dict:
    """Write the folder for `model` (ours, float32, its learned gates) into out_dir, verified, atomically.
    gates: None (learned) or 1, L or 2L values, stored in config.mhc_gates. Returns a report (files, logit diff)."""
    require_hf()
    from safetensors.torch import save_file

    from nanochat.hf_tokenizer import check_hf_tokenizer, write_hf_tokenizer
    config = model.config
    check_exportable(config)
    model.eval()  # an export is for inference: no gate noise or sampling in the verification
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if gates is not None and not config.mhc.enabled:
        raise UserError("--mhc-gates given, but the checkpoint has no mHC (no gates to set)")
    if gates is not None:  # the count is checked against the model before anything is written
        model.set_mhc_gates_by_count(gate_list(gates), "--mhc-gates")
        model.clear_mhc_gates()
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise UserError(f"--out {out_dir} is not empty: choose another folder, or pass --force to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a shared folder, as makedirs would make it (mkdtemp's is private)
    try:
        cfg = hf_config_dict(config, tokenizer, gates)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(cfg, dtype=dtype), f, indent=2)
        save_file(hf_state_dict(model, DTYPES[dtype]), os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        generation = dict(special_ids(tokenizer), do_sample=False)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        if config.mhc.enabled:
            for name in REMOTE_CODE_FILES:
                shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(tmp, name))
        write_hf_tokenizer(tokenizer, tmp, model_max_length=config.sequence_len)
        check_hf_tokenizer(tokenizer, tmp, TOKENIZER_CHECK_TEXTS)  # AutoTokenizer gives our ids, or no export
        tokenizer.save(os.path.join(tmp, OUR_TOKENIZER_DIR))
        # what the verification compares with: our model at the exported gates, with the exported rounding
        reference = rounded_copy(model, DTYPES[dtype])
        if gates is not None:
            reference.set_mhc_gates_by_count(gate_list(gates), "--mhc-gates")
        ids, mask = probe_batch(config.vocab_size, config.sequence_len, tokenizer.bos_token_id)
        try:
            diff = verify_export(tmp, reference, ids, mask)
        finally:
            if gates is not None:
                reference.clear_mhc_gates()
        num_params = model.num_params()
        results = read_results(results_dir, model_tag) if model_tag else None
        record = dict(model_config=config.to_dict(), step=meta.get("step"), run_config=meta.get("run_config", {}),
                      tokenizer=tokenizer.fingerprint, source_checkpoint=checkpoint_path,
                      trained_git_commit=meta.get("git_commit"), export_git_commit=git_commit(), dtype=dtype,
                      mhc_gates=gates, num_params=num_params,
                      verification=dict(max_abs_logit_diff=diff, atol=VERIFY_ATOL, probe_rows=int(ids.size(0)),
                                        probe_tokens=int(mask.sum())))
        with open(os.path.join(tmp, META_JSON), "w") as f:
            json.dump(record, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(meta, config, num_params, model_tag or os.path.basename(out_dir), results, gates,
                               dtype, config.mhc.enabled))
        files = sorted(os.listdir(tmp))
        _replace_folder(tmp, out_dir)
    except OSError as e:  # a full or read-only disk: one line, and no half folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(out_dir, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(out=out_dir, files=files, max_abs_logit_diff=diff, architecture=cfg["architectures"][0])


def _replace_folder(tmp: str, out_dir: str):
    """Move the finished folder into place; an old one (--force) is moved aside first and removed after."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def load_export(folder: str, device="cpu", cross_check: bool = True):
    """An exported folder back into our GPT (for scripts.base_eval --hf): (model, meta, tokenizer). The weights
    are read from model.safetensors under our names (float32), the gates set from config.json. cross_check: load
    the folder with transformers too (when installed) and require the same logits on the probe batch, so what is
    evaluated is what a transformers user runs (meta["hf_cross_check"] says whether and how closely)."""
    from safetensors.torch import load_file

    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer
    folder = os.path.abspath(folder)
    meta_path = os.path.join(folder, META_JSON)
    if not os.path.isdir(folder):
        raise UserError(f"--hf {folder} does not exist")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        model_config = meta["model_config"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"--hf {folder} is not a folder written by scripts.export_hf ({META_JSON} or config.json "
                        f"missing or unreadable: {e})") from None
    tokenizer = Tokenizer.load(os.path.join(folder, OUR_TOKENIZER_DIR))
    if tokenizer.fingerprint != meta.get("tokenizer"):
        raise UserError(f"--hf {folder}: its tokenizer ({tokenizer.fingerprint}) is not the one the model was "
                        f"exported with ({meta.get('tokenizer')})")
    model = GPT(GPTConfig.from_dict(model_config))
    try:
        state = load_file(os.path.join(folder, "model.safetensors"))
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        raise UserError(f"--hf {folder}: model.safetensors cannot be read ({e})") from None
    missing, unexpected = model.load_state_dict({our_key(k): v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise UserError(f"--hf {folder}: model.safetensors does not match its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.eval()
    gates = hf_config.get("mhc_gates")
    if gates is not None:
        model.set_mhc_gates_by_count(gate_list(gates), f"{folder}/config.json mhc_gates")
    check = dict(done=False, reason="transformers is not installed (pip install -e '.[hf]')")
    if cross_check:
        try:
            require_hf()
        except UserError:
            pass
        else:
            ids, mask = probe_batch(model.config.vocab_size, model.config.sequence_len, tokenizer.bos_token_id)
            check = dict(done=True, max_abs_logit_diff=verify_export(folder, model, ids, mask), atol=VERIFY_ATOL)
    meta = dict(meta, hf_folder=folder, hf_config=hf_config, hf_cross_check=check)
    return model.to(device), meta, tokenizer


def upload_plan(folder: str) -> list[tuple[str, int]]:
    """The files an upload sends: (path relative to the folder, bytes)."""
    out = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            out.append((os.path.relpath(path, folder), os.path.getsize(path)))
    return sorted(out)


def push_to_hub(folder: str, repo_id: str, dry_run: bool = False, private: bool = True) -> list[tuple[str, int]]:
    """Upload an exported folder to the Hugging Face Hub as `repo_id` (created if missing, private by default).
    dry_run: only list what would be sent (no network)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"--push-to-hub {repo_id!r}: expected a Hub repository id, OWNER/NAME")
    plan = upload_plan(folder)
    if dry_run:
        return plan
    from huggingface_hub import HfApi
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                          commit_message=f"nanochat-mHC export ({git_commit()})")
    except Exception as e:  # noqa: BLE001 -- network, auth and hub errors all end the push with one line
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({type(e).__name__}: {e}); the folder "
                        f"{folder} is complete, retry the push later") from None
    return plan
