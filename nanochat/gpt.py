"""The GPT model, nanochat style.

- rotary position embeddings, no learned positions
- QK-norm (parameter-free RMSNorm on queries and keys)
- ReLU^2 MLP, no biases anywhere
- parameter-free RMSNorm: pre-norm in each block, after the token embedding and before the head
- untied token embedding and lm_head, logit softcap
- attention through scaled_dot_product_attention (flash kernel on GPU), grouped-query attention capable
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError


@dataclass
class GPTConfig:
    sequence_len: int = 1024      # training context; rotary tables cover ROTARY_HEADROOM x this for generation
    vocab_size: int = 32768       # includes special tokens; set from the tokenizer
    n_layer: int = 12
    n_head: int = 6               # query heads
    n_kv_head: int = 6            # key/value heads (GQA when < n_head)
    n_embd: int = 768
    logit_softcap: float = 15.0   # tanh softcap on the logits, as nanochat (0 disables)
    rope_base: float = 10000.0

    def validate(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config {name} must be > 0 (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise UserError(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.logit_softcap < 0:
            raise UserError(f"logit_softcap must be >= 0 (got {self.logit_softcap})")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


ROTARY_HEADROOM = 4  # generation may run past the training context; beyond this the tables must be rebuilt


def model_dims_from_depth(depth: int, aspect_ratio: int = 64, head_dim: int = 128) -> tuple[int, int]:
    """The one dial: width = depth * aspect_ratio rounded up to a multiple of head_dim. Returns (n_embd, n_head)."""
    if depth <= 0:
        raise UserError(f"--depth must be > 0 (got {depth})")
    if aspect_ratio <= 0 or head_dim <= 0:
        raise UserError(f"--aspect-ratio and --head-dim must be > 0 (got {aspect_ratio}, {head_dim})")
    n_embd = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    return n_embd, n_embd // head_dim


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, D]; cos/sin: [1, T, 1, D/2]
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, T, D]
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)                   # [B, Hkv, T_past + T, D]
        Tk = k.size(2)
        enable_gqa = self.n_head != self.n_kv_head
        if kv_cache is None or Tk == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        else:
            # decoding with a cache: query i sits at absolute position Tk - T + i and sees keys up to there
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache=None):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = self._rotary_tables(config.sequence_len * ROTARY_HEADROOM)
        self.register_buffer("cos", cos, persistent=False)  # not saved: derived from the config
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, seq_len: int, device=None):
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                                                  device=device) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # [1, T, 1, D/2]

    @torch.no_grad()
    def init_weights(self):
        """nanochat init: unit-normal embedding, tiny lm_head, uniform hidden matrices, zero output projections
        (so each block starts as the identity and the residual stream carries the embedding)."""
        C = self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = 3 ** 0.5 * C ** -0.5  # uniform with std 1/sqrt(C)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.cos.size(1), device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # -- accounting -----------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight (the embedding lookup is not a
        matmul) plus the attention score/value products, 12 * L * H * D * T (as nanochat/PaLM)."""
        cfg = self.config
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """idx: [B, T] token ids. Returns logits [B, T, V] (fp32) when targets is None, else the loss
        (a scalar for 'mean'/'sum', [B, T] for 'none'). Targets of -1 are ignored."""
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.cos.size(1)})")
        cos_sin = self.cos[:, t0:t0 + T].to(idx.device), self.sin[:, t0:t0 + T].to(idx.device)
        x = norm(self.transformer.wte(idx))  # [B, T, C]
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        logits = self.lm_head(x).float()  # [B, T, V], softcap and loss in fp32
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss
