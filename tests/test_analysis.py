"""analysis/: H_res figures draw what they are given, the Amax gain of known composites, every figure function
writes a PNG, the comparison table's statistics against hand-checked values, the report lists what is missing."""
from __future__ import annotations

import json
import math

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba

from analysis import compare_results, plots, report, visualize_hres
from analysis.gate_sweep import plot as plot_gate_sweep
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
REPO = Path(__file__).resolve().parents[1]


def small_mhc(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                          mhc=MHCConfig(enabled=True)))
    model.init_weights()
    return model.eval()


def png_ok(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- H_res figures and the Amax gain -------------------------------------------------------------------------------

def test_heatmap_of_identity_h_res_draws_the_identity(tmp_path):
    model = small_mhc()
    model.set_mhc_gate(0.0)  # H_res = (1 - 0) I + 0 * learned = I exactly, for every token
    caps = visualize_hres.capture_connections(model, [torch.randint(0, 64, (2, 16))])
    mean, std = visualize_hres.hres_mean_std(caps)
    drawn = visualize_hres.plot_hres_heatmaps(mean, std, str(tmp_path / "h.png"))
    assert drawn["mean"].shape == (4, 4, 4)
    assert np.array_equal(drawn["mean"], np.broadcast_to(np.eye(4), (4, 4, 4)))
    assert np.array_equal(drawn["std"], np.zeros((4, 4, 4)))
    assert png_ok(tmp_path / "h.png")
    # at the learned gates the drawing is not the identity (the test can fail)
    model.clear_mhc_gates()
    mean, std = visualize_hres.hres_mean_std(visualize_hres.capture_connections(model, [torch.randint(0, 64, (2, 16))]))
    drawn = visualize_hres.plot_hres_heatmaps(mean, std, str(tmp_path / "h2.png"))
    assert np.abs(drawn["mean"] - np.eye(4)).max() > 0.01


def birkhoff(rng, n=4, k=5) -> np.ndarray:
    """An exactly doubly stochastic matrix: a convex combination of k permutation matrices."""
    w = rng.dirichlet(np.ones(k))
    perms = [np.eye(n)[rng.permutation(n)] for _ in range(k)]
    return sum(wi * P for wi, P in zip(w, perms))


def test_amax_gain_of_doubly_stochastic_composites_is_one_and_known_composites_give_known_gains():
    rng = np.random.default_rng(0)
    h_res = [np.stack([birkhoff(rng) for _ in range(3)]) for _ in range(12)]  # 12 sub-layers, 3 tokens each
    gains = visualize_hres.composite_gains(h_res)
    for row in gains["prefix"]:
        for key in ("row_gain_mean", "row_gain_max", "col_gain_mean", "col_gain_max"):
            assert row[key] == pytest.approx(1.0, abs=1e-4)
    # constructed: A = [[1, 1], [0, 1]] has row sums (2, 1) and column sums (1, 2); A @ A = [[1, 2], [0, 1]]
    A = np.array([[[1.0, 1.0], [0.0, 1.0]]])
    g = visualize_hres.composite_gains([A, A, A])["prefix"]
    assert [r["row_gain_max"] for r in g] == [2.0, 3.0, 4.0] and [r["col_gain_max"] for r in g] == [2.0, 3.0, 4.0]
    # signs count: |[[1, -2], [0, 1]]| has a largest row sum of 3 and column sum of 3
    assert visualize_hres.amax_gain(np.array([[1.0, -2.0], [0.0, 1.0]])) == (3.0, 3.0)
    # a real model at its learned gates: Sinkhorn's columns are exact only to its tolerance
    model = small_mhc()
    caps = visualize_hres.capture_connections(model, [torch.randint(0, 64, (2, 16))])
    last = visualize_hres.composite_gains([c["H_res"] for c in caps])["prefix"][-1]
    assert last["row_gain_max"] == pytest.approx(1.0, abs=1e-5) and last["col_gain_max"] == pytest.approx(1, abs=1e-2)


def test_every_figure_function_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    S, n = 4, 4
    mean = np.stack([birkhoff(rng) for _ in range(S)])
    caps = [dict(H_res=torch.tensor(np.stack([birkhoff(rng) for _ in range(5)])), H_pre=torch.rand(5, n),
                 H_post=2 * torch.rand(5, n)) for _ in range(S)]
    gains = visualize_hres.composite_gains([c["H_res"] for c in caps])
    metrics = [dict(step=s, loss=5.0 - 0.01 * s) for s in range(1, 30)] + [dict(step=s, val_bpb=2.0 - 0.01 * s)
                                                                           for s in (0, 10, 20)]
    logged = metrics + [dict(step=s, mhc=[dict(h_res_dist_identity=0.01 * s + j, gate=0.2) for j in range(S)])
                        for s in (0, 10, 20)]
    sweep = dict(checkpoint="x", learned=dict(val_bpb=2.0, dense=-1.0),
                 global_gate=[dict(gate=g, val_bpb=2 + g, dense=-1 - g) for g in (0, 0.5, 1)],
                 per_layer=[dict(layer=0, points=[dict(gate=g, val_bpb=2 + g / 2, dense=-1) for g in (0, 1)])])
    calls = {
        "heatmaps": lambda p: visualize_hres.plot_hres_heatmaps(mean, mean * 0.1, p),
        "composite": lambda p: visualize_hres.plot_composite(gains, p),
        "pre_post": lambda p: visualize_hres.plot_pre_post(caps, p),
        "routing": lambda p: visualize_hres.plot_routing(["a", "b", "c", "d", "e"], np.random.rand(S, 5, n), p),
        "curves": lambda p: plots.plot_training_curves({"baseline": metrics, "mhc": metrics}, p),
        "hres_training": lambda p: plots.plot_hres_over_training(logged, p),
        "rl_gates": lambda p: plots.plot_rl_gate_distribution(rng.uniform(0, 1, (20, 2)), p),
        "rl_gates_default": lambda p: plots.plot_rl_gate_distribution(rng.uniform(0, 1, (20, 2)), p,
                                                                      default_gates=[0.3, 0.4]),
        "gate_vs_acc": lambda p: plots.plot_gate_vs_accuracy(
            {"a": dict(gates=[0.2, 0.3], acc=0.5, ci95=[0.4, 0.6]),
             "b": dict(gates=[1.0], acc=0.3, ci95=[0.2, 0.4])}, p),
        "sweep": lambda p: plot_gate_sweep(sweep, p),
    }
    for name, call in calls.items():
        path = str(tmp_path / f"{name}.png")
        call(path)
        assert png_ok(path) and (tmp_path / f"{name}.png").stat().st_size > 1000, name
    with pytest.raises(UserError, match="--mhc-log-every"):
        plots.plot_hres_over_training(metrics, str(tmp_path / "none.png"))


# -- what a reader of each figure needs (the reviewer's defects: each test fails if one comes back) -----------------

def window_extent(artist):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = artist.get_figure()
    if not hasattr(fig.canvas, "get_renderer"):  # a closed (saved) figure keeps only a base canvas
        FigureCanvasAgg(fig)
    fig.canvas.draw()  # lay the figure out (constrained layout) before measuring
    return artist.get_window_extent(fig.canvas.get_renderer())


def test_hres_heatmaps_label_source_and_destination_streams_and_have_labelled_colour_bars(tmp_path):
    rng = np.random.default_rng(0)
    mean = np.stack([birkhoff(rng) for _ in range(4)])
    mean[0] = np.eye(4)[[1, 2, 3, 0]]  # a permutation: destination j takes source j + 1 (H_res[j, j + 1] = 1)
    out = visualize_hres.plot_hres_heatmaps(mean, 0.1 * mean, str(tmp_path / "h.png"))
    fig = out["figure"]
    heat = [ax for ax in fig.axes if ax.images]
    assert len(heat) == 8
    for ax in heat:
        assert "source" in ax.get_xlabel() and "destination" in ax.get_ylabel(), ax.get_title()
    # imshow puts H_res[j, i] at (x = i, y = j): the axis labelled source is the matrix's column index
    assert out["mean"][0][0, 1] == 1.0 and out["mean"][0][1, 0] == 0.0
    bars = {id(im.colorbar): im.colorbar for ax in heat for im in ax.images if im.colorbar is not None}
    assert len(bars) == 2  # one for the means, one for the stds
    for cb in bars.values():
        assert cb.ax.get_xlabel() or cb.ax.get_ylabel()


def test_routing_legend_colours_are_the_drawn_colours_and_the_intensity_is_explained(tmp_path):
    S, T, n = 2, 6, 3
    h_pre = np.full((S, T, n), 0.3)
    for t in range(T):  # token t prefers stream t % n; the margin grows with t
        h_pre[:, t, t % n] = 0.3 + 0.1 * (t + 1)
    fig = visualize_hres.plot_routing([f"t{t}" for t in range(T)], h_pre, str(tmp_path / "r.png"))
    ax = next(a for a in fig.axes if a.images)
    cells = np.asarray(ax.images[0].get_array(), dtype=np.float64)[..., :3]
    assert cells.shape == (S, T, 3) and len(ax.images) == 1  # no overlay that changes the colours drawn
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [f"stream {i}" for i in range(n)]
    colours = np.array([h.get_facecolor()[:3] for h in legend.legend_handles])
    for t in range(T):
        c = colours[t % n]
        # a cell is its stream's legend colour blended with white: 1 - cell is parallel to 1 - colour
        s = np.dot(1 - cells[0, t], 1 - c) / np.dot(1 - c, 1 - c)
        assert np.allclose(1 - cells[0, t], s * (1 - c), atol=1e-6), t
    # the strongest preference of each stream is drawn in exactly the legend's colour; weaker ones are paler
    assert np.allclose(cells[0, T - 1], colours[(T - 1) % n], atol=1e-6)
    assert cells[0, 0].mean() > cells[0, n].mean() > cells[0, 2 * n - 1].mean()
    every_ax = fig.axes + [c for a in fig.axes for c in a.child_axes]  # the intensity key is an inset
    labels = [a.get_ylabel() + a.get_xlabel() for a in every_ax] + [legend.get_title().get_text()]
    assert any("margin" in text for text in labels), labels


def test_gate_sweep_has_a_short_title_separate_labels_and_distinct_series(tmp_path):
    grid = [0.0, 0.5, 1.0]
    result = dict(checkpoint="/abs/checkpoints/base_checkpoints/my_tag/step_000123", step=123,
                  learned=dict(val_bpb=1.5, dense=-1.9),
                  global_gate=[dict(gate=g, val_bpb=1.5 + g, dense=-1.9 - g) for g in grid],
                  per_layer=[dict(layer=k, points=[dict(gate=g, val_bpb=1.5 + g / (k + 2), dense=-1.9 - g / (k + 2))
                                                   for g in grid]) for k in range(4)])
    fig = plot_gate_sweep(result, str(tmp_path / "s.png"))
    title = fig._suptitle.get_text()
    assert "/" not in title and "my_tag" in title and "123" in title
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert len(lines) == 1 + 4 + 1  # global, four layers, learned
        colours = [tuple(np.round(to_rgba(line.get_color()), 3)) for line in lines]
        assert len(set(colours)) == len(colours), colours
        # the axis label stays clear of the title and of the other panel
        label = window_extent(ax.yaxis.label)
        assert not label.overlaps(window_extent(fig._suptitle))
        for other in fig.axes:
            if other is not ax:
                assert not label.overlaps(window_extent(other))


def test_pre_post_legend_covers_no_bar(tmp_path):
    n, S = 4, 6
    # every stream near the top of the axes: a legend anywhere inside them would cover bars
    caps = [dict(H_pre=torch.full((3, n), 0.25) + 0.01 * torch.rand(3, n),
                 H_post=torch.full((3, n), 1.0) + 0.01 * torch.rand(3, n)) for _ in range(S)]
    fig = visualize_hres.plot_pre_post(caps, str(tmp_path / "pp.png"))
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends and [t.get_text() for t in legends[0].get_texts()] == [f"stream {i}" for i in range(n)]
    bars = [p for ax in fig.axes for p in ax.patches]
    assert len(bars) == 2 * n * S
    for legend in legends:
        box = window_extent(legend)
        assert not any(box.overlaps(window_extent(bar)) for bar in bars)


def rl_arm(acc, dense, gates=None, chosen=None, space="per_layer"):
    return dict(action_space=space, exact=dict(n=100, acc=acc, ci95=[acc - 0.05, acc + 0.05]),
                dense=dict(n=100, mean=dense, ci95=[dense - 0.02, dense + 0.02]), fixed_gates=gates,
                **({"chosen_gates": dict(mean=chosen)} if chosen else {}))


def test_rl_gate_plot_shows_every_arm_with_accuracy_and_dense_reward_and_no_hidden_points(tmp_path):
    arms = {"rl_policy": rl_arm(0.13, -1.84, chosen=[0.4, 0.2]), "default": rl_arm(0.12, -1.90),
            "grid": rl_arm(0.11, -1.95, gates=[0.0], space="global"),
            "gate0": rl_arm(0.11, -1.95, gates=[0.0], space="global"),
            "gate1": rl_arm(0.09, -2.20, gates=[1.0], space="global")}
    fig = plots.plot_gate_vs_accuracy(arms, str(tmp_path / "g.png"), default_gates=[0.3, 0.35])
    axes = np.array(fig.axes).reshape(2, -1)
    assert axes.shape == (2, 2)  # accuracy and dense reward, per layer
    assert "accuracy" in axes[0, 0].get_ylabel() and "dense" in axes[1, 0].get_ylabel()
    legend_text = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(name in legend_text for name in arms), legend_text
    for row, key in ((0, "acc"), (1, "dense")):
        for ax in axes[row]:
            points = {c.get_label(): c.lines[0] for c in ax.containers}
            assert set(points) == set(arms)  # the reference arm too
            want = {n: a["exact"]["acc"] if key == "acc" else a["dense"]["mean"] for n, a in arms.items()}
            assert all(points[n].get_ydata()[0] == pytest.approx(want[n]) for n in arms)
            # the grid's point and gate0's, both at g = 0 with the same values, are drawn apart
            x_grid, x_gate0 = points["grid"].get_xdata()[0], points["gate0"].get_xdata()[0]
            assert abs(x_grid - x_gate0) >= 0.02 and abs(x_grid) < 0.05 and abs(x_gate0) < 0.05
            styles = {(points[n].get_marker(), to_rgba(points[n].get_color())) for n in arms}
            assert len(styles) == len(arms)
    # without default_gates the reference arm is still drawn, as its level across every panel
    fig = plots.plot_gate_vs_accuracy(arms, str(tmp_path / "g2.png"))
    assert all(any(line.get_label().startswith("default") for line in ax.get_lines()) for ax in fig.axes[:4])


def test_read_jsonl_names_empty_and_corrupt_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        plots.read_jsonl(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match=r"bad.jsonl:2 is not valid JSON"):
        plots.read_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(UserError, match="does not exist"):
        plots.read_jsonl(str(tmp_path / "nope.jsonl"))


# -- the comparison table ---------------------------------------------------------------------------------------

def write_eval(d, correct: list[bool], rows: list[tuple[float, int]], params=5e6):
    d.mkdir(parents=True)
    n = len(correct)
    val = sum(r[0] for r in rows) / (math.log(2) * sum(r[1] for r in rows))
    results = {"bpb": dict(val_bpb=val, train_bpb=val, tokens=1000)}
    for task in ("gsm8k", "gsm8k_8shot", "hellaswag", "arc_easy", "arc_challenge"):
        results[task] = dict(metric="acc", score=sum(correct) / n, n=n, ci95=[0, 1])
    (d / "eval.json").write_text(json.dumps(dict(results=results)))
    ex = [dict(task=t, id=f"x-{i}", correct=c) for t in results if t != "bpb" for i, c in enumerate(correct)]
    ex += [dict(task="bpb", id=f"val-{i}", nats=r[0], bytes=r[1]) for i, r in enumerate(rows)]
    (d / "eval_examples.jsonl").write_text("\n".join(json.dumps(r) for r in ex) + "\n")
    (d / "config.json").write_text(json.dumps(dict(num_params=params, seed=42, git_commit="abc")))


def test_comparison_statistics_match_hand_checked_values(tmp_path):
    from statsmodels.stats.proportion import proportion_confint
    # baseline solves 6 of 20; mHC solves 11: 6 problems only mHC solves, 1 only the baseline, 5 both
    base = [True] * 1 + [False] * 6 + [True] * 5 + [False] * 8
    mhc = [False] * 1 + [True] * 6 + [True] * 5 + [False] * 8
    rng = np.random.default_rng(0)
    nbytes = rng.integers(800, 1200, 40)
    base_rows = [(float(1.2 * b * math.log(2) * (1 + 0.05 * rng.standard_normal())), int(b)) for b in nbytes]
    mhc_rows = [(n * 0.9, b) for n, b in base_rows]  # exactly 10% fewer nats on every row
    write_eval(tmp_path / "baseline", base, base_rows)
    write_eval(tmp_path / "mhc", mhc, mhc_rows)
    table = compare_results.build_table(str(tmp_path), compare_results.columns_for(), str(tmp_path / "bench.json"))
    cell = table["columns"]["Dynamic mHC"]["cells"]["HellaSwag"]
    lo, hi = proportion_confint(11, 20, alpha=0.05, method="wilson")
    assert cell["value"] == 0.55 and cell["n"] == 20 and cell["ci95"] == pytest.approx([lo, hi])
    assert cell["vs"]["p_value"] == pytest.approx(16 / 128) and cell["vs"]["diff"] == pytest.approx(0.25)
    bpb = table["columns"]["Dynamic mHC"]["cells"]["val bpb"]
    exact = table["columns"]["Dynamic mHC"]["cells"]["val bpb"]["value"] - \
        table["columns"]["Baseline"]["cells"]["val bpb"]["value"]
    assert bpb["vs"]["diff"] == pytest.approx(exact) and exact < 0
    assert bpb["vs"]["diff_ci95"][0] <= exact <= bpb["vs"]["diff_ci95"][1] < 0  # every resample improves by 10%
    assert bpb["vs"]["p_value"] == pytest.approx(2 / (compare_results.BOOTSTRAP_RESAMPLES + 1)) and bpb["n"] == 40
    assert table["scale"] == "smoke"
    # missing columns and files are named, with the stage that writes them; the rest of the table is built
    reasons = {m["reason"] for m in table["missing"]}
    assert any("mhc_sft/eval.json not found (speedrun stage eval_sft)" in r for r in reasons)
    assert any("bench.json not found (speedrun stage bench_inference)" in r for r in reasons)
    md = compare_results.to_markdown(table)
    assert "Smoke scale" in md and "missing [1]" in md and "p=0.125" in md
    rl = table["columns"]["RL-tuned"]["cells"]["GSM8K 0-shot"]
    assert "missing" in rl
    csv_text = compare_results.to_csv(table)
    assert csv_text.count("\n") == 1 + 5 * len(compare_results.ROWS)


def test_unpaired_examples_are_reported_not_tested(tmp_path):
    write_eval(tmp_path / "baseline", [True, False, True], [(1.0, 10), (2.0, 10), (1.5, 10)])
    write_eval(tmp_path / "mhc", [True, True], [(1.0, 10), (2.0, 10)])
    table = compare_results.build_table(str(tmp_path), compare_results.columns_for(), str(tmp_path / "b.json"))
    cells = table["columns"]["Dynamic mHC"]["cells"]
    assert "do not pair" in cells["GSM8K 0-shot"]["vs"]["error"] and "do not pair" in cells["val bpb"]["vs"]["error"]


def test_report_lists_what_is_missing_and_keeps_the_rest(tmp_path):
    write_eval(tmp_path / "baseline", [True, False], [(1.0, 10), (2.0, 10)])
    write_eval(tmp_path / "mhc", [True, True], [(1.0, 10), (1.5, 10)])
    (tmp_path / "mhc" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 1, "val_bpb": 2.0}\n')
    (tmp_path / "baseline" / "metrics.jsonl").write_text("")
    out = report.main(["--results-dir", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert "## Phase-4 comparison" in text and "| val bpb |" in text
    assert any("baseline/metrics.jsonl is empty" in m for m in out["missing"])
    assert any("speedrun_stages.jsonl not found" in m for m in out["missing"])
    assert any("hres_heatmaps.png" in m for m in out["missing"])
    assert (tmp_path / "report_figures" / "training_curves.png").exists()  # drawn from the run that has metrics
    assert (tmp_path / "comparison.json").exists()
    with pytest.raises(UserError, match="does not exist"):
        report.main(["--results-dir", str(tmp_path / "nope")])


def test_visualize_hres_refuses_a_model_without_mhc(tiny_base_dir, tiny_baseline_checkpoint, tiny_mhc_checkpoint,
                                                     tmp_path):
    with pytest.raises(UserError, match="without mHC"):
        visualize_hres.main(["--checkpoint", str(tiny_baseline_checkpoint)])
    with pytest.raises(UserError, match="no checkpoint for model tag 'nope'"):
        visualize_hres.main(["--model-tag", "nope"])
    with pytest.raises(UserError, match="3 gate values"):
        visualize_hres.main(["--checkpoint", str(tiny_mhc_checkpoint), "--gates", "0.1,0.2,0.3"])
    rec = visualize_hres.main(["--checkpoint", str(tiny_mhc_checkpoint), "--gates", "0", "--tokens", "256",
                               "--batch-size", "2", "--out-dir", str(tmp_path)])
    assert np.array_equal(np.array(rec["h_res_mean"]), np.broadcast_to(np.eye(4), (4, 4, 4)))
    assert all(png_ok(p) for p in rec["figures"].values()) and (tmp_path / "hres.json").exists()


def test_notebooks_are_committed_without_outputs():
    import nbformat
    for name in ("hres_heatmaps", "results_overview"):
        nb = nbformat.read(REPO / "analysis" / f"{name}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert any("parameters" in c.metadata.get("tags", []) for c in code), name
        # they call the library; no function or class is defined in a notebook
        assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in c.source.splitlines())

