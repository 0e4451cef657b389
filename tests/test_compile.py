"""torch.compile on the CPU. Every custom autograd Function traces under dynamic shapes without a graph break (the
floats it uses are literals in its code: Dynamo lifts a module-level float read inside Function.forward to a
symbolic input and then fails on the second call in a graph, and a float class attribute breaks the graph), and
every training and evaluation entry point runs with --compile true and gives the eager run's numbers (slow:
inductor's C++ backend compiles each graph)."""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import types

import pytest
import torch

import nanochat
from nanochat.gpt import GPT, GPTConfig
from nanochat.mhc import MHCConfig, sinkhorn

# the custom Functions of the package today; the scan below must find at least these (so it cannot pass by
# finding nothing)
KNOWN_FUNCTIONS = {"_SinkhornScaling", "_ReadStreams", "_ReadMixStreams", "_WriteBack", "_NormedProjection",
                   "_SoftcapCrossEntropy"}


def custom_functions():
    """(module, class) for every torch.autograd.Function subclass defined in the nanochat package."""
    for info in pkgutil.iter_modules(nanochat.__path__):
        module = importlib.import_module(f"nanochat.{info.name}")
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj.__module__ == module.__name__:
                yield module, obj


def global_names(code: types.CodeType):
    """Every name a code object (and the comprehensions and lambdas inside it) looks up."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from global_names(const)


def test_custom_functions_read_no_module_level_floats():
    """The root of the crash `torch.compile(dynamic=True)` hit in fine-tuning (AssertionError:
    lift_tracked_freevar_to_input should not be called on root SubgraphTracer): a module-level float read inside a
    Function. A float class attribute of the Function is no way out (Dynamo breaks the graph there): the floats a
    Function uses are literals in its code."""
    found, bad = set(), []
    for module, fn in custom_functions():
        found.add(fn.__name__)
        for method in ("forward", "backward"):
            code = getattr(fn, method).__code__
            for name in global_names(code):
                if isinstance(vars(module).get(name), (float, complex)):
                    bad.append(f"{module.__name__}.{fn.__name__}.{method} reads the module-level float {name}")
                if isinstance(getattr(fn, name, None), (float, complex)):
                    bad.append(f"{module.__name__}.{fn.__name__}.{method} reads the float class attribute {name}")
    assert KNOWN_FUNCTIONS <= found, f"the scan missed {KNOWN_FUNCTIONS - found}"
    assert not bad, bad


def test_the_scan_catches_a_module_level_float():
    """The check above on Functions written the ways that crash or break the graph (so the check can fail)."""
    namespace = {"torch": torch, "FLOOR": -80.0}
    exec("class Bad(torch.autograd.Function):\n"
         "    CAP = 15.0\n"
         "    @staticmethod\n"
         "    def forward(ctx, x):\n"
         "        return x.clamp_min(FLOOR).clamp_max(Bad.CAP)\n"
         "    @staticmethod\n"
         "    def backward(ctx, g):\n"
         "        return g\n", namespace)
    bad = namespace["Bad"]
    names = set(global_names(bad.forward.__code__))
    assert "FLOOR" in names and isinstance(namespace["FLOOR"], float)
    assert "CAP" in names and isinstance(getattr(bad, "CAP"), float)


def test_sinkhorn_and_the_mhc_model_trace_with_dynamic_shapes():
    """Two Sinkhorn calls in one graph, and forward + backward of a 1-layer mHC GPT at two lengths, under
    torch.compile(dynamic=True) with the aot_eager backend (Dynamo and AOT autograd, the stages that failed, without
    inductor's C++ compile): they trace in one graph, and give eager's numbers."""
    torch._dynamo.reset()
    logits = torch.randn(6, 4, 4)
    two_calls = lambda L: sinkhorn(L) + sinkhorn(2 * L)  # noqa: E731
    explained = torch._dynamo.explain(two_calls)(logits)
    assert explained.graph_break_count == 0, explained.break_reasons
    double = torch.compile(two_calls, dynamic=True, backend="aot_eager")
    assert torch.allclose(double(logits), sinkhorn(logits) + sinkhorn(2 * logits), atol=1e-6)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                          mhc=MHCConfig(enabled=True)))
    model.init_weights()
    idx = torch.randint(0, 64, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    for T in (16, 11):
        idx = torch.randint(0, 64, (2, T))
        loss = compiled(idx, idx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        ref = model(idx, idx)
        ref.backward()
        assert abs(loss.item() - ref.item()) < 1e-5
        for n, p in model.named_parameters():
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n
        model.zero_grad()
    torch._dynamo.reset()


# -- every entry point with --compile true (inductor) ---------------------------------------------------------------

TINY = ["--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--max-seq-len", "128", "--device-batch-size", "2",
        "--total-batch-size", "256", "--data-source", "local", "--eval-tokens", "512", "--eval-every", "-1",
        "--device-type", "cpu", "--dtype", "float32", "--num-iterations", "2", "--save-every", "-1"]


@pytest.fixture(scope="module")
def inductor(tmp_path_factory):
    """One inductor cache for the module (a graph that recurs compiles once) and RNG ops that draw from torch's
    generator as eager does (gate sampling in fine-tuning), so compiled and eager runs can be compared."""
    import torch._inductor.config as inductor_config
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # the config's own patcher (monkeypatch would delete the key)
        yield
    torch._dynamo.reset()
    mp.undo()


def metrics(results, tag, key) -> dict:
    lines = (results / tag / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def close(a, b, rel=1e-4):
    return abs(a - b) <= rel * max(1.0, abs(b))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["baseline", "mhc"])
def test_every_entry_point_runs_compiled_and_matches_eager(arch, tiny_base_dir, tmp_path, inductor):
    """--compile true on the CPU, for the baseline and the mHC model: base_train (fixed lengths), base_eval (bpb at
    fixed lengths, multiple choice at varying lengths, GSM8K generation through the compiled decode), sft_train
    (varying row lengths, dynamic=True: the crash) and, for mHC, train_rl's dense-reward scoring (varying lengths). Each compiled run gives the eager run's numbers
    on the same checkpoint. Fails on the code before the fix (fine-tuning and RL scoring crash in Dynamo)."""
    from scripts.base_eval import main as eval_main
    from scripts.base_train import main as train_main
    from scripts.sft_train import main as sft_main
    from scripts.train_rl import main as rl_main

    mhc = ["--mhc-enabled"] if arch == "mhc" else []
    base = f"compile_{arch}"
    for flag in ("false", "true"):  # pretraining, from scratch either way
        train_main(TINY + mhc + ["--model-tag", f"{base}_{flag}", "--results-dir", str(tmp_path), "--compile", flag])
    eager, compiled = (metrics(tmp_path, f"{base}_{f}", "loss") for f in ("false", "true"))
    assert eager.keys() == compiled.keys() == {1, 2}
    assert all(close(compiled[s], eager[s]) for s in eager), (eager, compiled)

    evals = {}
    for flag in ("false", "true"):  # the eager-trained checkpoint, scored both ways
        eval_main(["--model-tag", f"{base}_false", "--output-tag", f"{base}_eval_{flag}", "--results-dir",
                   str(tmp_path), "--tasks", "bpb,hellaswag,gsm8k", "--max-per-task", "4", "--device-batch-size", "4",
                   "--max-new-tokens", "12",
                   "--eval-tokens", "512", "--task-data", "local", "--device-type", "cpu", "--dtype", "float32",
                   "--compile", flag])
        evals[flag] = json.loads((tmp_path / f"{base}_eval_{flag}" / "eval.json").read_text())
    assert evals["true"]["compile"] is True and evals["false"]["compile"] is False
    for key in ("train_bpb", "val_bpb"):
        assert close(evals["true"]["results"]["bpb"][key], evals["false"]["results"]["bpb"][key], 1e-5)
    lls = {}
    for flag in evals:
        records = (tmp_path / f"{base}_eval_{flag}" / "eval_examples.jsonl").read_text().splitlines()
        lls[flag] = [r["lls"] for r in map(json.loads, records) if r["task"] == "hellaswag" and "lls" in r]
    assert len(lls["true"]) == len(lls["false"]) >= 3
    assert all(close(a, b) for x, y in zip(lls["true"], lls["false"]) for a, b in zip(x, y))
    gens = {}  # GSM8K through the engine: the compiled decode generates what eager does
    for flag in evals:
        records = (tmp_path / f"{base}_eval_{flag}" / "eval_examples.jsonl").read_text().splitlines()
        gens[flag] = [(r["completion"], r["new_tokens"]) for r in map(json.loads, records)
                      if r["task"] == "gsm8k" and "completion" in r]
    assert gens["true"] == gens["false"] and len(gens["false"]) >= 2  # the rest do not fit the 128-token context

    sft = ["--model-tag", f"{base}_false", "--results-dir", str(tmp_path), "--data", "synthetic",
           "--synthetic-count", "200", "--synthetic-steps", "1", "--synthetic-max-value", "10", "--val-problems", "8",
           "--device-batch-size", "4", "--num-iterations", "2", "--eval-every", "-1", "--device-type", "cpu",
           "--dtype", "float32"]
    for flag in ("false", "true"):
        sft_main(sft + ["--output-tag", f"{base}_sft_{flag}", "--compile", flag])
    eager, compiled = (metrics(tmp_path, f"{base}_sft_{f}", "loss") for f in ("false", "true"))
    assert eager.keys() == compiled.keys() == {1, 2}
    assert all(close(compiled[s], eager[s]) for s in eager), (eager, compiled)

    if arch == "mhc":  # RL controls mHC gates: the baseline has none
        arms = {}
        for flag in ("false", "true"):
            rl_main(["--model-tag", f"{base}_sft_false", "--tag", f"rl_{flag}", "--results-dir", str(tmp_path),
                     "--problems", "synthetic", "--synthetic-steps", "1", "--synthetic-max-value", "10",
                     "--train-problems", "16", "--eval-problems", "8", "--reward", "dense", "--max-new-tokens", "4",
                     "--num-envs", "4",
                     "--n-steps", "8", "--batch-size", "4", "--n-epochs", "1", "--total-timesteps", "8",
                     "--save-every", "8", "--no-progress", "--score-batch-size", "5", "--baselines", "none",
                     "--device-type", "cpu", "--dtype", "float32", "--compile", flag])
            arms[flag] = json.loads((tmp_path / "rl" / f"rl_{flag}" / "eval.json").read_text())["arms"]
        for name in ("default", "gate0", "gate1"):  # fixed gates: the same rewards, compiled or not
            assert close(arms["true"][name]["dense"]["mean"], arms["false"][name]["dense"]["mean"]), name


@pytest.mark.parametrize("mode", ["mhc", "full"])
def test_activation_checkpointing_traces_under_compile(mode):
    """Recomputation inside a compiled graph (torch.utils.checkpoint's higher-order op): the same loss and
    gradients as eager without it (aot_eager backend)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                          mhc=MHCConfig(enabled=True)))
    model.init_weights()
    idx = torch.randint(0, 64, (2, 16))
    ref = model(idx, idx)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_activation_checkpointing(mode)
    loss = torch.compile(model, dynamic=False, backend="aot_eager")(idx, idx)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4), n
    torch._dynamo.reset()
