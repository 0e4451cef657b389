"""Task loaders and scorers: GSM8K extraction, HellaSwag / ARC parsing and multiple-choice decisions (with a stub
scorer whose log-likelihoods the test sets), continuation tokens, subsampling, intervals, malformed rows."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nanochat import task_arc, task_gsm8k, task_hellaswag
from nanochat.common import UserError
from nanochat.config import EVAL_TASKS
from nanochat.evaluate import TASKS, run_mc_batch
from nanochat.task_common import (MalformedRow, MCExample, ModelScorer, TaskData, continuation_ids, load_rows,
                                  parse_rows, read_jsonl, score_mc, subsample)


def test_task_names_agree():
    assert set(EVAL_TASKS) == set(TASKS) | {"bpb"}


# ---------------------------------------------------------------------------------------------------------------
# GSM8K

@pytest.mark.parametrize("text, value", [
    ("$1,200.", 1200), ("-3", -3), ("18.0", 18), ("1,600", 1600), ("$5", 5), ("0.5", 0.5),
])
def test_gsm8k_normalize(text, value):
    assert task_gsm8k.normalize_number(text) == value


# (completion, flexible, strict 0-shot, strict 8-shot): lm-eval's RegexFilter outputs, "[invalid]" when no match
EXTRACTIONS = [
    ("so she pays #### $1,200.", "$1,200.", "[invalid]", "[invalid]"),    # strict: no "$" after "#### "
    ("It drops by 5 to -3", "-3", "[invalid]", "[invalid]"),               # the last number, sign kept
    ("The total is 18.0 dollars", "18.0", "[invalid]", "[invalid]"),
    ("I do not know.", "[invalid]", "[invalid]", "[invalid]"),             # no number at all
    ("#### 7\nQuestion: ... #### 9", "9", "7", "[invalid]"),              # flexible: the LAST match; strict: first
    ("12 apples and 3 pears, so 15.", "15.", "[invalid]", "[invalid]"),    # the period is part of the match
    ("####18", "18", "[invalid]", "[invalid]"),                            # strict needs "#### " with the space
    ("The answer is $18.", "$18.", "[invalid]", "[invalid]"),              # 8-shot strict: no "$" either
    ("So 6 + 2 = 8. The answer is 8.", "8.", "[invalid]", "8"),
    ("The answer is 1,600. Done", "1,600.", "[invalid]", "1,600."),       # the regex's "." eats the space
]


@pytest.mark.parametrize("completion, flexible, strict0, strict8", EXTRACTIONS)
def test_gsm8k_extraction_is_the_harness_filter(completion, flexible, strict0, strict8):
    assert task_gsm8k.extract_flexible(completion) == flexible
    assert task_gsm8k.extract_strict(completion, 0) == strict0
    assert task_gsm8k.extract_strict(completion, 8) == strict8


# each harness rule against the old, more lenient scoring: (completion, gold answer, shots, strict, flexible)
HARNESS_RULES = [
    ("#### 18 then 25", "x\n#### 18", 0, True, False),        # flexible takes the last match (old: first ####)
    ("####18", "x\n#### 18", 0, False, True),                 # strict needs "#### N" (old: accepted "####18")
    ("#### $18", "x\n#### 18", 0, False, True),               # strict rejects "$" (old: accepted); flexible strips it
    ("#### 18.0", "x\n#### 18", 0, False, False),             # strings, not numbers (old: 18.0 == 18)
    ("The answer is $18.", "x\n#### 18", 8, False, True),     # 8-shot strict rejects "$" (old: accepted)
    ("The answer is 18.", "x\n#### 18", 8, True, True),
    ("#### 1,600", "x\n#### 1600", 0, True, True),            # "," is ignored on both sides
    ("The answer is 1,600.", "x\n#### 1,600", 8, True, True),
]


@pytest.mark.parametrize("completion, answer, shots, strict, flexible", HARNESS_RULES)
def test_gsm8k_exact_match_follows_the_harness(completion, answer, shots, strict, flexible):
    ex = task_gsm8k.make_parser(shots)({"question": "q?", "answer": answer}, 0)
    res = task_gsm8k.score(ex, completion, shots)
    assert (res["exact_match_strict"], res["exact_match_flexible"]) == (strict, flexible)


def test_gsm8k_scoring_agrees_with_lm_eval_itself(harness):
    """Where lm-eval is installed (CI installs it): its RegexFilter and exact_match_hf_evaluate, configured from its
    own gsm8k / gsm8k_cot YAMLs, agree with ours on every test string."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    tasks_dir = harness
    configs = {}
    for shots, name in ((0, "gsm8k.yaml"), (8, "gsm8k-cot.yaml")):
        with open(tasks_dir / "gsm8k" / name) as f:
            configs[shots] = yaml.safe_load(f)
    for shots, cfg in configs.items():
        assert cfg["metadata"]["version"] == 3.0
        filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
        metric = cfg["metric_list"][0]
        assert metric["regexes_to_ignore"] == list(task_gsm8k.REGEXES_TO_IGNORE) and metric["ignore_case"]
        assert [u for u in cfg["generation_kwargs"]["until"]] == task_gsm8k.STOP_STRINGS[shots]
        strict = RegexFilter(filters["strict-match"]["regex_pattern"])
        flexible = RegexFilter(filters["flexible-extract"]["regex_pattern"],
                               group_select=filters["flexible-extract"]["group_select"])
        cases = [(c, "x\n#### 18") for c, *_ in EXTRACTIONS] + [(c, a) for c, a, *_ in HARNESS_RULES]
        for completion, answer in cases:
            ours = task_gsm8k.score(task_gsm8k.make_parser(shots)({"question": "q", "answer": answer}, 0),
                                    completion, shots)
            target = answer if shots == 0 else answer.split("####")[-1].strip()
            for key, flt in (("strict", strict), ("flexible", flexible)):
                theirs = list(flt.apply([[completion]], [{}]))[0][0]
                assert ours[f"extracted_{key}"] == theirs, (shots, key, completion)
                em = exact_match_hf_evaluate([theirs], [target], regexes_to_ignore=metric["regexes_to_ignore"],
                                             ignore_case=True, ignore_punctuation=False)["exact_match"]
                assert ours[f"exact_match_{key}"] == bool(em), (shots, key, completion)


def test_gsm8k_numeric_equivalence_is_a_separate_column():
    ok = task_gsm8k.is_correct
    assert ok("$1,200.", "1200") and ok("18.0", "18") and ok("-3", "-3")
    assert not ok("3", "-3") and not ok(None, "5") and not ok("1.2.3", "1")
    ex = task_gsm8k.make_parser(0)({"question": "q?", "answer": "work\n#### 18"}, 3)
    res = task_gsm8k.score(ex, "so #### 18.0", 0)
    assert res["exact_match_flexible_numeric"] and not res["exact_match_flexible"] and not res["exact_match_strict"]
    assert ex.reference == "18" and ex.id == "test-3"


def test_gsm8k_prompts_and_exemplars():
    exemplars = task_gsm8k.load_exemplars()
    assert len(exemplars) == 8
    finals = [task_gsm8k.normalize_number(task_gsm8k.extract_strict(e["answer"], 8)) for e in exemplars]
    assert finals == [6, 5, 39, 8, 9, 29, 33, 8]  # Wei et al. 2022 / lm-eval gsm8k_cot
    row = {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}
    p8 = task_gsm8k.make_parser(8)(row, 0).prompt
    assert p8.count("\nA: ") == 8 and p8.startswith("Q: There are 15 trees") and p8.endswith("\n\nQ: How many?\nA:")
    assert task_gsm8k.make_parser(0)(row, 0).prompt == "Question: How many?\nAnswer:"
    with pytest.raises(MalformedRow, match="no '#### <number>'"):
        task_gsm8k.make_parser(0)({"question": "q", "answer": "no final line"}, 0)
    with pytest.raises(MalformedRow, match="string fields"):
        task_gsm8k.make_parser(0)({"question": "q"}, 0)


def test_gsm8k_real_references(shared_data_dir):
    rows = read_jsonl(str(shared_data_dir / "gsm8k" / "test.jsonl"))
    examples, malformed = parse_rows(rows, task_gsm8k.make_parser(0), strict=False, source="gsm8k")
    assert len(examples) == 1319 and malformed == []
    # the gold answer scores as correct under both extractions: the reference is written the harness's way
    # (the last line "#### N"), read independently of the regexes under test
    for r, ex in zip(rows, examples):
        final = r["answer"].strip().splitlines()[-1]
        assert final.startswith("#### ") and ex.reference == final[5:].strip()
        res = task_gsm8k.score(ex, r["answer"], 0)
        assert res["exact_match_strict"] and res["exact_match_flexible"], r["answer"][-40:]


# ---------------------------------------------------------------------------------------------------------------
# HellaSwag and ARC parsing

def test_hellaswag_preprocess_and_parse(shared_data_dir):
    # lm-eval's exact behaviour, quirks included: strip() runs before the tags go, so a leading space can remain
    assert task_hellaswag.preprocess("[header] How to make tea [title] Boil water.") == " How to make tea. Boil water."
    assert task_hellaswag.preprocess("Pour it. [step] Wait.") == "Pour it. Wait."
    row = json.loads(open(shared_data_dir / "hellaswag" / "hellaswag_val.jsonl").readline())
    ex = task_hellaswag.parse(row, 0)
    assert ex.gold == row["label"] and len(ex.choices) == 4 and ex.id == str(row["ind"])
    assert ex.context.startswith(row["activity_label"] + ": ") and ex.delimiter == " "
    assert task_hellaswag.parse({**row, "label": str(row["label"])}, 0).gold == row["label"]  # hub: label is str
    for bad, match in [({"label": 4}, "not in 0..3"), ({"label": "x"}, "not an integer"),
                       ({"endings": ["a", "b", "c"]}, "list of 4"), ({"ctx_a": None}, "ctx_a")]:
        with pytest.raises(MalformedRow, match=match):
            task_hellaswag.parse({**row, **bad}, 0)


def arc_row(task: str, row_id: str, shared_data_dir) -> dict:
    name = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}[task]
    for line in open(shared_data_dir / "arc" / f"{name}-test.jsonl"):
        row = json.loads(line)
        if row["id"] == row_id:
            return row
    raise KeyError(row_id)


@pytest.mark.parametrize("task, row_id, n_choices, gold", [
    ("arc_easy", "Mercury_417466", 4, 0),            # A-D, key A
    ("arc_easy", "NYSEDREGENTS_2015_8_28", 4, 1),    # labels 1-4, key '2' -> index 1 (int(key) would say 2)
    ("arc_easy", "NYSEDREGENTS_2008_4_6", 3, 1),     # 3 options A-C
    ("arc_easy", "TIMSS_2003_4_pg35", 5, 1),         # 5 options A-E
    ("arc_challenge", "NYSEDREGENTS_2012_8_42", 3, 1),  # 3 options 1-3
    ("arc_challenge", "TIMSS_1995_8_J7", 5, 3),
])
def test_arc_label_mapping(shared_data_dir, task, row_id, n_choices, gold):
    row = arc_row(task, row_id, shared_data_dir)
    ex = task_arc.parse(row, 0)
    assert len(ex.choices) == n_choices and ex.gold == gold and ex.id == row_id
    assert ex.choices[ex.gold] == row["choices"]["text"][row["choices"]["label"].index(row["answerKey"])]
    assert ex.context == f"Question: {row['question']}\nAnswer:"
    with pytest.raises(MalformedRow, match="not among the labels"):
        task_arc.parse({**row, "answerKey": "Z"}, 0)


# ---------------------------------------------------------------------------------------------------------------
# multiple-choice decisions with a stub scorer

class StubScorer:
    """loglikelihoods() answers from a table the test fills: (context, continuation) -> (ll, n_tokens)."""

    def __init__(self, table):
        self.table, self.requests = table, []

    def loglikelihoods(self, requests):
        self.requests += requests
        return [dict(ll=self.table[r][0], n_tokens=self.table[r][1], truncated=False) for r in requests]


def test_acc_and_acc_norm_pick_different_endings():
    ex = MCExample(id="h1", context="A man", choices=["runs.", "walks slowly down the long road."], gold=1)
    # choice 0: LL -10 over 5 chars (-2/char); choice 1: LL -12 over 32 chars (-0.375/char), 2 vs 8 tokens
    stub = StubScorer({("A man", " runs."): (-10.0, 2), ("A man", " walks slowly down the long road."): (-12.0, 8)})
    [rec] = run_mc_batch([ex], stub)
    assert stub.requests == [("A man", " runs."), ("A man", " walks slowly down the long road.")]
    assert rec["pred"] == 0 and not rec["acc"]               # raw sum prefers the short ending
    assert rec["pred_norm"] == 1 and rec["acc_norm"]         # per character prefers the long one
    assert rec["pred_token_norm"] == 1                       # -5/token vs -1.5/token
    assert rec["lls"] == [-10.0, -12.0]


def test_mc_ties_and_skips():
    ex = MCExample(id="t", context="c", choices=["aa", "bb"], gold=1)
    tied = score_mc(ex, [dict(ll=-1.0, n_tokens=1, truncated=False)] * 2)
    assert tied["pred"] == 0 and tied["pred_norm"] == 0  # ties go to the first choice, never to the gold
    assert score_mc(ex, [dict(ll=-1.0, n_tokens=1, truncated=False), dict(ll=None, n_tokens=0, truncated=True)]) \
        is None


def test_hellaswag_and_arc_through_the_stub(shared_data_dir):
    """Real rows, stub log-likelihoods: the scorer sees lm-eval's strings and follows the stub's numbers."""
    h = task_hellaswag.parse(json.loads(open(shared_data_dir / "hellaswag" / "hellaswag_val.jsonl").readline()), 0)
    a = task_arc.parse(arc_row("arc_easy", "TIMSS_2003_4_pg35", shared_data_dir), 0)
    table = {}
    for ex, favourite in ((h, 2), (a, 4)):
        for i, c in enumerate(ex.choices):
            table[(ex.context, " " + c)] = (-1.0 if i == favourite else -50.0, 3)
    recs = run_mc_batch([h, a], StubScorer(table))
    assert [r["pred"] for r in recs] == [2, 4] and [r["pred_norm"] for r in recs] == [2, 4]
    assert [r["acc"] for r in recs] == [h.gold == 2, a.gold == 4]


# ---------------------------------------------------------------------------------------------------------------
# continuation tokens and model log-likelihoods

def test_continuation_tokens_follow_the_joint_encoding(tiny_base_dir):
    tok = tiny_base_dir.tokenizer
    ids, n = continuation_ids(tok, "Question: what is it?\nAnswer:", " the sun")
    assert ids == tok.encode("Question: what is it?\nAnswer: the sun", prepend=tok.bos_token_id)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[-n:]) == " the sun"
    # a boundary inside a word: the straddling token counts as continuation, the ids stay the joint encoding
    ids, n = continuation_ids(tok, "The cat", "s sat")
    assert ids == tok.encode("The cats sat", prepend=tok.bos_token_id)
    assert tok.decode(ids[-n:]).endswith("s sat") and len(tok.decode(ids[-n:])) >= len("s sat")


def test_model_scorer_matches_a_plain_forward(tiny_base_dir):
    from nanochat.gpt import GPT, GPTConfig
    tok = tiny_base_dir.tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          out_proj_init_scale=1.0))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.mul_(300)
    model.eval()
    scorer = ModelScorer(model, tok, torch.autocast("cpu", enabled=False))
    reqs = [("Question: why?\nAnswer:", " because"), ("A much longer context about many things", " yes"),
            ("x" * 400, " tail")]  # the last one is longer than 64 tokens: cut from the left
    out = scorer.loglikelihoods(reqs)
    for (ctx, cont), r in zip(reqs, out):
        ids, n = continuation_ids(tok, ctx, cont)
        ids = ids[-64:]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
        ref = sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids)))
        assert r["ll"] == pytest.approx(ref, abs=1e-4) and r["n_tokens"] == n
    assert [r["truncated"] for r in out] == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# data plumbing

def test_subsample_is_deterministic():
    xs = list(range(100))
    a, b = subsample(xs, 10, 42), subsample(xs, 10, 42)
    assert a == b and len(set(a)) == 10 and a == sorted(a) and a != list(range(10))
    assert subsample(xs, 10, 43) != a
    assert subsample(xs, -1, 42) == xs and subsample(xs, 500, 42) == xs


def test_wilson_interval():
    from nanochat.stats import wilson_interval  # statsmodels' proportion_confint, against published values
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and all(map(math.isnan, wilson_interval(0, 0)))


def test_malformed_rows_counted_or_fatal(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = {"question": "q", "answer": "#### 3"}
    path.write_text("\n".join([json.dumps(good), "{not json", json.dumps({"question": "q", "answer": "3"}),
                               json.dumps([1, 2]), json.dumps(good)]) + "\n")
    rows = read_jsonl(str(path))
    examples, malformed = parse_rows(rows, task_gsm8k.make_parser(0), strict=False, source=str(path))
    assert len(examples) == 2 and len(malformed) == 3
    assert "row 1: line 2 is not JSON" in malformed[0] and "row 2:" in malformed[1] and "row 3:" in malformed[2]
    with pytest.raises(UserError, match=r"rows.jsonl: malformed row 1: line 2 is not JSON"):
        parse_rows(rows, task_gsm8k.make_parser(0), strict=True, source=str(path))


def test_load_rows_falls_back_to_local(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.jsonl").write_text('{"a": 1}\n')
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    data = TaskData(hub_id="no-such-org/no-such-dataset", hub_config=None, split="test", local_path="t/x.jsonl")
    rows, source = load_rows(data, "auto")
    assert rows == [{"a": 1}] and source == f"local:{tmp_path}/t/x.jsonl"
    with pytest.raises(UserError, match="--task-data hub: cannot load no-such-org/no-such-dataset"):
        load_rows(data, "hub")
    missing = TaskData(hub_id="no-such-org/x", hub_config=None, split="test", local_path="t/missing.jsonl")
    with pytest.raises(UserError, match="missing.jsonl not found"):
        load_rows(missing, "local")
