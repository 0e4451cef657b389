"""What the mHC connections of a checkpoint have learned, per sub-layer, over validation tokens.

    python -m analysis.mhc_stats --model-tag tiny_mhc                # -> results/tiny_mhc/mhc_stats.json
    python -m analysis.mhc_stats --checkpoint PATH --tokens 65536 --out stats.json

For each of the 2L sub-layers (0 = layer 0 attention, 1 = layer 0 MLP, ...): the gate g; H_res's mean diagonal, its
mean distance from the identity and from the same sub-layer's H_res at initialisation (a model built from the
run's config and seed, on the same tokens: "has it learned anything?"), and its worst row/column-sum error (is it
still doubly stochastic after 20 Sinkhorn iterations?); the mean H_pre and H_post per stream. Means are over
tokens. Also the static part sigma(b) of the learned read-out's weights, when the model has one.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from nanochat.checkpoint import load_model, resolve_checkpoint
from nanochat.common import doc_summary, UserError, autodetect_device_type, check_name, git_commit, run_main
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.gpt import GPT
from nanochat.mhc import connection_stats
from nanochat.tokenizer import get_tokenizer


@torch.no_grad()
def capture(model: GPT, batches: list[torch.Tensor]) -> list[dict]:
    """Per sub-layer, the captured H_res [M, n, n], H_pre [M, n], H_post [M, n] over every token of `batches`."""
    model.capture_mhc(True)
    per_batch = []
    for idx in batches:
        model(idx)
        per_batch.append(model.captured_mhc())
    model.capture_mhc(False)
    return [{k: torch.cat([b[j][k].flatten(0, 1).cpu() for b in per_batch]) for k in ("H_res", "H_pre", "H_post")}
            for j in range(len(per_batch[0]))]


def sublayer_stats(trained: dict, initial: dict, gate: float) -> dict:
    """connection_stats plus the distance from the same sub-layer's H_res at init and the mean H_res matrix."""
    H, H0 = trained["H_res"], initial["H_res"]
    return dict(**connection_stats(trained, gate), h_res_dist_init=(H - H0).abs().mean().item(),
                h_res_mean=H.mean(0).tolist())


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--model-tag", default="", help="model tag of the checkpoint (see scripts.base_train)")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
    p.add_argument("--tokens", type=int, default=16384, help="validation tokens to average over")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    p.add_argument("--results-dir", default="results", help="default output: <results-dir>/<model-tag>/")
    p.add_argument("--out", default="", help="output JSON (default <results-dir>/<model-tag>/mhc_stats.json)")
    args = p.parse_args(argv)
    if not args.model_tag and not args.checkpoint:
        raise UserError("pass --model-tag (or --checkpoint PATH) to say which model to analyse")
    check_name("--model-tag", args.model_tag)  # it names the results folder
    if args.tokens <= 0 or args.batch_size <= 0:
        raise UserError(f"--tokens and --batch-size must be > 0 (got {args.tokens}, {args.batch_size})")

    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    device = torch.device(autodetect_device_type() if args.device_type == "auto" else args.device_type)
    path = args.checkpoint or resolve_checkpoint(args.model_tag, args.step)
    model, meta = load_model(path, device)
    if not model.config.mhc.enabled:
        raise UserError(f"checkpoint {path} is a model without mHC (mhc_enabled is false): nothing to analyse")
    run = meta.get("run_config", {})
    train_cfg = run.get("train", {})
    torch.manual_seed(train_cfg.get("seed", 0))  # the run's init (base_train seeds before building the model)
    initial = GPT(model.config).to(device)
    initial.init_weights()
    initial.eval()

    tokenizer = get_tokenizer()
    source = train_cfg.get("data_source", "fineweb")
    pretokenize(source, tokenizer)
    T = model.config.sequence_len
    loader = PackedLoader(tokenized_dir(source, tokenizer), "val", args.batch_size, T, device=device,
                          seed=train_cfg.get("seed", 0))
    batches = [loader.next_batch()[0] for _ in range(max(1, args.tokens // (args.batch_size * T)))]

    trained_m, initial_m = capture(model, batches), capture(initial, batches)
    gates = model.get_mhc_gates()
    sublayers = [dict(sublayer=j, kind=("attn", "mlp")[j % 2], layer=j // 2, **sublayer_stats(t, i, g))
                 for j, (t, i, g) in enumerate(zip(trained_m, initial_m, gates))]
    record = dict(checkpoint=path, step=meta["step"], tokens=len(batches) * args.batch_size * T,
                  num_streams=model.config.mhc.num_streams, readout=model.config.mhc.readout,
                  sublayers=sublayers, git_commit=git_commit())
    if model.stream_ends.readout is not None:
        record["readout_static_weights"] = torch.sigmoid(model.stream_ends.readout.b.detach()).cpu().tolist()
    print(f"{path} (step {meta['step']}), {record['tokens']} val tokens")
    print("sub-layer  gate   diag(H_res)  |H_res-I|  |H_res-H_res(init)|  max sum err")
    for s in sublayers:
        print(f"{s['layer']:>3} {s['kind']:<5} {s['gate']:6.3f} {s['h_res_mean_diag']:11.4f} "
              f"{s['h_res_dist_identity']:10.4f} {s['h_res_dist_init']:20.4f} {s['h_res_max_sum_error']:12.2e}")
    out = args.out or os.path.join(args.results_dir, args.model_tag or os.path.basename(path), "mhc_stats.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {out}")
    return record


if __name__ == "__main__":
    run_main(main)
