"""Export a checkpoint to a Hugging Face transformers folder (and optionally push it to the Hub).

    python -m scripts.export_hf --model-tag d12 --out exports/d12
    python -m scripts.export_hf --model-tag d12_mhc --out exports/d12_mhc --mhc-gates 0.5 --dtype bfloat16
    python -m scripts.export_hf --model-tag d12 --out exports/d12 --push-to-hub me/nanochat-d12 --dry-run

The baseline loads with transformers' own NanoChat (`AutoModelForCausalLM.from_pretrained(DIR)`); an mHC model
with its modeling code, `from_pretrained(DIR, trust_remote_code=True)`. Every export is checked before it is kept:
transformers' float32 logits must equal ours within 1e-4 on a probe batch. Check a downloaded export with
`python -m scripts.base_eval --hf DIR`. Needs the [hf] extra: pip install -e '.[hf]'. docs/hf_export.md maps every
tensor and architectural choice.
"""
from __future__ import annotations

from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import doc_summary, run_main
from nanochat.config import ExportConfig, build_config
from nanochat.hf_export import export_checkpoint, push_to_hub, require_hf
from nanochat.tokenizer import get_tokenizer


def main(argv=None):
    cfg, _ = build_config(ExportConfig, argv, description=doc_summary(__doc__))
    require_hf()
    gates = cfg.gate_values()
    path = cfg.checkpoint or resolve_checkpoint(cfg.model_tag, cfg.step)
    model, meta = load_model(path)
    tokenizer = get_tokenizer()
    check_tokenizer(meta, tokenizer, path)
    model_tag = cfg.model_tag or meta.get("run_config", {}).get("model_tag", "")
    if gates is not None and len(gates) == 1:
        gates = gates[0]
    report = export_checkpoint(model, meta, tokenizer, cfg.out, dtype=cfg.dtype, gates=gates, force=cfg.force,
                               model_tag=model_tag, results_dir=cfg.results_dir, checkpoint_path=path)
    print(f"exported {path} (step {meta['step']}) as {report['architecture']} to {report['out']}: "
          f"{', '.join(report['files'])}")
    print(f"verified: transformers' float32 logits differ from ours by at most {report['max_abs_logit_diff']:.2e}")
    if cfg.push_to_hub:
        plan = push_to_hub(report["out"], cfg.push_to_hub, dry_run=cfg.dry_run)
        verb = "would upload" if cfg.dry_run else "uploaded"
        total = sum(size for _, size in plan)
        print(f"{verb} {len(plan)} files ({total / 1e6:.1f} MB) to https://huggingface.co/{cfg.push_to_hub}:")
        for name, size in plan:
            print(f"  {name}  {size:,} bytes")
    return report


if __name__ == "__main__":
    run_main(main)
