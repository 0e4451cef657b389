"""What the evaluation tasks share: data loading (HF hub, else the local copies), validation of rows with counted
malformed rows, deterministic subsampling, continuation log-likelihoods, multiple-choice scoring (confidence
intervals: nanochat/stats.py). The tasks themselves are nanochat/task_gsm8k.py, task_hellaswag.py and task_arc.py."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import UserError, get_data_dir

TASK_DATA_CHOICES = ("auto", "hub", "local")
_hub_unreachable: str | None = None  # set by the first network failure: later tasks of the run skip the hub (an
# offline box without HF_HUB_OFFLINE otherwise waits ~30 s of retries per task)


class MalformedRow(Exception):
    """A data row that cannot be scored (the message says why); counted and reported, or fatal with --strict."""


@dataclass
class MCExample:
    id: str
    context: str
    choices: list[str]       # continuation strings without the delimiter
    gold: int
    delimiter: str = " "     # lm-eval's target_delimiter: each choice is scored as delimiter + choice


@dataclass
class GenExample:
    id: str
    prompt: str
    reference: str           # the gold final answer as written in the data
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# data

@dataclass
class TaskData:
    hub_id: str              # datasets.load_dataset(hub_id, hub_config, split=split)
    hub_config: str | None
    split: str
    local_path: str          # relative to $NANOCHAT_DATA_DIR, in the layout of shared/data (JSON lines)


def read_jsonl(path: str) -> list:
    """One entry per line: the parsed object, or a MalformedRow for a line that is not UTF-8 or not JSON (so one bad
    line is counted instead of aborting the file; the arrow JSON reader behind load_dataset('json') rejects the whole
    file, or a column whose type changes from row to row). Read as bytes: a text-mode read dies on the first
    non-UTF-8 byte with a UnicodeDecodeError."""
    rows = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8-sig" if i == 0 else "utf-8")  # a BOM on the first line is not an error
            except UnicodeDecodeError as e:
                rows.append(MalformedRow(f"line {i + 1} is not UTF-8 (byte {raw[e.start]:#04x} at column "
                                         f"{e.start + 1})"))
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(MalformedRow(f"line {i + 1} is not JSON ({e.msg})"))
    return rows


def load_rows(data: TaskData, task_data: str = "auto") -> tuple[list, str]:
    """The rows of one split and where they came from. auto = the HF hub, else $NANOCHAT_DATA_DIR."""
    if task_data not in TASK_DATA_CHOICES:
        raise UserError(f"--task-data must be one of {', '.join(TASK_DATA_CHOICES)} (got {task_data!r})")
    global _hub_unreachable
    hub_error = _hub_unreachable if task_data == "auto" else None
    if task_data == "hub" or (task_data == "auto" and _hub_unreachable is None):
        try:
            import datasets
            ds = datasets.load_dataset(data.hub_id, data.hub_config, split=data.split)
            return [dict(r) for r in ds], f"hub:{data.hub_id}" + (f"/{data.hub_config}" if data.hub_config else "") \
                + f":{data.split}"
        except Exception as e:  # noqa: BLE001 -- offline, missing dataset, auth: every failure means "use local"
            hub_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if isinstance(e, OSError) or "Connection" in type(e).__name__:  # requests' errors are OSErrors
                _hub_unreachable = hub_error
            if task_data == "hub":
                raise UserError(f"--task-data hub: cannot load {data.hub_id} ({hub_error})") from None
    data_dir = get_data_dir()
    if data_dir is None:
        raise UserError(f"cannot load {data.hub_id} from the HF hub ({hub_error}) and NANOCHAT_DATA_DIR is not set "
                        f"(it should hold {data.local_path})")
    path = os.path.join(data_dir, data.local_path)
    if not os.path.isfile(path):
        raise UserError(f"task data file {path} not found (NANOCHAT_DATA_DIR={data_dir}); hub: "
                        f"{hub_error or 'not tried (--task-data local)'}")
    return read_jsonl(path), f"local:{path}"


def row_location(where: str, reason: str) -> str:
    """A malformed reason of parse_rows ('row I: why') as '<file>:<line>: why' when the rows came from a local JSONL
    file (`where` = 'local:<path>'; read_jsonl skips blank lines, so row I is the I-th non-blank line); otherwise
    '<where> row I: why'."""
    head, _, why = reason.partition(": ")
    if not (where.startswith("local:") and head.startswith("row ") and head[4:].isdigit()):
        return f"{where} {reason}"
    path, index = where[len("local:"):], int(head[4:])
    with open(path, "rb") as f:
        lines = [i + 1 for i, raw in enumerate(f) if raw.strip()]
    return f"{path}:{lines[index]}: {why}" if index < len(lines) else f"{where} {reason}"


def parse_rows(rows: list, parse, strict: bool, source: str) -> tuple[list, list[str]]:
    """Apply the task's row parser. Returns (examples, malformed reasons); with strict the first one is fatal."""
    examples, malformed = [], []
    for i, row in enumerate(rows):
        try:
            if isinstance(row, MalformedRow):
                raise row
            if not isinstance(row, dict):
                raise MalformedRow(f"row is a {type(row).__name__}, not an object")
            examples.append(parse(row, i))
        except MalformedRow as e:
            reason = f"row {i}: {e}"
            if strict:
                raise UserError(f"{source}: malformed {reason} (drop --strict to count and skip such rows)") from None
            malformed.append(reason)
    return examples, malformed


def subsample(examples: list, max_n: int, seed: int | None) -> list:
    """The first max_n examples after a seeded shuffle (all of them, in file order, when max_n < 0; the first max_n
    in file order, as lm-eval's --limit takes them, when seed is None): the subset depends only on the data, max_n
    and the seed, never on the number of ranks."""
    if max_n < 0 or max_n >= len(examples):
        return list(examples)
    if seed is None:
        return list(examples[:max_n])
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:max_n])]


# ---------------------------------------------------------------------------------------------------------------
# continuation log-likelihoods

def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Encode context + continuation jointly (BOS first) and return (ids, number of continuation tokens at the end).

    The continuation tokens are those after the longest common prefix of the joint encoding and the context's own
    encoding: a token that straddles the boundary (BPE merged the last context characters with the first
    continuation ones) counts as continuation, so the scored tokens are exactly the model's tokenisation of the
    joint text."""
    ctx = tokenizer.encode(context, prepend=tokenizer.bos_token_id)
    joint = tokenizer.encode(context + continuation, prepend=tokenizer.bos_token_id)
    n = 0
    while n < min(len(ctx), len(joint)) and ctx[n] == joint[n]:
        n += 1
    return joint, len(joint) - n


class ModelScorer:
    """Sum of log-probabilities of each continuation given its context, from the model, in batches."""

    def __init__(self, model, tokenizer, autocast_ctx, max_len: int | None = None):
        self.model, self.tokenizer, self.ctx = model, tokenizer, autocast_ctx
        self.max_len = max_len or model.config.sequence_len  # the trained context; longer inputs lose their left

    @torch.no_grad()
    def loglikelihoods(self, requests: list[tuple[str, str]], greedy: bool = False,
                       per_token: bool = False) -> list[dict]:
        """requests: (context, continuation) pairs, scored in one right-padded batch (padding sits after every
        scored position, so causal attention never sees it). Returns per request {ll, n_tokens, truncated} (and,
        with greedy, whether greedy decoding would produce the continuation, lm-eval's is_greedy; with per_token,
        `token_lls`, the log-probability of each continuation token); ll is None when the continuation is empty or
        does not fit the context window."""
        out, rows = [], []
        for context, cont in requests:
            ids, n_cont = continuation_ids(self.tokenizer, context, cont)
            truncated = len(ids) > self.max_len
            if n_cont == 0 or n_cont >= self.max_len:
                out.append(dict(ll=None, n_tokens=n_cont, truncated=truncated))
                continue
            ids = ids[-self.max_len:]  # left truncation, as CORE does; the continuation itself always survives
            out.append(dict(ll=0.0, n_tokens=n_cont, truncated=truncated))
            rows.append((len(out) - 1, ids, n_cont))
        if not rows:
            return out
        device = self.model.cos.device
        T = max(len(ids) for _, ids, _ in rows)
        x = torch.zeros(len(rows), T, dtype=torch.long, device=device)
        for r, (_, ids, _) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids, device=device)
        with self.ctx:
            logits = self.model(x)
        logp = F.log_softmax(logits.float(), dim=-1)
        for r, (i, ids, n_cont) in enumerate(rows):
            L = len(ids)
            targets = torch.tensor(ids[L - n_cont:], device=device)
            # the token at position t is predicted by the logits at t - 1
            token_lls = logp[r, L - n_cont - 1:L - 1].gather(1, targets[:, None])[:, 0]   # [n_cont]
            out[i]["ll"] = token_lls.sum().item()
            if per_token:
                out[i]["token_lls"] = token_lls.tolist()
            if greedy:
                out[i]["greedy"] = bool((logp[r, L - n_cont - 1:L - 1].argmax(-1) == targets).all())
        return out


def score_mc(ex: MCExample, lls: list[dict]) -> dict:
    """Multiple-choice decisions from the per-choice log-likelihoods, lm-eval style:
    acc = argmax sum LL; acc_norm = argmax sum LL / len(choice) in characters (lm-eval; the delimiter is not
    counted); acc_token_norm = argmax mean LL per continuation token (karpathy / CORE style), for comparison.
    Ties go to the first choice (argmax). Returns None when some choice could not be scored."""
    if any(r["ll"] is None for r in lls):
        return None
    ll = [r["ll"] for r in lls]

    def argmax(v):
        return max(range(len(v)), key=lambda i: (v[i], -i))

    pred = argmax(ll)
    pred_norm = argmax([x / max(1, len(c)) for x, c in zip(ll, ex.choices)])
    pred_tok = argmax([x / r["n_tokens"] for x, r in zip(ll, lls)])
    return dict(pred=pred, pred_norm=pred_norm, pred_token_norm=pred_tok, lls=ll,
                acc=pred == ex.gold, acc_norm=pred_norm == ex.gold, acc_token_norm=pred_tok == ex.gold,
                truncated=any(r["truncated"] for r in lls))
