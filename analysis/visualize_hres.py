"""What routing the mHC model learned: H_res heatmaps, the composite mapping across depth with its Amax gain, H_pre
and H_post, and per-token routing of one example text.

    python -m analysis.visualize_hres --model-tag tiny_mhc                 # -> results/tiny_mhc/hres/*.png, hres.json
    python -m analysis.visualize_hres --model-tag tiny_mhc_sft --gates 0   # the same model at other gates
    python -m analysis.visualize_hres --checkpoint PATH --text "Tom has 3 apples." --out-dir figs/

- Heatmaps: for every sub-layer (layer l attention, layer l MLP), H_res averaged over the tokens of validation
  batches, and beside it the per-token standard deviation (how dynamic the routing is).
- Composite: the residual path through the first k sub-layers maps the streams by P_k = H_k ... H_2 H_1 (per token).
  Its Amax gain (the mHC paper's stability measure) is the largest absolute row sum (forward signal gain) and
  column sum (backward gradient gain) of P_k; a product of doubly stochastic matrices has both exactly 1, HC's
  unconstrained matrices let them grow with depth. Plotted per depth prefix (mean and max over tokens), with the
  mean composite of the whole depth.
- H_pre / H_post: mean read-out and write-back weight of each stream, per sub-layer.
- Routing: for one text, which stream each token's H_pre weighs most, per sub-layer.
Library functions: analyse (what the CLI and analysis/hres_heatmaps.ipynb run), capture_connections,
hres_mean_std, amax_gain, composite_gains, routing_for_text, plot_hres_heatmaps, plot_composite, plot_pre_post,
plot_routing.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from analysis.mhc_stats import capture
from analysis.plots import pyplot, save_figure
from nanochat.checkpoint import load_model, resolve_checkpoint
from nanochat.common import doc_summary, UserError, autodetect_device_type, check_name, git_commit, run_main
from nanochat.dataloader import PackedLoader
from nanochat.dataset import pretokenize, tokenized_dir
from nanochat.tokenizer import get_tokenizer

DEFAULT_TEXT = ("Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                "in May. How many clips did Natalia sell altogether?\nAnswer:")


def sublayer_names(n_layer: int) -> list[str]:
    return [f"L{i // 2} {'attn' if i % 2 == 0 else 'mlp'}" for i in range(2 * n_layer)]


# -- numbers -----------------------------------------------------------------------------------------------------

def capture_connections(model, batches) -> list[dict]:
    """Per sub-layer H_res [M, n, n], H_pre [M, n], H_post [M, n] over every token of `batches` (at the gates set
    on the model; analysis.mhc_stats.capture)."""
    if not model.config.mhc.enabled:
        raise UserError("this model has no mHC (mhc_enabled is false): there is no H_res to draw")
    return capture(model, batches)


def hres_mean_std(caps: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """[2L, n, n] mean and per-token std of H_res per sub-layer."""
    mean = np.stack([c["H_res"].mean(0).numpy() for c in caps])
    std = np.stack([c["H_res"].std(0, unbiased=False).numpy() for c in caps])
    return mean, std


def amax_gain(M) -> tuple[np.ndarray, np.ndarray]:
    """Amax gain of [..., n, n] matrices: (largest absolute row sum, largest absolute column sum)."""
    A = np.abs(np.asarray(M, dtype=np.float64))
    return A.sum(-1).max(-1), A.sum(-2).max(-1)


def composite_gains(h_res: list) -> dict:
    """h_res: per sub-layer [M, n, n] (token-aligned). Prefix products P_k = H_k ... H_1 per token (float64) and
    their Amax gains: per prefix k, the mean and max over tokens of the row and column gains, and the mean over
    tokens of the full composite P_2L."""
    P = None
    rows = []
    for H in h_res:
        H = torch.as_tensor(np.asarray(H), dtype=torch.float64)
        P = H if P is None else H @ P
        row, col = amax_gain(P.numpy())
        rows.append(dict(depth=len(rows) + 1, row_gain_mean=float(row.mean()), row_gain_max=float(row.max()),
                         col_gain_mean=float(col.mean()), col_gain_max=float(col.max())))
    return dict(prefix=rows, composite_mean=P.mean(0).numpy().tolist())


def routing_for_text(model, tokenizer, text: str, max_tokens: int = 48) -> tuple[list[str], np.ndarray]:
    """The first max_tokens tokens of `text` (as strings) and every sub-layer's H_pre for them, [2L, T, n]."""
    ids = tokenizer.encode(text, prepend=tokenizer.bos_token_id)[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"--text {text!r} is too short to show routing")
    device = model.cos.device
    caps = capture_connections(model, [torch.tensor([ids], device=device)])
    tokens = [tokenizer.decode([i]) for i in ids]
    return tokens, np.stack([c["H_pre"].numpy() for c in caps])


# -- figures -----------------------------------------------------------------------------------------------------

def plot_hres_heatmaps(mean: np.ndarray, std: np.ndarray, path: str, title: str = "") -> dict:
    """One row per layer: attention and MLP H_res mean, then attention and MLP per-token std. Cell (row j, column i)
    is H_res[j, i], the weight of source stream i in destination stream j (x_next[j] = sum_i H_res[j, i] x[i]).
    Returns the arrays drawn, read back from the axes ({"mean": [2L, n, n], "std": [2L, n, n]}), and the figure
    under "figure"."""
    plt = pyplot()
    S, n = mean.shape[0], mean.shape[-1]
    L = (S + 1) // 2
    # constrained layout: places the shared colour bars and the axis labels without collisions
    fig, axes = plt.subplots(L, 4, figsize=(10.5, 2.5 * L + 1.4), squeeze=False, layout="constrained")
    names = sublayer_names(L)
    drawn = {"mean": [], "std": []}
    vmax_std = max(float(std.max()), 1e-6)
    images = {}
    for j in range(S):
        for k, (kind, data, kw) in enumerate((("mean", mean[j], dict(vmin=0, vmax=1, cmap="viridis")),
                                               ("std", std[j], dict(vmin=0, vmax=vmax_std, cmap="magma")))):
            ax = axes[j // 2, 2 * k + j % 2]  # columns: attn mean, mlp mean | attn std, mlp std
            im = images[kind] = ax.imshow(data, **kw)
            drawn[kind].append(np.asarray(im.get_array()))
            ax.set_title(f"{names[j]} H_res {kind}", fontsize=8)
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.tick_params(labelsize=6)
            # imshow puts row j of H_res at height j, column i at x = i: rows are destinations, columns sources
            ax.set_xlabel("source stream i", fontsize=7)
            ax.set_ylabel("destination stream j", fontsize=7)
            if n <= 8:
                for a in range(n):
                    for b in range(n):
                        ax.text(b, a, f"{data[a, b]:.2f}", ha="center", va="center", fontsize=6,
                                color="w" if data[a, b] < 0.5 * kw["vmax"] else "k")
    for j in range(S, 2 * L):
        axes[j // 2, j % 2].axis("off")
        axes[j // 2, 2 + j % 2].axis("off")
    fig.colorbar(images["mean"], ax=axes[:, :2], location="bottom", shrink=0.8, aspect=30,
                 label="H_res[j, i]: weight of source i in destination j (mean over tokens)")
    fig.colorbar(images["std"], ax=axes[:, 2:], location="bottom", shrink=0.8, aspect=30,
                 label="per-token standard deviation of H_res[j, i]")
    fig.suptitle(title or "H_res per sub-layer: mean over tokens | per-token std", fontsize=9)
    save_figure(fig, path)
    return {**{k: np.stack(v) for k, v in drawn.items()}, "figure": fig}


def plot_composite(gains: dict, path: str, title: str = ""):
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    depth = [r["depth"] for r in gains["prefix"]]
    for key, style, label in (("row_gain_mean", "o-", "forward (row) gain, mean"),
                              ("row_gain_max", "o--", "forward (row) gain, max"),
                              ("col_gain_mean", "s-", "backward (column) gain, mean"),
                              ("col_gain_max", "s--", "backward (column) gain, max")):
        a.plot(depth, [r[key] for r in gains["prefix"]], style, label=label, ms=3)
    a.axhline(1.0, color="gray", lw=0.8, ls=":")
    a.set_xlabel("sub-layers composed (depth prefix k)")
    a.set_ylabel("Amax gain of H_k ... H_1")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    comp = np.asarray(gains["composite_mean"])
    im = b.imshow(comp, cmap="viridis", vmin=0)
    n = comp.shape[0]
    if n <= 8:
        for i in range(n):
            for j in range(n):
                b.text(j, i, f"{comp[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    b.set_xticks(range(n))
    b.set_yticks(range(n))
    b.set_title("composite of all H_res (mean over tokens)", fontsize=8)
    fig.colorbar(im, ax=b, fraction=0.046)
    fig.suptitle(title or "the residual path across depth", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_pre_post(caps: list[dict], path: str, title: str = ""):
    """Mean H_pre and H_post per stream and sub-layer, as grouped bars. Returns the figure."""
    plt = pyplot()
    pre = np.stack([c["H_pre"].mean(0).numpy() for c in caps])     # [2L, n]
    post = np.stack([c["H_post"].mean(0).numpy() for c in caps])
    S, n = pre.shape
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * S + 4), 3.8), layout="constrained")
    width = 0.8 / n
    for ax, data, label in ((axes[0], pre, "H_pre (read-out weight)"), (axes[1], post, "H_post (write-back)")):
        for i in range(n):
            ax.bar(np.arange(S) + i * width, data[:, i], width, label=f"stream {i}")
        ax.set_xticks(np.arange(S) + 0.4 - width / 2)
        ax.set_xticklabels(sublayer_names((S + 1) // 2)[:S], rotation=60, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    # one legend outside the axes, to the right: inside, it covered the bars the text discusses
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper", title="stream", title_fontsize=7)
    fig.suptitle(title or "mean H_pre and H_post per stream (over tokens)", fontsize=9)
    save_figure(fig, path)
    return fig


def routing_colours(h_pre: np.ndarray, n: int | None = None, floor: float = 0.2):
    """h_pre [2L, T, n] -> (RGB image [2L, T, 3], stream colours [n, 3], margins [2L, T]). A cell is its preferred
    stream's colour blended with white: full colour at the largest margin (top H_pre weight minus the runner-up) in
    the figure, `floor` of it at margin 0, so a pale cell is a weak preference."""
    S, T, n_ = h_pre.shape
    n = n or n_
    colours = np.array([pyplot().get_cmap("tab10")(i % 10)[:3] for i in range(n)])
    srt = np.sort(h_pre, -1)
    margin = srt[..., -1] - srt[..., -2] if n_ > 1 else np.ones((S, T))
    strength = floor + (1 - floor) * margin / max(float(margin.max()), 1e-9)
    rgb = 1 - strength[..., None] * (1 - colours[h_pre.argmax(-1)])
    return rgb, colours, margin


def plot_routing(tokens: list[str], h_pre: np.ndarray, path: str, title: str = ""):
    """h_pre [2L, T, n]: hue = the stream each token's H_pre weighs most, per sub-layer; intensity = how much more
    than the runner-up (pale: a weak preference). Returns the figure."""
    import matplotlib.colors as mcolors
    plt = pyplot()
    S, T, n = h_pre.shape
    floor = 0.2
    rgb, colours, margin = routing_colours(h_pre, floor=floor)
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * T + 3.5), 0.32 * S + 2.4), layout="constrained")
    # the RGB cells are drawn directly, so the legend's patches are exactly the full-intensity cell colours
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(S))
    ax.set_yticklabels(sublayer_names((S + 1) // 2)[:S], fontsize=7)
    ax.set_ylabel("sub-layer", fontsize=8)
    ax.set_xticks(range(T))
    ax.set_xticklabels([repr(t)[1:-1][:8] for t in tokens], rotation=90, fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[i], edgecolor="none") for i in range(n)]
    ax.legend(handles, [f"stream {i}" for i in range(n)], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1),
              title="preferred stream\n(full colour: the\nstrongest preference)", title_fontsize=7)
    # intensity key: white -> grey on the same blend as the cells (floor at margin 0, full at the largest margin)
    grey = np.array([0.35, 0.35, 0.35])
    key = mcolors.LinearSegmentedColormap.from_list("margin", [1 - floor * (1 - grey), grey])
    sm = plt.cm.ScalarMappable(norm=mcolors.Normalize(0, max(float(margin.max()), 1e-9)), cmap=key)
    cbar = fig.colorbar(sm, cax=ax.inset_axes([1.02, 0.0, 0.025, 0.42]))  # under the legend, beside the cells
    cbar.set_label("intensity: preference margin\n(top H_pre weight - second)", fontsize=7)
    cbar.ax.tick_params(labelsize=6)
    fig.suptitle(title or "per-token routing: the stream each token's H_pre weighs most", fontsize=9)
    save_figure(fig, path)
    return fig


# -- CLI ---------------------------------------------------------------------------------------------------------

def parse_gates(text: str) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--gates must be comma-separated numbers in [0, 1] (got {text!r})") from None


def analyse(model_tag: str = "", checkpoint: str = "", step: int = -1, gates=None, tokens: int = 8192,
            batch_size: int = 8, text: str = DEFAULT_TEXT, results_dir: str = "results", out_dir: str = "",
            device_type: str = "auto") -> dict:
    """Load an mHC checkpoint (at its learned gates, or `gates`: 1, L or 2L values), capture its connections over
    validation tokens and write the four figures and hres.json. Returns the record, with the figure paths under
    "figures". What the CLI and analysis/hres_heatmaps.ipynb run."""
    if not model_tag and not checkpoint:
        raise UserError("pass --model-tag (or --checkpoint PATH) of the mHC model to draw")
    check_name("--model-tag", model_tag)  # it names the results folder
    if tokens <= 0 or batch_size <= 0:
        raise UserError(f"--tokens and --batch-size must be > 0 (got {tokens}, {batch_size})")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda: no CUDA device is available here (use auto or cpu)")
    device = torch.device(autodetect_device_type() if device_type == "auto" else device_type)
    path = checkpoint or resolve_checkpoint(model_tag, step)
    model, meta = load_model(path, device)
    if not model.config.mhc.enabled:
        raise UserError(f"checkpoint {path} is a model without mHC (mhc_enabled is false): there is no H_res to draw")
    if gates is not None:
        model.set_mhc_gates_by_count(gates, "--gates")
    tokenizer = get_tokenizer()
    train_cfg = meta.get("run_config", {}).get("train", {})
    source = train_cfg.get("data_source") or "fineweb"
    pretokenize(source, tokenizer)
    T = model.config.sequence_len
    loader = PackedLoader(tokenized_dir(source, tokenizer), "val", batch_size, T, device=device,
                          seed=train_cfg.get("seed", 0))
    batches = [loader.next_batch()[0] for _ in range(max(1, tokens // (batch_size * T)))]

    caps = capture_connections(model, batches)
    mean, std = hres_mean_std(caps)
    gains = composite_gains([c["H_res"] for c in caps])
    words, h_pre = routing_for_text(model, tokenizer, text)
    tag = model_tag or os.path.basename(os.path.dirname(path))
    out_dir = out_dir or os.path.join(results_dir, tag, "hres")
    used = model.get_mhc_gates()
    label = f"{tag} (step {meta['step']}), gates {', '.join(f'{g:.2f}' for g in used)}"
    figures = {name: os.path.join(out_dir, f"hres_{name}.png") for name in ("heatmaps", "composite", "pre_post",
                                                                              "routing")}
    plot_hres_heatmaps(mean, std, figures["heatmaps"], f"H_res of {label}: mean | std")
    plot_composite(gains, figures["composite"], f"composite H_res and Amax gain: {label}")
    plot_pre_post(caps, figures["pre_post"], f"mean H_pre / H_post: {label}")
    plot_routing(words, h_pre, figures["routing"], f"per-token routing: {label}")
    record = dict(checkpoint=path, step=meta["step"], gates=used, tokens=len(batches) * batch_size * T,
                  h_res_mean=mean.tolist(), h_res_std=std.tolist(), composite=gains,
                  h_pre_mean=[c["H_pre"].mean(0).tolist() for c in caps],
                  h_post_mean=[c["H_post"].mean(0).tolist() for c in caps], routing_text=text,
                  git_commit=git_commit())
    with open(os.path.join(out_dir, "hres.json.tmp"), "w") as f:
        json.dump(record, f, indent=2)
    os.replace(os.path.join(out_dir, "hres.json.tmp"), os.path.join(out_dir, "hres.json"))
    last = gains["prefix"][-1]
    print(f"{path}: {len(caps)} sub-layers, mean |H_res - I| {np.abs(mean - np.eye(mean.shape[-1])).mean():.4f}; "
          f"Amax gain of the full composite: row {last['row_gain_max']:.4f}, column {last['col_gain_max']:.4f} "
          f"(max over tokens); figures in {out_dir}")
    return {**record, "figures": figures}


def main(argv=None):
    p = argparse.ArgumentParser(description=doc_summary(__doc__), allow_abbrev=False)
    p.add_argument("--model-tag", default="", help="model tag of an mHC checkpoint")
    p.add_argument("--checkpoint", default="", help="checkpoint directory (overrides --model-tag/--step)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (-1 = the newest)")
    p.add_argument("--gates", default="", help="draw at these gates: 1 (global), L or 2L comma-separated values in "
                   "[0, 1] (default: the learned gates)")
    p.add_argument("--tokens", type=int, default=8192, help="validation tokens to average over")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--text", default=DEFAULT_TEXT, help="example text for the per-token routing figure")
    p.add_argument("--device-type", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if present")
    p.add_argument("--results-dir", default="results", help="default output: <results-dir>/<model-tag>/hres/")
    p.add_argument("--out-dir", default="", help="output folder (default <results-dir>/<model-tag>/hres)")
    args = p.parse_args(argv)
    return analyse(args.model_tag, args.checkpoint, args.step, parse_gates(args.gates), args.tokens,
                   args.batch_size, args.text, args.results_dir, args.out_dir, args.device_type)


if __name__ == "__main__":
    run_main(main)
