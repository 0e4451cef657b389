"""Synthetic arithmetic word problems in GSM8K's format: {"question", "answer"} with a worked answer whose lines
carry GSM8K's calculator annotations (`<<a+b=c>>`) and end in `#### N`.

Why: the tiny CPU models score 0 on GSM8K, so an exact-match reward would be all zeros and an RL controller would
have nothing to learn from. These problems have the same format and a difficulty a tiny model can learn by
supervised fine-tuning (scripts/sft_train.py), so the whole RL pipeline gets a real signal on a CPU.

    problems = generate_problems(1000, seed=0, steps=2, max_value=20, ops="+-")
    problems[0]["question"], problems[0]["answer"]   # ... '#### 17'

Difficulty knobs: `steps` (operations per problem; a list picks uniformly), `max_value` (largest starting amount
and operand), `ops` (any of + - * /; subtraction never goes below zero, division is always exact). Every problem
also carries its `program` (start value and the operations), so its answer can be checked by recomputation, and a
`type` label: its number of steps ("2-step"), or with a named `mixture` (MIXTURES) the tier it was drawn from.
A mixture draws each problem's tier uniformly, so one set holds problems of different difficulty whose best mHC
gate may differ (the RL controller's context, issue 19):

    generate_problems(1000, seed=0, mixture="mixed")   # types one_step, two_step, mul_div, long
The same seed gives the same problems; different seeds give (almost) disjoint problem sets, and `exclude` removes
any question of another set (held-out evaluation never sees a training question).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from nanochat import task_gsm8k
from nanochat.common import UserError
from nanochat.task_common import GenExample

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Kara", "Leo", "Mia",
         "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Will", "Yara", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards",
         "candies", "toy cars", "flowers", "beads", "eggs"]
OPS = "+-*/"
# phrasing of each operation: (question clause, answer clause); {k} is the operand, {item} the item
PHRASES = {
    "+": [("buys {k} more {item}", "After buying {k} more"), ("finds {k} more {item}", "After finding {k} more"),
          ("gets {k} {item} from a friend", "After getting {k} more")],
    "-": [("gives away {k} {item}", "After giving away {k}"), ("loses {k} {item}", "After losing {k}"),
          ("sells {k} {item}", "After selling {k}")],
    "*": [("ends up with {k} times as many {item}", "With {k} times as many")],
    "/": [("shares the {item} equally among {k} friends and keeps one share", "Keeping one of {k} equal shares")],
}
MAX_CONSECUTIVE_REPEATS = 10000


@dataclass(frozen=True)
class Tier:
    """One difficulty of a mixture: steps (choices), operations and the largest starting amount / operand."""
    name: str
    steps: tuple[int, ...]
    ops: str
    max_value: int


# named mixtures of tiers; "mixed" spans steps 1-4, the four operations and operands up to 10, 20 and 50
MIXTURES = {
    "mixed": (Tier("one_step", (1,), "+-", 10), Tier("two_step", (2,), "+-", 20), Tier("mul_div", (2,), "*/", 20),
              Tier("long", (3, 4), "+-*/", 50)),
}


def mixture_tiers(name: str) -> tuple[Tier, ...]:
    if name not in MIXTURES:
        raise UserError(f"synthetic mixture must be one of {', '.join(MIXTURES)} (got {name!r})")
    return MIXTURES[name]  # draws in a row without a new question: the space is exhausted, stop


def _check_knobs(steps, max_value: int, ops: str):
    steps = [steps] if isinstance(steps, int) else list(steps)
    if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
        raise UserError(f"synthetic problems: steps must be integers >= 1 (got {steps!r})")
    if not isinstance(max_value, int) or max_value < 2:
        raise UserError(f"synthetic problems: max_value must be an integer >= 2 (got {max_value!r})")
    if not ops or any(o not in OPS for o in ops):
        raise UserError(f"synthetic problems: ops must be a non-empty string of {OPS} (got {ops!r})")
    return steps


def _operation(rng: random.Random, value: int, ops: str, max_value: int) -> tuple[str, int]:
    """One operation that keeps the running value a non-negative integer: (op, operand)."""
    choices = [o for o in ops if o != "-" or value >= 1]
    choices = [o for o in choices if o != "/" or any(value % k == 0 for k in range(2, 6))]
    choices = choices or ["+"]
    op = rng.choice(choices)
    if op == "+":
        return op, rng.randint(1, max_value)
    if op == "-":
        return op, rng.randint(1, min(value, max_value))
    if op == "*":
        return op, rng.randint(2, 4)
    return op, rng.choice([k for k in range(2, 6) if value % k == 0])


def apply_op(value: int, op: str, k: int) -> int:
    return {"+": value + k, "-": value - k, "*": value * k, "/": value // k}[op]


def make_problem(rng: random.Random, steps: int, max_value: int, ops: str, type_label: str = "") -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(1, max_value)
    clauses, lines, program = [], [f"{name} starts with {start} {item}."], []
    value = start
    for _ in range(steps):
        op, k = _operation(rng, value, ops, max_value)
        question_clause, answer_clause = rng.choice(PHRASES[op])
        new = apply_op(value, op, k)
        clauses.append(question_clause.format(k=k, item=item))
        lines.append(f"{answer_clause.format(k=k)}, {name} has {value} {op} {k} = <<{value}{op}{k}={new}>>{new} {item}.")
        program.append([op, k])
        value = new
    if len(clauses) == 1:
        story = clauses[0]
    else:
        story = ", then ".join(clauses[:-1]) + ", and then " + clauses[-1]
    question = f"{name} has {start} {item}. {name} {story}. How many {item} does {name} have now?"
    answer = "\n".join(lines) + f"\n#### {value}"
    return dict(question=question, answer=answer, program=dict(start=start, ops=program), final=value,
                type=type_label or f"{steps}-step")


def evaluate_program(program: dict) -> int:
    """The answer of a problem, recomputed from its program."""
    value = program["start"]
    for op, k in program["ops"]:
        value = apply_op(value, op, k)
    return value


def generate_problems(count: int, seed: int = 0, steps=(1, 2), max_value: int = 20, ops: str = "+-",
                      exclude=(), mixture: str = "") -> list[dict]:
    """`count` distinct problems (questions unique within the set and absent from `exclude`, an iterable of
    questions or problems). With `mixture` (a name in MIXTURES) its tiers replace steps / max_value / ops."""
    if mixture:
        tiers = [(t.name, _check_knobs(list(t.steps), t.max_value, t.ops), t.max_value, t.ops)
                 for t in mixture_tiers(mixture)]
    else:
        tiers = [("", _check_knobs(steps, max_value, ops), max_value, ops)]
    if count < 0:
        raise UserError(f"synthetic problems: count must be >= 0 (got {count})")
    excluded = {e["question"] if isinstance(e, dict) else e for e in exclude}
    rng = random.Random(f"synthetic-gsm8k-{seed}")  # a string seed: independent streams per seed
    out, seen, misses = [], set(), 0
    while len(out) < count:
        name, tier_steps, tier_max, tier_ops = rng.choice(tiers) if len(tiers) > 1 else tiers[0]
        p = make_problem(rng, rng.choice(tier_steps), tier_max, tier_ops, name)
        if p["question"] in seen or p["question"] in excluded:
            misses += 1
            if misses > MAX_CONSECUTIVE_REPEATS:  # the problem space is (nearly) exhausted
                what = f"mixture {mixture!r}" if mixture else f"steps={steps}, max_value={max_value}, ops={ops!r}"
                raise UserError(f"synthetic problems: cannot find {count} distinct problems with {what} (found "
                                f"{len(out)}; raise max_value or steps)")
            continue
        misses = 0
        seen.add(p["question"])
        out.append(p)
    return out


def as_examples(problems: list[dict], tag: str) -> list[GenExample]:
    """Generated problems as the GSM8K task's examples (0-shot prompt, reference = the final number)."""
    return [GenExample(id=f"{tag}-{i}", prompt=task_gsm8k.prompt_0shot(p["question"]), reference=str(p["final"]),
                       extra=dict(question=p["question"], answer=p["answer"], type=p["type"]))
            for i, p in enumerate(problems)]
