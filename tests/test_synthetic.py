"""Synthetic GSM8K-format problems: answers checked by recomputation, the GSM8K task reads them, seeds and
exclusion keep training and evaluation sets apart, bad knobs are named."""
import re

import pytest

from nanochat import task_gsm8k
from nanochat.common import UserError
from nanochat.synthetic_gsm8k import as_examples, evaluate_program, generate_problems

ANNOTATION = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


@pytest.mark.parametrize("ops", ["+-", "+-*/", "*/"])
def test_answers_are_right_by_recomputation(ops):
    problems = generate_problems(300, seed=3, steps=(1, 2, 3), max_value=30, ops=ops)
    for p in problems:
        # 1. the program recomputes the final answer
        assert evaluate_program(p["program"]) == p["final"]
        # 2. every calculator annotation is arithmetic that holds, each step starts where the last one ended
        steps = ANNOTATION.findall(p["answer"])
        assert len(steps) == len(p["program"]["ops"])
        value = p["program"]["start"]
        for (a, op, b, c, shown), (prog_op, k) in zip(steps, p["program"]["ops"]):
            a, b, c = int(a), int(b), int(c)
            assert a == value and op == prog_op and b == k and int(shown) == c
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op] and c >= 0
            assert op != "/" or a % b == 0  # division is always exact
            value = c
        # 3. the GSM8K task's own parser finds the same final answer, and every operand is in the question
        ex = task_gsm8k.make_parser(0, "synthetic")(dict(question=p["question"], answer=p["answer"]), 0)
        assert task_gsm8k.is_correct(str(p["final"]), ex.reference) and p["answer"].endswith(f"#### {p['final']}")
        assert all(str(k) in p["question"] for _, k in p["program"]["ops"])


def test_seeds_exclusion_and_examples():
    a = generate_problems(200, seed=1, steps=1, max_value=10)
    assert a == generate_problems(200, seed=1, steps=1, max_value=10)  # reproducible
    assert len({p["question"] for p in a}) == 200  # distinct within a set
    b = generate_problems(200, seed=2, steps=1, max_value=10, exclude=a)
    assert not {p["question"] for p in a} & {p["question"] for p in b}
    ex = as_examples(a[:2], "syn")
    assert ex[0].id == "syn-0" and ex[0].prompt == task_gsm8k.prompt_0shot(a[0]["question"])
    assert ex[0].reference == str(a[0]["final"]) and ex[0].extra["answer"] == a[0]["answer"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"), (dict(max_value=1), "max_value"), (dict(ops="+x"), "ops"), (dict(ops=""), "ops"),
    (dict(count=-1), "count")])
def test_bad_knobs_are_named(kwargs, match):
    with pytest.raises(UserError, match=match):
        generate_problems(**{"count": 5, **kwargs})


def test_an_impossible_request_fails_instead_of_looping():
    with pytest.raises(UserError, match="cannot find"):
        generate_problems(10 ** 6, seed=0, steps=1, max_value=2, ops="+")
