"""Fault injection, names (issue 21, item 1): a flag whose value becomes a folder or file name (a model tag, an
output tag, an RL tag, a sweep or round name) is a plain name. A path, '..', '.' or a separator would write the
checkpoint and metrics.jsonl outside the base and results dirs; every entry point refuses them with the rule before
it writes anything."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from nanochat.common import UserError, check_name

BAD_NAMES = ["../../x", "/abs/x", "..", ".", "a/b"]

READ = "a path goes in --checkpoint"  # a tag naming a checkpoint to read
WRITE = "$NANOCHAT_BASE_DIR and --results-dir say where its folders go"  # a tag naming what the run writes

# (module, extra argv, the flag under test, the hint of its error): each entry point's flags that name a folder
ENTRY_POINTS = [
    ("scripts.base_train", [], "--model-tag", WRITE),
    ("scripts.base_train", [], "--run", WRITE),  # the folder name when --model-tag is empty
    ("scripts.base_eval", [], "--model-tag", READ),
    ("scripts.base_eval", ["--model-tag", "m"], "--output-tag", WRITE),
    ("scripts.sft_train", [], "--model-tag", READ),
    ("scripts.sft_train", ["--model-tag", "m"], "--output-tag", WRITE),
    ("scripts.train_rl", [], "--model-tag", READ),
    ("scripts.train_rl", ["--model-tag", "m"], "--tag", WRITE),
    ("scripts.lm_eval", ["--tasks", "gsm8k"], "--model-tag", READ),
    ("analysis.mhc_stats", [], "--model-tag", READ),
    ("analysis.gate_sweep", [], "--model-tag", READ),
    ("analysis.gate_oracle", [], "--model-tag", READ),
    ("analysis.visualize_hres", [], "--model-tag", READ),
]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """Base dir, results dir and working directory inside tmp_path, all empty: a bad name resolved against any of
    them lands under tmp_path (or beside it, for '../../x': checked by the listing of tmp_path's parent)."""
    for name in ("base", "results", "cwd/a"):
        (tmp_path / name).mkdir(parents=True)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.chdir(tmp_path / "cwd" / "a")
    return tmp_path


@pytest.mark.parametrize("module,extra,flag,hint", ENTRY_POINTS, ids=[f"{m}{f}" for m, _, f, _ in ENTRY_POINTS])
def test_every_entry_point_refuses_a_name_that_is_a_path_before_writing(sandbox, module, extra, flag, hint):
    main = importlib.import_module(module).main
    parent_before = sorted(os.listdir(sandbox.parent))
    before = files_under(sandbox)
    for bad in BAD_NAMES:
        value = bad.replace("/abs", str(sandbox / "abs"))  # an absolute path that would land in the sandbox
        expected = (f"{flag}{' (the folder name when --model-tag is empty)' if flag == '--run' else ''} "
                    f"{value!r} is not a plain name: use letters, digits, '.', '_' and '-', not '.' or '..' "
                    f"({hint})")
        with pytest.raises(UserError) as e:
            main(extra + [flag, value, "--results-dir", str(sandbox / "results")])
        assert str(e.value) == expected
    assert files_under(sandbox) == before  # nothing written: no folder, no metrics.jsonl, no lock
    assert sorted(os.listdir(sandbox.parent)) == parent_before


def test_a_sweep_name_or_round_name_that_is_a_path_is_refused(tmp_path):
    from scripts.sweep import load_sweep
    for bad in ("..", "a/b"):
        for text, what in ((f'name = "{bad}"\n[[rounds]]\nname = "r"\nset = "seed"\nvalues = [1]\n', "name"),
                           (f'name = "s"\n[[rounds]]\nname = "{bad}"\nset = "seed"\nvalues = [1]\n', "round name")):
            path = tmp_path / "sweep.toml"
            path.write_text(text)
            with pytest.raises(UserError, match=rf"{what} {bad!r} is not a plain name: use letters, digits, '\.', "
                                                rf"'_' and '-', not '\.' or '\.\.'$"):
                load_sweep(str(path))


def test_the_rule_accepts_plain_names_and_the_checkpoint_folder_refuses_derived_paths(tmp_path, monkeypatch):
    for good in ("d12", "tiny_mhc_sft", "run-1.5", "..x", "a..b"):
        check_name("--model-tag", good, required=True)
    check_name("--model-tag", "")  # empty: the default applies
    with pytest.raises(UserError, match=r"--model-tag '' is not a plain name"):
        check_name("--model-tag", "", required=True)
    # a tag that reaches the checkpoint folder another way (a checkpoint's meta, a derived default) meets the rule
    from nanochat.checkpoint import checkpoint_root
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"model tag '\.\./x_sft' is not a plain name"):
        checkpoint_root("../x_sft")


def test_a_tag_derived_from_a_checkpoints_meta_is_refused_naming_where_it_came_from(sandbox):
    """sft_train --checkpoint PATH without --output-tag names its output after the checkpoint's run_config.model_tag:
    a meta whose tag is a path is refused before anything is written, and the message says where the name came
    from (not "a path goes in --checkpoint": a path is already there)."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from scripts.sft_train import main
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = GPT(cfg)
    model.init_weights()
    path = save_checkpoint(str(sandbox / "elsewhere" / "ck"), 1, model, [],
                           dict(model_config=cfg.to_dict(), run_config={"model_tag": "../evil"}))
    before = files_under(sandbox)
    with pytest.raises(UserError) as e:
        main(["--checkpoint", path, "--results-dir", str(sandbox / "results")])
    assert str(e.value) == (f"model tag '../evil_sft' is not a plain name: use letters, digits, '.', '_' and '-', not "
                            f"'.' or '..' (derived from run_config.model_tag '../evil' in {path}/meta.json: name the "
                            f"output with --output-tag)")
    assert files_under(sandbox) == before
    # base_eval names its results folder the same way
    from scripts.base_eval import main as base_eval
    with pytest.raises(UserError) as e:
        base_eval(["--checkpoint", path, "--results-dir", str(sandbox / "results")])
    assert str(e.value) == (f"the results folder '../evil' is not a plain name: use letters, digits, '.', '_' and '-', "
                            f"not '.' or '..' (derived from {path} (its run_config.model_tag or folder name): name it "
                            f"with --output-tag)")
    assert files_under(sandbox) == before
