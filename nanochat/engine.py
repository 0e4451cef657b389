"""Generation: a KV cache and batched sampling (greedy, temperature, top-k) with stop tokens and stop strings.

    engine = Engine(model, tokenizer)
    outs = engine.generate([ids_a, ids_b], max_new_tokens=64, stop_strings=["\\n\\n"])   # greedy
    outs[0].text, outs[0].tokens, outs[0].finish_reason

The prompts are run through the model once (prefill) and each new token is then one forward of a single position
against the cache (decode). Prompts of different lengths share a batch by left padding: padded keys are masked out,
and since rotary attention depends only on the distance between query and key, a row shifted right by its padding
computes what it would alone. Works for the baseline and the mHC model alike (mHC mixes streams per token, never
across positions, so the attention cache is the only state).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch


class KVCache:
    """Keys and values of every layer for a batch of sequences, allocated on the first insert (so it takes the
    device and dtypes the model produces, bf16 under autocast included).

    Protocol with nanochat/gpt.py: GPT.forward calls get_pos() once (the rotary offset of the new tokens); each
    attention layer calls insert_kv(layer, k, v) and gets back the keys/values of all positions so far, then
    attn_mask(T). The position advances after the last layer has inserted.

    pad_lens[b] = leading pad positions of row b. Those keys are masked for every query, but a pad query may see
    itself: a fully masked row makes SDPA return NaN, and NaN * 0 in the value product would leak into real rows.
    """

    def __init__(self, batch_size: int, num_layers: int, max_len: int, pad_lens=None):
        self.batch_size, self.num_layers, self.max_len = batch_size, num_layers, max_len
        self.pad_lens = list(pad_lens) if pad_lens is not None else [0] * batch_size
        if len(self.pad_lens) != batch_size:
            raise ValueError(f"pad_lens has {len(self.pad_lens)} entries for a batch of {batch_size}")
        self.pos = 0
        self.k = self.v = None
        self._mask = None

    def get_pos(self) -> int:
        return self.pos

    def _build_mask(self, T: int, device) -> torch.Tensor | None:
        if not any(self.pad_lens):
            return None  # plain causal attention: the model picks is_causal (prefill) or a tril mask (decode)
        q_pos = torch.arange(self.pos, self.pos + T, device=device)[:, None]     # [T, 1] absolute positions
        k_pos = torch.arange(self.pos + T, device=device)[None, :]               # [1, Tk]
        pads = torch.tensor(self.pad_lens, device=device)[:, None, None]         # [B, 1, 1]
        mask = (k_pos <= q_pos) & ((k_pos >= pads) | (k_pos == q_pos))           # [B, T, Tk]
        return mask[:, None]                                                     # [B, 1, T, Tk]

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape
        if self.k is None:
            self.k = torch.empty(self.num_layers, B, H, self.max_len, D, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.num_layers, B, H, self.max_len, v.size(-1), dtype=v.dtype, device=v.device)
        if B != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} rows, the model passed {B}")
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        if layer_idx == 0:  # one mask per forward, shared by all layers
            self._mask = self._build_mask(T, k.device)
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        out = self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return out

    def attn_mask(self, T: int) -> torch.Tensor | None:
        return self._mask


@dataclass
class Generation:
    tokens: list[int]          # generated ids; a stop token is not included, a token completing a stop string is
    text: str                  # the decoded tokens, cut before the first stop string ('' without a tokenizer)
    finish_reason: str         # stop_token | stop_string | length
    logits: list = field(default_factory=list)  # [V] fp32 logits before each generated token (return_logits=True)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax); top_k 0 keeps every token."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    def __init__(self, model, tokenizer=None, autocast_ctx=None):
        self.model = model
        self.tokenizer = tokenizer
        self.ctx = autocast_ctx if autocast_ctx is not None else nullcontext()

    @property
    def max_context(self) -> int:
        """Longest prompt + generation the model can position (its rotary table, ROTARY_HEADROOM x training)."""
        return self.model.cos.size(1)

    def _forward_last(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        with self.ctx:
            return self.model(ids, kv_cache=cache, last_only=True)[:, -1].float()  # the head on one position

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0, stop_tokens=(), stop_strings=(), use_cache: bool = True,
                 return_logits: bool = False) -> list[Generation]:
        """Continue each prompt (a list of token ids) by up to max_new_tokens tokens, all rows in one batch.

        Sampling draws from one torch.Generator seeded with `seed`, so a call is reproducible. use_cache=False
        recomputes the whole sequence for every new token (the reference and the benchmark's slow path)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
        if max_new_tokens < 0 or temperature < 0 or top_k < 0:
            raise ValueError(f"max_new_tokens, temperature and top_k must be >= 0 "
                             f"(got {max_new_tokens}, {temperature}, {top_k})")
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer to decode the generated text")
        B, L = len(prompts), max(len(p) for p in prompts)
        if L + max_new_tokens > self.max_context:
            raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new tokens exceeds the model's "
                             f"{self.max_context} positions; truncate the prompt")
        device = self.model.cos.device
        pad_lens = [L - len(p) for p in prompts]
        # pad token: any valid id works, padded positions are masked out; 0 is always in the vocabulary
        ids = torch.tensor([[0] * pad + list(p) for pad, p in zip(pad_lens, prompts)], dtype=torch.long,
                           device=device)
        n_layer = self.model.config.n_layer
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        stop_tokens = set(stop_tokens)

        def full_forward(seq):  # no cache kept: a fresh one only carries the padding mask
            return self._forward_last(seq, KVCache(B, n_layer, seq.size(1), pad_lens) if any(pad_lens) else None)

        cache = KVCache(B, n_layer, L + max_new_tokens, pad_lens) if use_cache else None
        logits = self._forward_last(ids, cache) if use_cache else full_forward(ids)
        outs = [Generation(tokens=[], text="", finish_reason="length") for _ in range(B)]
        active = [True] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            for b, tok in enumerate(nxt.tolist()):
                if not active[b]:
                    continue
                if return_logits:
                    outs[b].logits.append(logits[b].cpu())
                if tok in stop_tokens:
                    outs[b].finish_reason, active[b] = "stop_token", False
                    continue
                outs[b].tokens.append(tok)
                if stop_strings:
                    text = self.tokenizer.decode(outs[b].tokens)
                    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
                    if hits:
                        outs[b].text, outs[b].finish_reason, active[b] = text[:min(hits)], "stop_string", False
            if not any(active) or step == max_new_tokens - 1:
                break  # no forward for a token nobody will read
            if use_cache:
                logits = self._forward_last(nxt[:, None], cache)
            else:
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                logits = full_forward(ids)
        for out in outs:
            if out.finish_reason != "stop_string" and self.tokenizer is not None:
                out.text = self.tokenizer.decode(out.tokens)
        return outs
