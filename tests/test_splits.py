"""Clean splits: GSM8K train divided into SFT / RL-train / RL-validation parts by a seeded hash of the question
(disjoint, stable under reordering, the documented fractions); RL's pools disjoint on ids and questions, without
any fine-tuning question; a fine-tuning run with another split seed is refused."""
import random

import pytest

from envs.gsm8k_env import load_problems
from envs.mhc_env import GateScorer, load_frozen_model
from nanochat.common import UserError
from nanochat.config import RLConfig
from nanochat.splits import GSM8K_TRAIN_PARTS, PARTS, describe, part_of, select_part


@pytest.fixture(scope="module")
def gsm8k_train(tiny_base_dir):   # sets NANOCHAT_DATA_DIR to the shared data
    problems, _ = load_problems("gsm8k", split="train", task_data="local")
    return problems


def test_gsm8k_train_parts_are_disjoint_stable_and_sized(gsm8k_train):
    parts = {p: select_part(gsm8k_train, p) for p in PARTS}
    ids = {p: {ex.id for ex in parts[p]} for p in PARTS}
    questions = {p: {ex.extra["question"] for ex in parts[p]} for p in PARTS}
    for i, a in enumerate(PARTS):
        for b in PARTS[i + 1:]:
            assert not ids[a] & ids[b] and not questions[a] & questions[b], (a, b)
    assert sum(len(v) for v in ids.values()) == len(gsm8k_train)        # every problem in exactly one part
    for name, fraction in GSM8K_TRAIN_PARTS:
        assert abs(len(ids[name]) / len(gsm8k_train) - fraction) < 0.02, (name, len(ids[name]))
    shuffled = list(gsm8k_train)
    random.Random(0).shuffle(shuffled)                                  # another order (the hub vs a local copy)
    assert {ex.id for ex in select_part(shuffled, "rl_val")} == ids["rl_val"]
    other_seed = {ex.id for ex in select_part(gsm8k_train, "rl_val", seed=1)}
    assert other_seed != ids["rl_val"]
    assert describe(parts["sft"], "sft")["ids_sha256"] == describe(list(reversed(parts["sft"])), "sft")["ids_sha256"]


def test_load_problems_parts_and_refusals(gsm8k_train):
    sft, where = load_problems("gsm8k", split="train", task_data="local", part="sft")
    assert "part sft" in where and all(part_of(ex.extra["question"]) == "sft" for ex in sft)
    assert all(ex.extra["type"] in ("1-2 steps", "3-4 steps", "5+ steps") for ex in sft)
    with pytest.raises(UserError, match="part of the train split"):
        load_problems("gsm8k", split="test", task_data="local", part="sft")
    with pytest.raises(UserError, match="part must be one of"):
        load_problems("gsm8k", split="train", task_data="local", part="holdout")


def test_rl_pools_are_disjoint_and_exclude_fine_tuning_questions(tiny_mhc_checkpoint):
    from scripts.train_rl import fine_tuning_questions, problem_pools
    model, tokenizer, _, _ = load_frozen_model(str(tiny_mhc_checkpoint))
    scorer = GateScorer(model, tokenizer, max_new_tokens=8)
    sft_config = dict(data="synthetic", synthetic_count=400, synthetic_seed=0, synthetic_mix="mixed")
    seen = set(fine_tuning_questions(sft_config, RLConfig(model_tag="x")))
    assert len(seen) == 400
    for cfg in (RLConfig(model_tag="x", problems="synthetic", synthetic_mix="mixed", train_problems=300,
                         eval_problems=100, val_problems=50, synthetic_seed=0),   # seed 0 = fine-tuning's: excluded
                RLConfig(model_tag="x", problems="gsm8k", train_problems=200, eval_problems=50, val_problems=50,
                         task_data="local")):
        train, val, held, pools = problem_pools(cfg, scorer, sft_config)
        sets = [{p.extra["question"] for p in pool} for pool in (train, val, held)]
        id_sets = [{p.id for p in pool} for pool in (train, val, held)]
        assert all(len(s) > 0 for s in sets)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        if cfg.problems == "synthetic":   # synthetic ids restart per generator seed: the questions decide
            assert not any(s & seen for s in sets)
        else:
            assert not (id_sets[0] & id_sets[1] or id_sets[0] & id_sets[2] or id_sets[1] & id_sets[2])
            assert all(part_of(q) == "rl_train" for q in sets[0]) and all(part_of(q) == "rl_val" for q in sets[1])
            assert pools["val"]["ids"] and pools["train"]["ids"] != pools["val"]["ids"]


def test_rl_refuses_a_model_fine_tuned_on_rl_problems():
    from scripts.train_rl import fine_tuning_questions
    gsm = RLConfig(model_tag="x", problems="gsm8k")
    with pytest.raises(UserError, match="split seed"):
        fine_tuning_questions(dict(data="gsm8k,synthetic", synthetic_count=10, synthetic_seed=0), gsm)  # pre-split
    with pytest.raises(UserError, match="split seed 3"):
        fine_tuning_questions(dict(data="gsm8k", split_seed=3), gsm)
    assert fine_tuning_questions(dict(data="gsm8k", split_seed=0), gsm) == []
