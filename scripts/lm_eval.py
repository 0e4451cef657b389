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

from nanochat.common import doc_summary, UserError, check_name, get_data_dir, git_commit, run_main

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


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of the checkpoint")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
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
    if not args.model_tag and not args.checkpoint:
        raise UserError("pass --model-tag (or --checkpoint PATH) to say which model to evaluate")
    check_name("--model-tag", args.model_tag)  # it names the results folder
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks is empty")
    if args.limit is not None and args.limit <= 0 or args.batch_size <= 0:
        raise UserError(f"--limit and --batch-size must be > 0 (got {args.limit}, {args.batch_size})")
    import_harness()
    from nanochat.lm_eval_adapter import NanochatLM
    lm = NanochatLM(model_tag=args.model_tag, checkpoint=args.checkpoint, step=args.step, device=args.device_type,
                    dtype=args.dtype, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks or 256,
                    compile=args.compile)
    results, samples, source = run_harness(lm, names, args.task_data, args.num_fewshot, args.limit,
                                           args.max_gen_toks)
    tag = args.model_tag or os.path.basename(os.path.dirname(lm.checkpoint))
    out_dir = os.path.join(args.results_dir, tag)
    os.makedirs(out_dir, exist_ok=True)
    record = dict(checkpoint=lm.checkpoint, step=lm.meta["step"], task_data=source, results=results,
                  num_fewshot=args.num_fewshot, limit=args.limit, max_gen_toks=args.max_gen_toks,
                  left_truncated_generations=lm.left_truncated, git_commit=git_commit())
    with open(os.path.join(out_dir, "lm_eval.json.tmp"), "w") as f:
        json.dump(record, f, indent=2, default=str)
    os.replace(os.path.join(out_dir, "lm_eval.json.tmp"), os.path.join(out_dir, "lm_eval.json"))
    with open(os.path.join(out_dir, "lm_eval_samples.jsonl.tmp"), "w") as f:
        for row in samples:
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(os.path.join(out_dir, "lm_eval_samples.jsonl.tmp"), os.path.join(out_dir, "lm_eval_samples.jsonl"))
    for name, res in results.items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                            if isinstance(v, float) and "stderr" not in k and k != "version")
        print(f"{name} (n={res['n']}, {source}): {metrics}")
    print(f"wrote {os.path.join(out_dir, 'lm_eval.json')}")
    return record


if __name__ == "__main__":
    run_main(main)
