"""Run lm-evaluation-harness tasks on a checkpoint through the `nanochat` model (nanochat/lm_eval_adapter.py).

    python -m scripts.lm_eval --model-tag d12 --tasks gsm8k,hellaswag,arc_easy,arc_challenge
    python -m scripts.lm_eval --model-tag tiny_mhc --tasks hellaswag --limit 50 --task-data local
    python -m scripts.lm_eval --model-tag d12 --tasks gsm8k_cot --num-fewshot 8 --max-gen-toks 256

Any harness task works online (its hub dataset). Offline, the tasks listed in
nanochat/data/lm_eval_local_tasks.json (gsm8k, gsm8k_cot, hellaswag, arc_easy, arc_challenge) run on the local
copies under $NANOCHAT_DATA_DIR: each is the installed harness's own task YAML (prompts, filters, metrics, version)
with only its dataset pointed at the local files. --task-data auto uses the local copies when $NANOCHAT_DATA_DIR
holds them, the hub otherwise. Writes <results>/<tag>/lm_eval.json (the harness's results, n per task, versions,
the configuration) and lm_eval_samples.jsonl (per example: task, doc id, the filtered responses and the metrics).
Needs the [harness] extra: pip install -e '.[harness]'.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from nanochat.common import (OUTPUT_NAME_HINT, UserError, atomic_write_text, autodetect_device_type, check_name,
                             doc_summary, get_data_dir, git_commit, run_main)

LOCAL_TASKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "data",
                           "lm_eval_local_tasks.json")
LOCAL_SUFFIX = "_nanochat_local"


def import_harness():
    try:
        import lm_eval  # noqa: F401
        from nanochat import lm_eval_adapter  # noqa: F401 -- registers the model `nanochat`
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}): pip install -e '.[harness]'") from None
    return lm_eval


def local_task_configs() -> dict:
    with open(LOCAL_TASKS) as f:
        return json.load(f)["tasks"]


def has_local_data(names: list[str]) -> bool:
    data_dir = get_data_dir()
    tasks = local_task_configs()
    return bool(data_dir) and all(n in tasks and all(os.path.isfile(os.path.join(data_dir, p))
                                                     for p in tasks[n]["data_files"].values()) for n in names)


def render_local_tasks(names: list[str], out_dir: str) -> dict[str, str]:
    """One YAML per task in out_dir: the harness's task YAML included, its dataset replaced by the local JSON-lines
    files. Returns {our name: the rendered task's name}."""
    import lm_eval
    import yaml
    data_dir = get_data_dir()
    if not data_dir:
        raise UserError("--task-data local needs NANOCHAT_DATA_DIR (a folder in the layout of shared/data)")
    tasks = local_task_configs()
    harness_tasks = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    rendered = {}
    for name in names:
        spec = tasks[name]
        files = {split: os.path.join(data_dir, rel) for split, rel in spec["data_files"].items()}
        missing = [p for p in files.values() if not os.path.isfile(p)]
        if missing:
            raise UserError(f"task {name}: local data file(s) {', '.join(missing)} not found "
                            f"(NANOCHAT_DATA_DIR={data_dir})")
        cfg = {"include": os.path.join(harness_tasks, spec["yaml"]), "task": name + LOCAL_SUFFIX,
               "dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files},
               **spec.get("overrides", {})}
        with open(os.path.join(out_dir, f"{name}{LOCAL_SUFFIX}.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        rendered[name] = name + LOCAL_SUFFIX
    return rendered


def run_harness(lm, names: list[str], task_data: str = "auto", num_fewshot: int | None = None,
                limit: int | None = None, max_gen_toks: int | None = None) -> tuple[dict, list[dict], str]:
    """Evaluate `lm` on harness tasks. Returns (results per task under our names, per-sample records, data source)."""
    lm_eval = import_harness()
    from lm_eval.tasks import TaskManager
    if task_data not in ("auto", "hub", "local"):
        raise UserError(f"--task-data must be one of auto, hub, local (got {task_data!r})")
    if task_data == "auto":
        task_data = "local" if has_local_data(names) else "hub"
    with tempfile.TemporaryDirectory() as tmp:
        if task_data == "local":
            unknown = [n for n in names if n not in local_task_configs()]
            if unknown:
                raise UserError(f"--tasks {', '.join(unknown)}: no local copy (offline tasks: "
                                f"{', '.join(local_task_configs())}); use --task-data hub when online")
            mapping = render_local_tasks(names, tmp)
            manager = TaskManager(include_path=tmp)
        else:
            manager = TaskManager()
            unknown = [n for n in names if n not in manager.all_tasks]
            if unknown:
                raise UserError(f"--tasks: unknown lm-evaluation-harness task(s) {', '.join(unknown)} "
                                f"(`lm_eval ls tasks` lists them)")
            mapping = {n: n for n in names}
        out = lm_eval.simple_evaluate(model=lm, tasks=list(mapping.values()), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0,
                                      gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None)
    back = {v: k for k, v in mapping.items()}
    results = {back[k]: v for k, v in out["results"].items() if k in back}
    for name, res in results.items():
        res["n"] = out["n-samples"][mapping[name]]["effective"]
        res["version"] = out["versions"].get(mapping[name])
    samples = []
    for task, rows in out["samples"].items():
        for row in rows:
            samples.append(dict(task=back.get(task, task), doc_id=row["doc_id"], doc=row["doc"],
                                filter=row.get("filter"), resps=row.get("resps"),
                                filtered_resps=row["filtered_resps"], target=row["target"],
                                **{m: row[m] for m in ("acc", "acc_norm", "exact_match") if m in row},
                                metrics={k: v for k, v in row.items() if isinstance(v, (int, float))
                                         and k not in ("doc_id",)}))
    return results, samples, task_data


def hf_harness_model(args):
    """The harness's own `hf` model (lm_eval.models.huggingface.HFLM) on an exported folder, set up as our adapter
    scores: BOS first (add_bos_token; the exported tokenizer adds it), the folder's own code for mHC, the trained
    context as max_length. Returns (lm, folder, step)."""
    from lm_eval.models.huggingface import HFLM

    from nanochat.hf_export import META_JSON
    folder = os.path.abspath(args.hf)
    try:
        with open(os.path.join(folder, META_JSON)) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--hf {folder} is not a folder written by scripts.export_hf ({META_JSON}: {e})") from None
    device = autodetect_device_type() if args.device_type == "auto" else args.device_type
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    lm = HFLM(pretrained=folder, trust_remote_code=True, dtype=dtype, device=device, batch_size=args.batch_size,
              add_bos_token=True, max_length=meta["model_config"]["sequence_len"])
    # our adapter's stop rule: a generation ends at BOS (a new document) or a request's `until` string; the export's
    # generation config also stops at <|assistant_end|>, for chat use
    lm.model.generation_config.eos_token_id = [lm.tokenizer.bos_token_id]
    return lm, folder, meta.get("step")


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of the checkpoint")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
    p.add_argument("--hf", default="", metavar="DIR",
                   help="evaluate a folder written by scripts.export_hf with the harness's own `hf` model "
                        "(transformers, trust_remote_code for mHC) instead of our adapter: an independent check of "
                        "both the export and our evaluator (results folder: --output-tag, default the folder name)")
    p.add_argument("--output-tag", default="", help="results folder name (default: the model tag, or the --hf "
                                                    "folder's name)")
    p.add_argument("--tasks", required=True, help="comma-separated harness tasks, e.g. gsm8k,hellaswag,arc_easy")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots (default: each task's own; gsm8k's is 5)")
    p.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass / generation batch")
    p.add_argument("--max-gen-toks", type=int, default=None, help="generation limit (default: each task's, or 256)")
    p.add_argument("--task-data", default="auto", choices=["auto", "hub", "local"],
                   help="auto: the local copies under $NANOCHAT_DATA_DIR when they exist, else the hub")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="generate_until through the engine's compiled decode (static KV cache, CUDA graphs on GPU): "
                        "auto = on CUDA only")
    p.add_argument("--results-dir", default="results", help="output: <results-dir>/<model-tag>/lm_eval.json")
    args = p.parse_args(argv)
    if not args.model_tag and not args.checkpoint and not args.hf:
        raise UserError("pass --model-tag (or --checkpoint PATH, or --hf DIR) to say which model to evaluate")
    if args.hf and (args.model_tag or args.checkpoint):
        raise UserError("--hf DIR evaluates an exported folder: pass it without --model-tag or --checkpoint")
    check_name("--model-tag", args.model_tag)  # it names the results folder
    check_name("--output-tag", args.output_tag, hint=OUTPUT_NAME_HINT)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty")
    if args.limit is not None and args.limit <= 0 or args.batch_size <= 0:
        raise UserError(f"--limit and --batch-size must be > 0 (got {args.limit}, {args.batch_size})")
    import_harness()
    if args.hf:
        tag = args.output_tag or os.path.basename(os.path.normpath(args.hf))
        check_name("--hf", tag, hint="its folder name becomes the results folder: pass --output-tag NAME")
        lm, checkpoint, step = hf_harness_model(args)
    else:
        from nanochat.lm_eval_adapter import NanochatLM
        lm = NanochatLM(model_tag=args.model_tag, checkpoint=args.checkpoint, step=args.step,
                        device=args.device_type, dtype=args.dtype, batch_size=args.batch_size,
                        max_gen_toks=args.max_gen_toks or 256, compile=args.compile)
        checkpoint, step = lm.checkpoint, lm.meta["step"]
        tag = args.output_tag or args.model_tag or os.path.basename(os.path.dirname(lm.checkpoint))
    results, samples, source = run_harness(lm, names, args.task_data, args.num_fewshot, args.limit,
                                           args.max_gen_toks)
    left_truncated = None if args.hf else lm.left_truncated  # the harness's own model counts nothing for us
    out_dir = os.path.join(args.results_dir, tag)
    record = dict(checkpoint=checkpoint, step=step, model="hf" if args.hf else "nanochat", task_data=source,
                  results=results, num_fewshot=args.num_fewshot, limit=args.limit, max_gen_toks=args.max_gen_toks,
                  left_truncated_generations=left_truncated, git_commit=git_commit())
    # the samples first: lm_eval.json never announces samples that are not on disk
    atomic_write_text(os.path.join(out_dir, "lm_eval_samples.jsonl"),
                      "".join(json.dumps(row, default=str) + "\n" for row in samples))
    atomic_write_text(os.path.join(out_dir, "lm_eval.json"), json.dumps(record, indent=2, default=str))
    for name, res in results.items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                            if isinstance(v, float) and "stderr" not in k and k != "version")
        print(f"{name} (n={res['n']}, {source}): {metrics}")
    print(f"wrote {os.path.join(out_dir, 'lm_eval.json')}")
    return record


if __name__ == "__main__":
    run_main(main)
