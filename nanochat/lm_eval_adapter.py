"""lm-evaluation-harness over our checkpoints: an `lm_eval.api.model.LM` registered as model `nanochat`.

    lm_eval --model nanochat --model_args model_tag=d12,batch_size=16 --tasks hellaswag     # after `import` below
    python -m scripts.lm_eval --model-tag d12 --tasks gsm8k,hellaswag,arc_easy,arc_challenge  # offline-capable

- loglikelihood: the summed log-probability of each continuation given its context, and whether greedy decoding
  would produce it, through nanochat.task_common.ModelScorer -- the code our own evaluator scores multiple choice
  with (joint context+continuation encoding, BOS first, left truncation to the trained context).
- loglikelihood_rolling: the whole text's log-probability in disjoint windows of the trained context
  (lm_eval.utils.get_rolling_token_windows, as the harness's HF model does).
- generate_until: greedy generation through nanochat.engine.Engine with the KV cache, a batch at a time, stopping
  at the request's `until` strings; a context longer than the trained context minus max_gen_toks loses its left
  part (the harness's HF convention; our own evaluator drops whole exemplars instead, nanochat/evaluate.py).

Needs the `[harness]` extra (`pip install -e '.[harness]'`): lm-eval is imported when this module is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.checkpoint import check_tokenizer, load_model, resolve_checkpoint
from nanochat.common import UserError, autodetect_device_type, resolve_precision
from nanochat.engine import Engine
from nanochat.task_common import ModelScorer
from nanochat.tokenizer import get_tokenizer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise UserError(f"lm-evaluation-harness is not installed ({e}): pip install -e '.[harness]'") from None


@register_model("nanochat")
class NanochatLM(LM):
    """model_args: model_tag or checkpoint (a directory), step, device (auto | cpu | cuda), dtype (auto | float32
    | bfloat16), batch_size (requests per forward), max_gen_toks (default generation limit), mhc_gates (a list of
    1, L or 2L gate values; default the learned gates), compile (auto | true | false: generate_until through the
    engine's compiled decode; auto = on CUDA)."""

    def __init__(self, model_tag: str = "", checkpoint: str = "", step: int = -1, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 8, max_gen_toks: int = 256, mhc_gates=None,
                 compile: str = "auto"):
        super().__init__()
        if not model_tag and not checkpoint:
            raise UserError("the nanochat lm-eval model needs model_tag=... or checkpoint=...")
        device = autodetect_device_type() if device == "auto" else device
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("device=cuda: no CUDA device is available here")
        self._device = torch.device(device)
        path = checkpoint or resolve_checkpoint(model_tag, int(step))
        self.model, self.meta = load_model(path, self._device)
        self.checkpoint = path
        self.tokenizer = get_tokenizer()
        check_tokenizer(self.meta, self.tokenizer, path)
        if mhc_gates:
            self.model.set_mhc_gates_by_count(mhc_gates, "mhc_gates")
        if str(compile) not in ("auto", "true", "false", "True", "False"):
            raise UserError(f"compile must be auto, true or false (got {compile!r})")
        dtype, use_compile, self.ctx = resolve_precision(self._device.type, dtype, str(compile).lower())
        self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
        self.max_length = self.model.config.sequence_len
        self.scorer = ModelScorer(self.model, self.tokenizer, self.ctx)
        self.engine = Engine(self.model, self.tokenizer, self.ctx, compile=use_compile)  # generate_until
        self.left_truncated = 0  # generation contexts cut to fit (reported by scripts.lm_eval)

    @property
    def tokenizer_name(self) -> str:
        return f"nanochat-{self.tokenizer.fingerprint}"

    # -- the three request types -----------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        pairs = [req.args for req in requests]
        for i in range(0, len(pairs), self.batch_size):
            for r in self.scorer.loglikelihoods(pairs[i:i + self.batch_size], greedy=True):
                if r["ll"] is None:  # an empty continuation, or one longer than the context
                    raise UserError(f"a continuation of {r['n_tokens']} tokens cannot be scored in the trained "
                                    f"context of {self.max_length} tokens")
                out.append((r["ll"], r["greedy"]))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        bos = self.tokenizer.bos_token_id
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tokenizer.encode(text), prefix_token=bos, max_seq_len=self.max_length, context_len=1)]
            total = 0.0
            for context, targets in windows:
                ids = torch.tensor([(context + targets)[:-1]], device=self._device)  # predicts every target
                with self.ctx:
                    logits = self.model(ids)
                logp = F.log_softmax(logits.float(), dim=-1)[0, -len(targets):]
                total += logp.gather(1, torch.tensor(targets, device=self._device)[:, None]).sum().item()
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))  # similar lengths together
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            groups: dict = {}
            for i in idx:  # one engine call per distinct set of generation settings
                context, kwargs = requests[i].args
                kwargs = dict(kwargs or {})
                if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) not in (0, 0.0, None):
                    raise UserError("the nanochat lm-eval model decodes greedily: do_sample/temperature are not "
                                    f"supported (got {kwargs})")
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
                groups.setdefault((tuple(until), max_gen), []).append((i, context))
            for (until, max_gen), items in groups.items():
                room = self.max_length - max_gen
                if room <= 1:
                    raise UserError(f"max_gen_toks {max_gen} leaves no room in the trained context of "
                                    f"{self.max_length} tokens")
                prompts = []
                for _, context in items:
                    ids = self.tokenizer.encode(context, prepend=self.tokenizer.bos_token_id)
                    if len(ids) > room:  # the harness's HF convention: keep the right end of the context
                        self.left_truncated += 1
                        ids = [ids[0]] + ids[len(ids) - room + 1:]
                    prompts.append(ids)
                gens = self.engine.generate(prompts, max_gen, stop_tokens=[self.tokenizer.bos_token_id],
                                            stop_strings=list(until))
                for (i, _), g in zip(items, gens):
                    out[i] = g.text
        return out
