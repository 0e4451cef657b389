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

import sys
import time
import types
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from nanochat.common import UserError, use_compile_cache


class KVCache:
    """Keys and values of every layer for a batch of sequences, and where the next tokens go.

    Two layouts, one protocol (nanochat/gpt.py): GPT.hidden_states calls positions(T) once (the rotary positions
    of the new tokens); each attention layer calls insert_kv(layer, k, v) and gets back the keys/values to attend
    to, then attn_mask(T). The position advances after the last layer has inserted.

    - static=False (eager generation): the position is a Python int; attention reads the keys written so far
      ([..., :pos + T]), with no mask for an unpadded decode step (the flash kernel on GPU). Allocated on the first
      insert, so it takes the device and dtype the model produces (bf16 under autocast).
    - static=True (the compiled decode): every shape is fixed for the cache's life and the position is a tensor,
      so one compiled graph serves every decode step; attention reads all max_len slots through a mask (slots not
      yet written are masked). Allocated up front (`dtype`, `device`), zero-filled (a masked slot's weight is an
      exact 0, and 0 * NaN from uninitialised memory would be NaN), and reused across generate calls (reset()),
      so on CUDA its addresses stay put for CUDA graphs. One tensor per layer (k[layer]: [B, Hkv, max_len, D]):
      an in-place write into a view of one 5-d buffer makes inductor copy the whole layer's cache every step
      (measured: 4x slower decode at batch 8), a write into a tensor of its own is done in place. The first
      forward after reset() is the prefill: it writes slots [0, T) and attends among the new tokens only.

    pad_lens[b] = leading pad positions of row b. Those keys are masked for every query, but a pad query may see
    itself: a fully masked row makes SDPA return NaN, and NaN * 0 in the value product would leak into real rows.
    """

    def __init__(self, batch_size: int, num_layers: int, max_len: int, pad_lens=None, *, static: bool = False,
                 num_kv_heads: int = 0, head_dim: int = 0, dtype=None, device=None):
        self.batch_size, self.num_layers, self.max_len, self.static = batch_size, num_layers, max_len, static
        self.k = self.v = None
        self._mask = None
        if static:
            if num_kv_heads <= 0 or head_dim <= 0:
                raise ValueError("a static KV cache needs num_kv_heads and head_dim to allocate its buffers")
            shape = (batch_size, num_kv_heads, max_len, head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.pos_t = torch.zeros((), dtype=torch.long, device=device)           # next slot to write
            self.pad_t = torch.zeros(batch_size, dtype=torch.long, device=device)   # [B] leading pads per row
            self.slots = torch.arange(max_len, device=device)                       # [max_len] key positions
        self.reset(pad_lens)

    def reset(self, pad_lens=None):
        """Empty the cache for a new batch (a static cache keeps its buffers: nothing is reallocated)."""
        self.pad_lens = list(pad_lens) if pad_lens is not None else [0] * self.batch_size
        if len(self.pad_lens) != self.batch_size:
            raise ValueError(f"pad_lens has {len(self.pad_lens)} entries for a batch of {self.batch_size}")
        self.pos = 0
        self.prefilled = False
        if self.static:
            self.pos_t.zero_()
            self.pad_t.copy_(torch.tensor(self.pad_lens, dtype=torch.long))
        return self

    def get_pos(self) -> int:
        """The number of positions written (a host sync for a static cache: not for the compiled path)."""
        return int(self.pos_t) if self.static else self.pos

    def positions(self, T: int):
        """The rotary positions of the next T tokens: a slice (eager) or a [T] tensor (static: no Python int in the
        compiled graph, so no recompile per position)."""
        if not self.static:
            if self.pos + T > self.max_len:
                raise ValueError(f"KV cache overflow: {self.pos + T} positions > max_len {self.max_len}")
            return slice(self.pos, self.pos + T)
        if not self.prefilled:
            if T > self.max_len:
                raise ValueError(f"KV cache overflow: {T} positions > max_len {self.max_len}")
            return self.slots[:T]
        return self.pos_t + self.slots[:T]

    def _pad_mask(self, T: int, device) -> torch.Tensor:
        """[B, 1, T, T] for T new tokens at positions 0..T-1: causal, pad keys masked (a pad query sees itself)."""
        pads = self.pad_t if self.static else torch.tensor(self.pad_lens, device=device)
        q_pos = torch.arange(T, device=device)[:, None]                         # [T, 1]
        k_pos = torch.arange(T, device=device)[None, :]                         # [1, T]
        return ((k_pos <= q_pos) & ((k_pos >= pads[:, None, None]) | (k_pos == q_pos)))[:, None]

    def _build_mask(self, T: int, device) -> torch.Tensor | None:
        if not self.static:
            if not any(self.pad_lens):
                return None  # plain causal attention: the model picks is_causal (prefill) or a tril mask (decode)
            q_pos = torch.arange(self.pos, self.pos + T, device=device)[:, None]  # [T, 1] absolute positions
            k_pos = torch.arange(self.pos + T, device=device)[None, :]            # [1, Tk]
            pads = torch.tensor(self.pad_lens, device=device)[:, None, None]      # [B, 1, 1]
            return ((k_pos <= q_pos) & ((k_pos >= pads) | (k_pos == q_pos)))[:, None]  # [B, 1, T, Tk]
        if not self.prefilled:
            return self._pad_mask(T, device)  # always a mask: a Python check of the padding would be a guard
        q_pos = self.pos_t + self.slots[:T, None]                                # [T, 1]
        k_pos = self.slots[None, :]                                              # [1, max_len]
        mask = (k_pos <= q_pos) & (k_pos >= self.pad_t[:, None, None])           # [B, T, max_len]
        return mask[:, None]                                                     # [B, 1, T, max_len]

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape
        if B != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} rows, the model passed {B}")
        if layer_idx == 0:  # one mask per forward, shared by all layers
            self._mask = self._build_mask(T, k.device)
        last = layer_idx == self.num_layers - 1
        if self.static:
            if not self.prefilled:  # the prefill: slots [0, T), attention among the new tokens only
                self.k[layer_idx][:, :, :T] = k
                self.v[layer_idx][:, :, :T] = v
                if last:
                    self.pos_t.fill_(T)
                    self.prefilled = True
                return k, v
            slots = self.pos_t + self.slots[:T]                                  # [T]
            self.k[layer_idx].index_copy_(2, slots, k)
            self.v[layer_idx].index_copy_(2, slots, v)
            if last:
                self.pos_t.add_(T)
            return self.k[layer_idx], self.v[layer_idx]                          # [B, Hkv, max_len, D]
        if self.k is None:
            self.k = torch.empty(self.num_layers, B, H, self.max_len, D, dtype=k.dtype, device=k.device)
            self.v = torch.empty(self.num_layers, B, H, self.max_len, v.size(-1), dtype=v.dtype, device=v.device)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        out = self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]
        if last:
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


def _decode_step(model, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """ids [B, T] -> fp32 logits [B, V] of the last position, through the cache. The function torch.compile
    compiles (one graph per model structure and cache shape)."""
    return model(ids, kv_cache=cache, last_only=True)[:, -1].float()


# Each (model structure, batch bucket, length bucket, prefill or decode) is one graph of _decode_step; Dynamo's
# default limit of 8 per code object would silently fall back to eager past it.
DECODE_RECOMPILE_LIMIT = 64
MIN_LENGTH_BUCKET = 64  # shortest static cache: shorter generations would only add graphs, not speed


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _own_code(fn):
    """A copy of fn with a code object of its own. Dynamo keeps compiled graphs per code object and checks the
    guards of each in turn, so a model's decode step then checks only its own graphs' guards (measured: a second
    model's graphs in the same process cost 0.24 ms per token, on a 3 ms step)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


class _CompiledDecoder:
    """The compiled decode of one model: its compiled step functions and a pool of static caches, one per
    (batch bucket, length bucket, dtype). Shared by every Engine on the model (callers make an Engine per batch)."""

    def __init__(self, backend, device_type: str):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, DECODE_RECOMPILE_LIMIT)
        inductor = backend == "inductor"
        # CUDA graphs for decode: a token's step is thousands of tiny kernels (Sinkhorn's above all), launched once.
        # On the CPU, inductor's C++ wrapper calls the kernels without a Python call each (measured, depth 4, batch
        # 1: mHC 3.86 -> 3.33 ms per token, baseline 3.22 -> 3.12)
        self.cudagraphs = device_type == "cuda" and inductor
        cpu_kw = dict(options={"cpp_wrapper": True}) if inductor and device_type == "cpu" else {}
        kw = dict(backend=backend, fullgraph=True, dynamic=False)
        self.decode = torch.compile(_own_code(_decode_step), **kw,
                                    **(dict(mode="reduce-overhead") if self.cudagraphs else cpu_kw))
        self.prefill = torch.compile(_own_code(_decode_step), **kw, **cpu_kw)  # no CUDA graphs: one call each
        self.caches: dict = {}

    def cache(self, model, batch: int, max_len: int, dtype, device) -> KVCache:
        key = (batch, max_len, dtype, str(device))
        if key not in self.caches:
            cfg = model.config
            cache = KVCache(batch, cfg.n_layer, max_len, static=True, num_kv_heads=cfg.n_kv_head,
                            head_dim=cfg.n_embd // cfg.n_head, dtype=dtype, device=device)
            if self.cudagraphs:  # fixed addresses: CUDA graphs replay in place instead of copying the cache in
                for t in (*cache.k, *cache.v, cache.pos_t, cache.pad_t, cache.slots):
                    torch._dynamo.mark_static_address(t)
            self.caches[key] = cache
        return self.caches[key]


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {backend: _CompiledDecoder}


class Engine:
    """compile: run decode steps through torch.compile (a static KV cache, CUDA graphs on GPU; see
    docs/performance.md for when it pays). Rows are padded to a power-of-two batch and the cache to a power-of-two
    length, so a handful of graphs serve every call; the prompt's prefill stays eager unless compile_prefill
    (then also bucketed, by left padding the prompts to a power-of-two length). backend: torch.compile's
    (tests count graphs with torch._dynamo.testing.CompileCounter)."""

    def __init__(self, model, tokenizer=None, autocast_ctx=None, compile: bool = False,
                 compile_prefill: bool = False, backend="inductor"):
        self.model = model
        self.tokenizer = tokenizer
        self.ctx = autocast_ctx if autocast_ctx is not None else nullcontext()
        self.compile, self.compile_prefill, self.backend = bool(compile), bool(compile_prefill), backend
        self.last_timings: dict = {}  # the last generate(): prefill_s, decode_s, decode_forwards (benchmarks)
        self.past_context_warned = False  # generate() warns once when a call runs past the trained context
        if compile_prefill and not compile:
            raise ValueError("compile_prefill needs compile (the prefill fills the compiled decode's static cache)")

    @property
    def max_context(self) -> int:
        """Longest prompt + generation the model can position (its rotary table, ROTARY_HEADROOM x training)."""
        return self.model.cos.size(1)

    def _forward_last(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        with self.ctx:
            return _decode_step(self.model, ids, cache)  # the head on one position

    def _compiled(self) -> _CompiledDecoder:
        per_model = _COMPILED.setdefault(self.model, {})
        key = self.backend if isinstance(self.backend, str) else id(self.backend)
        if key not in per_model:
            use_compile_cache()
            per_model[key] = _CompiledDecoder(self.backend, self.model.cos.device.type)
        return per_model[key]

    def _kv_dtype(self, device) -> torch.dtype:
        """What the attention projections produce: autocast's dtype under autocast, else the weights'."""
        with self.ctx:
            if torch.is_autocast_enabled(device.type):
                return torch.get_autocast_dtype(device.type)
        return self.model.lm_head.weight.dtype

    @contextmanager
    def _gates_per_row(self, B: int, Bb: int):
        """The compiled path sees every mHC gate as one value per row ([Bb], padding rows repeat row 0), whatever
        was set (learned, global, per layer, per example): one graph for every gate setting. Restored after."""
        if not self.model.config.mhc.enabled:
            yield
            return
        conns = self.model.mhc_modules()
        saved = [c.gate_override for c in conns]
        gates = self.model.mhc_gate_tensor()                                     # [2L] or [B, 2L]
        if gates.dim() == 2 and gates.size(0) != B:  # the eager forward's own check, before any padding row
            raise UserError(f"mHC per-example gates: {gates.size(0)} gates set for a batch of {B} rows")
        gates = gates.expand(B, -1) if gates.dim() == 1 else gates
        gates = torch.cat([gates, gates[:1].expand(Bb - B, -1)])                 # [Bb, 2L]
        try:
            self.model.set_mhc_gates_per_sublayer(gates)
            yield
        finally:
            for c, g in zip(conns, saved):
                c.gate_override = g

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
        trained = self.model.config.sequence_len
        if L + max_new_tokens > trained and not self.past_context_warned:  # once per Engine
            self.past_context_warned = True
            print(f"warning: a prompt of {L} tokens + up to {max_new_tokens} new tokens runs past the model's trained "
                  f"context of {trained} tokens: positions beyond it were never trained (the rotary table reaches "
                  f"{self.max_context}), so the output may degrade", file=sys.stderr, flush=True)
        if self.compile and use_cache:
            return self._generate_compiled(prompts, max_new_tokens, temperature, top_k, seed, stop_tokens,
                                           stop_strings, return_logits)
        device = self.model.cos.device
        pad_lens = [L - len(p) for p in prompts]
        ids = _left_padded(prompts, L, device)
        n_layer = self.model.config.n_layer

        def full_forward(seq):  # no cache kept: a fresh one only carries the padding mask
            return self._forward_last(seq, KVCache(B, n_layer, seq.size(1), pad_lens) if any(pad_lens) else None)

        cache = KVCache(B, n_layer, L + max_new_tokens, pad_lens) if use_cache else None
        t0 = time.perf_counter()
        first = _synced(self._forward_last(ids, cache) if use_cache else full_forward(ids))
        self.last_timings = dict(prefill_s=time.perf_counter() - t0)

        def step(nxt):
            nonlocal ids
            if use_cache:
                return self._forward_last(nxt[:, None], cache)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            return full_forward(ids)

        return self._decode_loop(first, step, B, max_new_tokens, temperature, top_k, seed, stop_tokens,
                                 stop_strings, return_logits)

    def _generate_compiled(self, prompts, max_new_tokens, temperature, top_k, seed, stop_tokens, stop_strings,
                           return_logits):
        """generate() through the compiled step: rows padded to a power-of-two batch (dummy one-token rows), the
        prompt (with compile_prefill) to a power-of-two length, the cache to a power-of-two length."""
        device = self.model.cos.device
        B, L = len(prompts), max(len(p) for p in prompts)
        Bb = _pow2_at_least(B)
        Lp = min(_pow2_at_least(L), self.max_context - max_new_tokens) if self.compile_prefill else L
        max_len = min(max(_pow2_at_least(Lp + max_new_tokens), MIN_LENGTH_BUCKET), self.max_context)
        rows = list(prompts) + [[0]] * (Bb - B)  # dummy rows: one token each, their output is never read
        compiled = self._compiled()
        cache = compiled.cache(self.model, Bb, max_len, self._kv_dtype(device), device)
        cache.reset([Lp - len(p) for p in rows])
        ids = _left_padded(rows, Lp, device)
        with self._gates_per_row(B, Bb), self.ctx:
            prefill = compiled.prefill if self.compile_prefill else _decode_step
            t0 = time.perf_counter()
            first = _synced(prefill(self.model, ids, cache)[:B].clone())  # clone: CUDA graphs reuse outputs
            self.last_timings = dict(prefill_s=time.perf_counter() - t0)

            def step(nxt):
                if compiled.cudagraphs:  # the previous step's outputs may be overwritten from here on
                    torch.compiler.cudagraph_mark_step_begin()
                full = torch.cat([nxt, nxt.new_zeros(Bb - B)]) if Bb > B else nxt
                return compiled.decode(self.model, full[:, None], cache)[:B]

            return self._decode_loop(first, step, B, max_new_tokens, temperature, top_k, seed, stop_tokens,
                                     stop_strings, return_logits)

    def _decode_loop(self, logits, step, B, max_new_tokens, temperature, top_k, seed, stop_tokens, stop_strings,
                     return_logits) -> list[Generation]:
        """Sample, check the stops, and call step(next tokens [B]) -> logits [B, V] until every row is done."""
        t0, forwards = time.perf_counter(), 0
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(seed)
        stop_tokens = set(stop_tokens)
        outs = [Generation(tokens=[], text="", finish_reason="length") for _ in range(B)]
        active = [True] * B
        for i in range(max_new_tokens):
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
                    hits = [j for j in (text.find(s) for s in stop_strings) if j >= 0]
                    if hits:
                        outs[b].text, outs[b].finish_reason, active[b] = text[:min(hits)], "stop_string", False
            if not any(active) or i == max_new_tokens - 1:
                break  # no forward for a token nobody will read
            logits = step(nxt)
            forwards += 1
        # every forward's logits were read (.tolist() above) before the loop ended: the clock saw them finish
        self.last_timings.update(decode_s=time.perf_counter() - t0, decode_forwards=forwards)
        for out in outs:
            if out.finish_reason != "stop_string" and self.tokenizer is not None:
                out.text = self.tokenizer.decode(out.tokens)
        return outs


def _synced(t: torch.Tensor) -> torch.Tensor:
    """t, once the device has computed it (timings)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t


def _left_padded(prompts: list[list[int]], length: int, device) -> torch.Tensor:
    """[B, length] ids, each prompt right-aligned. The pad id is any valid id (padded keys are masked); 0 is always
    in the vocabulary."""
    return torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
