"""The GPT model, nanochat style.

- rotary position embeddings, no learned positions
- QK-norm (parameter-free RMSNorm on queries and keys)
- ReLU^2 MLP, no biases anywhere
- parameter-free RMSNorm: pre-norm in each block, after the token embedding and before the head
- untied token embedding and lm_head, logit softcap
- attention through scaled_dot_product_attention (flash kernel on GPU), grouped-query attention capable

arch="ngpt": the normalized Transformer (nGPT, arXiv 2410.01131, after NVIDIA/ngpt): embeddings, weight rows along
the d_model axis and hidden states on the unit sphere; h <- Norm(h + |alpha| (Norm(block(h)) - h)) per sub-layer;
no RMSNorm, no final norm, no softcap; learned scales s_qk (queries and keys), s_u (MLP up) and s_z (logits).
The training loop renormalises the weights after optimizer steps (GPT.project_weights, scripts/base_train.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import UserError
from nanochat.mhc import READOUTS, DynamicMHC, StreamReadout, connection_stats, gate_tensor, validate_mhc_args
from nanochat.newton_schulz import resolve_ns_coeffs


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
    out_proj_init_scale: float = 0.01  # output projections start at 1% of the hidden-matrix init: each block is
                                       # near the identity (as nanochat's zero init) but every upstream weight,
                                       # mHC's H_pre/H_post included, gets a gradient at step 0
    # Dynamic mHC (nanochat/mhc.py); off = the plain residual baseline
    mhc_enabled: bool = False
    mhc_num_streams: int = 4          # n, the expansion rate (paper: 4)
    mhc_sinkhorn_iters: int = 20      # paper: t_max = 20
    mhc_sinkhorn_tau: float = 1.0     # the paper uses no temperature (tau = 1)
    mhc_constraint: str = "sinkhorn"  # sinkhorn | orthostochastic
    mhc_ns_coeffs: str = "handover8"  # NS schedule of the orthostochastic projection (a preset name or literal)
    mhc_dynamic: bool = True          # False: static mHC (biases only) for ablations
    mhc_alpha_init: float = 0.01      # paper: gating factors alpha start at 0.01
    mhc_res_init_diag: float = 0.6    # diagonal of the learned Sinkhorn(b_res) at init (well-conditioned)
    mhc_gate_init: float = 0.2        # initial gate g: H_res := (1 - g) I + g H_res has diagonal 1 - g(1 - d) = 0.92
    mhc_gate_learnable: bool = True   # learn g = sigmoid(theta); False fixes g = mhc_gate_init
    mhc_gate_noise: float = 0.0       # training-time multiplicative gate noise U[1-a, 1+a], clamped to [0, 1]
    mhc_gate_sample_frac: float = 0.0  # training: this fraction of sequences draws g ~ U[0, 1] per sub-layer, so
                                       # the model knows the whole range an RL controller explores
    mhc_stream_embed_std: float = 1.0  # breaks the symmetry of the replicated streams (x has unit RMS too)
    mhc_readout: str = "learned"      # streams -> head: learned sigmoid-weighted sum (V4's hc_head) | sum (HC)
    mhc_bf16_streams: bool = False    # under bf16 autocast, store the n residual streams in bf16 (half the memory
                                      # and traffic of the n*C state); the coefficient math, the read-out and the
                                      # mixing still accumulate in fp32. No effect in fp32 runs
    # architecture: gpt (the baseline above) | ngpt (the normalized Transformer; see the module docstring)
    arch: str = "gpt"
    scalar_alpha: bool = False        # ngpt: one eigen learning rate per sub-layer instead of one per dimension
    ngpt_alpha_init: float = 0.05     # ngpt: initial |alpha_A|, |alpha_M| (NVIDIA/ngpt's value)
    logit_scale: float = 10.0         # ngpt: initial s_z; logits are s_z * cosines in [-1, 1], so s_z = 1 (the
                                      # reference's) starts near-uniform and needs ~1e2 steps to grow (the seed's
                                      # campaign used 10-15)

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
        if self.arch not in ARCHS:
            raise UserError(f"arch must be one of {', '.join(ARCHS)} (got {self.arch!r})")
        if not self.logit_scale > 0 or not self.ngpt_alpha_init > 0:
            raise UserError(f"logit_scale and ngpt_alpha_init must be > 0 (got {self.logit_scale}, "
                            f"{self.ngpt_alpha_init})")
        if self.arch == "ngpt" and self.mhc_enabled:
            raise UserError(NGPT_MHC_ERROR)
        if self.mhc_enabled:
            validate_mhc_args(self.mhc_num_streams, self.mhc_sinkhorn_iters, self.mhc_sinkhorn_tau,
                              self.mhc_constraint, self.mhc_res_init_diag, self.mhc_gate_init,
                              self.mhc_gate_learnable, self.mhc_gate_noise, self.mhc_gate_sample_frac)
            if self.mhc_constraint == "orthostochastic":
                resolve_ns_coeffs(self.mhc_ns_coeffs)
            if self.mhc_stream_embed_std < 0:
                raise UserError(f"mhc_stream_embed_std must be >= 0 (got {self.mhc_stream_embed_std})")
            if self.mhc_readout not in READOUTS:
                raise UserError(f"mhc_readout must be one of {', '.join(READOUTS)} (got {self.mhc_readout!r})")

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**d)


ARCHS = ("gpt", "ngpt")
NGPT_MHC_ERROR = ("arch ngpt cannot be combined with mHC (mhc_enabled): mHC mixes n residual streams with a doubly "
                  "stochastic H_res, and averages of unit vectors leave the sphere nGPT keeps its hidden states on; "
                  "renormalising every stream would change what H_res and nGPT's alpha mean (no published form)")
ROTARY_HEADROOM = 4  # generation may run past the training context; beyond this the tables must be rebuilt
ACTIVATION_CHECKPOINTING = ("off", "mhc", "full")  # GPT.set_activation_checkpointing


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


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Projection onto the unit sphere along `dim` (nGPT's Norm)."""
    return F.normalize(x, dim=dim)


class Scale(nn.Module):
    """A learned vector with NVIDIA/ngpt's reparametrisation: stored = `scale` at init, effective = stored *
    init / scale. Adam moves the stored value by ~lr per step whatever its size, so `scale` sets this vector's
    effective learning rate: a scale of 1/sqrt(C) makes it move sqrt(C) x init x lr per step."""

    def __init__(self, size: int, init: float, scale: float):
        super().__init__()
        self.init, self.scale = init, scale
        self.weight = nn.Parameter(torch.empty(size))

    def reset_parameters(self):
        nn.init.constant_(self.weight, self.scale)

    def forward(self) -> torch.Tensor:
        return self.weight * (self.init / self.scale)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (nanochat's logit softcap); cap 0 leaves the logits as they are."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of softcap(logits) against targets (-1 ignored, loss 0), in fp32, without the
    [N, V] fp32 tensors autograd would keep for backward (the fp32 logits, the tanh and the log-softmax: 3 x 8 GiB
    at 64k tokens and a 32k vocabulary). Works through the rows in chunks of CHUNK_ELEMENTS logits, saves only
    the logits in their own dtype (bf16 under autocast) and one log-sum-exp per token, and recomputes the
    elementwise softcap and softmax in backward (no matmul is recomputed)."""

    CHUNK_ELEMENTS = 2 ** 24  # fp32 temporaries per chunk: 64 MiB each (512 tokens at a 32k vocabulary). An int:
                              # Dynamo specialises ints (a float here would break a compiled graph)

    @staticmethod
    def forward(ctx, logits, targets, cap: float):
        N, V = logits.shape
        rows = max(1, _SoftcapCrossEntropy.CHUNK_ELEMENTS // V)
        valid = targets >= 0
        picked = targets.clamp_min(0).unsqueeze(1)                                  # [N, 1]
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)
        loss = torch.empty(N, dtype=torch.float32, device=logits.device)
        for i in range(0, N, rows):
            z = logits[i:i + rows].float()                                          # [rows, V] fp32
            z = z.div(cap).tanh_().mul_(cap) if cap > 0 else z                      # softcap, in place
            lse[i:i + rows] = torch.logsumexp(z, dim=-1)
            loss[i:i + rows] = lse[i:i + rows] - z.gather(1, picked[i:i + rows]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.cap = cap
        return loss.masked_fill_(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        rows = max(1, _SoftcapCrossEntropy.CHUNK_ELEMENTS // V)
        weight = (grad * (targets >= 0)).float().unsqueeze(1)                     # [N, 1]: 0 at ignored targets
        picked = targets.clamp_min(0).unsqueeze(1)
        out = torch.empty_like(logits)
        for i in range(0, N, rows):  # two [rows, V] fp32 temporaries at a time (t and g), in-place ops
            raw = logits[i:i + rows].float()
            t = raw.div(ctx.cap).tanh_() if ctx.cap > 0 else None
            g = (t.mul(ctx.cap) if t is not None else raw.clone()).sub_(lse[i:i + rows, None]).exp_()  # softmax
            g.scatter_add_(1, picked[i:i + rows], torch.full_like(g[:, :1], -1.0))  # minus the one-hot target
            g.mul_(weight[i:i + rows])
            if t is not None:
                g.mul_(t.square_().neg_().add_(1))                                  # d softcap / d logits
            out[i:i + rows] = g
        return out, None, None


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean"):
    """F.cross_entropy(softcap(logits.float(), cap), targets, ignore_index=-1, reduction) for logits [B, T, V] and
    targets [B, T]: a scalar for 'mean'/'sum', [B, T] for 'none'. Eager runs use _SoftcapCrossEntropy (fp32 math,
    chunked, nothing [N, V] in fp32 kept for backward); under torch.compile the plain form, which inductor fuses."""
    B, T, V = logits.shape
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"loss_reduction must be mean, sum or none (got {reduction!r})")
    if torch.compiler.is_compiling():
        z = softcap(logits.float(), cap).view(-1, V)
        loss = F.cross_entropy(z, targets.reshape(-1), ignore_index=-1, reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss
    loss = _SoftcapCrossEntropy.apply(logits.reshape(-1, V), targets.reshape(-1), float(cap))    # [N] fp32
    if reduction == "none":
        return loss.view(B, T)
    total = loss.sum()
    return total if reduction == "sum" else total / (targets >= 0).sum()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, T, H, D]; cos/sin: [1, T, 1, D/2] (fp32 tables), applied in x's dtype: under bf16 autocast q and k stay
    # bf16 (fp32 tables would promote them, and the KV cache would hold fp32 keys)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
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
        self.ngpt = config.arch == "ngpt"
        if self.ngpt:  # s_qk per key head and dimension (the reference's [n_head, head_dim] when there is no GQA)
            self.s_qk = Scale(self.n_kv_head * self.head_dim, 1.0, config.n_embd ** -0.5)

    def forward(self, x, cos_sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scale = None  # SDPA's default 1/sqrt(D)
        if self.ngpt:  # s_qk * unit vectors after RoPE; the scores are cosines, so the softmax scale is sqrt(D)
            s_k = self.s_qk().view(self.n_kv_head, self.head_dim)                # [Hkv, D]
            s_q = s_k.repeat_interleave(self.n_head // self.n_kv_head, dim=0)   # query head h reads kv head h // g
            q, k, scale = s_q * unit(q), s_k * unit(k), self.head_dim ** 0.5
        else:
            q, k = norm(q), norm(k)  # QK-norm
        # attention in the projections' dtype (bf16 under autocast), whatever dtype a norm returns
        q, k = q.to(v.dtype), k.to(v.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)      # [B, H, T, D]
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)                   # [B, Hkv, T_past + T, D]
            mask = kv_cache.attn_mask(T)  # [B, 1, T, Tk] when batched prompts are left-padded (engine.py)
        Tk = k.size(2)
        enable_gqa = self.n_head != self.n_kv_head
        if mask is None and Tk == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa, scale=scale)
        elif mask is None and T == 1:  # decoding one token without padding: it sees every cached key, so no mask
            # (a boolean mask would rule out the flash kernel)
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=enable_gqa, scale=scale)
        else:
            if mask is None:  # decoding with a cache: query i sits at position Tk - T + i and sees keys up to there
                mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa, scale=scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.ngpt = config.arch == "ngpt"
        if self.ngpt:  # ReLU^2 kept (same matmuls as the baseline), so only the reference's s_u; there is no gate v
            self.s_u = Scale(4 * config.n_embd, 1.0, 1.0)
            self.u_gain = config.n_embd ** 0.5  # unit rows make c_fc(x) cosines of size ~1/sqrt(C): back to O(1)

    def forward(self, x):
        u = self.c_fc(x)  # [B, T, 4C]
        if self.ngpt:
            u = u * (self.s_u() * self.u_gain)
        return self.c_proj(F.relu(u).square())


def make_mhc(config: GPTConfig, sublayer_idx: int) -> DynamicMHC:
    return DynamicMHC(
        config.n_embd, num_streams=config.mhc_num_streams, sinkhorn_iters=config.mhc_sinkhorn_iters,
        sinkhorn_tau=config.mhc_sinkhorn_tau, layer_idx=sublayer_idx, constraint=config.mhc_constraint,
        ns_coeffs=config.mhc_ns_coeffs, dynamic=config.mhc_dynamic, alpha_init=config.mhc_alpha_init,
        res_init_diag=config.mhc_res_init_diag, gate_init=config.mhc_gate_init,
        gate_learnable=config.mhc_gate_learnable, gate_noise=config.mhc_gate_noise,
        gate_sample_frac=config.mhc_gate_sample_frac, prenorm=True)  # the block's pre-norm happens in the read-out


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.mhc_enabled = config.mhc_enabled
        self.ngpt = config.arch == "ngpt"
        if self.ngpt:  # eigen learning rates alpha_A, alpha_M: per dimension, or one each with scalar_alpha
            size = 1 if config.scalar_alpha else config.n_embd
            self.alpha_attn = Scale(size, config.ngpt_alpha_init, config.n_embd ** -0.5)
            self.alpha_mlp = Scale(size, config.ngpt_alpha_init, config.n_embd ** -0.5)
        if config.mhc_enabled:  # attention and MLP are two mHC sub-layers (2i, 2i + 1), as in the paper
            self.mhc_attn = make_mhc(config, 2 * layer_idx)
            self.mhc_mlp = make_mhc(config, 2 * layer_idx + 1)
        self.recompute = False  # run state: GPT.set_activation_checkpointing("full")

    def forward(self, x, cos_sin, kv_cache=None):
        if self.ngpt:  # x: [B, T, C], unit rows; move a step |alpha| towards the normalised branch output, renormalise
            x = unit(x + self.alpha_attn().abs() * (unit(self.attn(x, cos_sin, kv_cache)) - x))
            return unit(x + self.alpha_mlp().abs() * (unit(self.mlp(x)) - x))
        if self.recompute and kv_cache is None and torch.is_grad_enabled():
            # --activation-checkpointing full: each sub-layer keeps only its input x for backward
            x = checkpoint(self.attn_sublayer, x, cos_sin, None, use_reentrant=False)
            return checkpoint(self.mlp_sublayer, x, use_reentrant=False)
        return self.mlp_sublayer(self.attn_sublayer(x, cos_sin, kv_cache))

    def attn_sublayer(self, x, cos_sin, kv_cache=None):
        if self.mhc_enabled:  # x: [B, T, n*C]; the mHC read-out applies the branch's pre-norm
            return self.mhc_attn(x, lambda h: self.attn(h, cos_sin, kv_cache))
        return x + self.attn(norm(x), cos_sin, kv_cache)

    def mlp_sublayer(self, x):
        if self.mhc_enabled:
            return self.mhc_mlp(x, self.mlp)
        return x + self.mlp(norm(x))


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
        if config.arch == "ngpt":  # logits = s_z * cosines
            self.s_z = Scale(config.vocab_size, config.logit_scale, config.n_embd ** -0.5)
        if config.mhc_enabled and config.mhc_num_streams > 1:  # one stream needs no symmetry breaking
            self.stream_embed = nn.Parameter(torch.empty(config.mhc_num_streams, config.n_embd))
            if config.mhc_readout == "learned":  # read like the H_pre of a sub-layer 2L (the head)
                self.stream_readout = StreamReadout(config.n_embd, config.mhc_num_streams, 2 * config.n_layer,
                                                    alpha_init=config.mhc_alpha_init)
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
        """nanochat init: unit-normal embedding, tiny lm_head, uniform hidden matrices; output projections at
        `out_proj_init_scale` of that (nanochat uses exactly 0), so each block starts near the identity.
        ngpt: every matrix onto the sphere (see below), the scales at their reference values."""
        C = self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = 3 ** 0.5 * C ** -0.5  # uniform with std 1/sqrt(C)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.uniform_(lin.weight, -bound * self.config.out_proj_init_scale,
                                 bound * self.config.out_proj_init_scale)
            if block.mhc_enabled:
                block.mhc_attn.reset_parameters()
                block.mhc_mlp.reset_parameters()
        if hasattr(self, "stream_embed"):
            nn.init.normal_(self.stream_embed, std=self.config.mhc_stream_embed_std)
        if hasattr(self, "stream_readout"):
            self.stream_readout.reset_parameters()
        if self.config.arch == "ngpt":  # the reference: every matrix N(0, 1/C), then onto the sphere
            for w, _ in self.ngpt_matrices():
                nn.init.normal_(w, mean=0.0, std=C ** -0.5)
            for m in self.modules():
                if isinstance(m, Scale):
                    m.reset_parameters()
            self.project_weights()
        cos, sin = self._rotary_tables(self.cos.size(1), device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    # -- nGPT: the weights on the sphere ----------------------------------------------------------------------------
    def ngpt_matrices(self) -> list[tuple[nn.Parameter, int]]:
        """(weight, dim) of every matrix whose vectors along the d_model axis nGPT keeps at unit norm: the rows
        ([out, C], dim 1) of wte, lm_head, c_q/c_k/c_v and the MLP's c_fc; the columns ([C, in], dim 0) of the
        attention and MLP output projections."""
        if self.config.arch != "ngpt":
            return []
        out = [(self.transformer.wte.weight, 1), (self.lm_head.weight, 1)]
        for block in self.transformer.h:
            out += [(block.attn.c_q.weight, 1), (block.attn.c_k.weight, 1), (block.attn.c_v.weight, 1),
                    (block.mlp.c_fc.weight, 1), (block.attn.c_proj.weight, 0), (block.mlp.c_proj.weight, 0)]
        return out

    @torch.no_grad()
    def project_weights(self):
        """Renormalise nGPT's matrices onto the sphere (at init and after optimizer steps); a no-op for gpt."""
        for w, dim in self.ngpt_matrices():
            w.copy_(unit(w.float(), dim=dim).to(w.dtype))

    # -- accounting -----------------------------------------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward) of every matrix product, as torch's FLOP counter counts
        them (tests/test_gpt.py checks it exactly):
        - 6 per weight of a matrix product: the linear layers and mHC's projections phi (not the embedding lookup,
          the stream embedding, or mHC's biases and gains);
        - attention's score and value products, 12 * L * H * D * T (nanochat/PaLM: the full T x T);
        - mHC per sub-layer: the read-out and the mixing as one product [H_pre; H_res] @ x (2 (n + 1) n C
          forward); backward 2 n C to recompute the read-out for the folded pre-norm, 2 n C for H_pre's gradient,
          4 n^2 C for the mixing's two gradients and 2 n C each for H_post's and y's through the write-back: in
          all 6 n^2 C + 10 n C; plus the learned final read-out (2 n C forward, 2 n C backward)."""
        cfg = self.config
        matrices = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        matrices += [m.phi for m in self.modules() if isinstance(m, (DynamicMHC, StreamReadout)) and m.phi is not None]
        matmul_params = sum(p.numel() for p in matrices)
        head_dim = cfg.n_embd // cfg.n_head
        flops = 6 * matmul_params + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len
        if cfg.mhc_enabled:
            n, C = cfg.mhc_num_streams, cfg.n_embd
            flops += 2 * cfg.n_layer * (6 * n * n * C + 10 * n * C)
            if hasattr(self, "stream_readout"):
                flops += 4 * n * C
        return flops

    # -- forward --------------------------------------------------------------------------------------------------
    def hidden_states(self, idx, kv_cache=None) -> torch.Tensor:
        """idx: [B, T] -> the final normed (ngpt: unit) hidden state [B, T, C] (the LM head's input)."""
        B, T = idx.shape
        t0 = 0 if kv_cache is None else kv_cache.get_pos()
        if t0 + T > self.cos.size(1):
            raise ValueError(f"sequence of {t0 + T} tokens exceeds the rotary table ({self.cos.size(1)})")
        cos_sin = self.cos[:, t0:t0 + T].to(idx.device), self.sin[:, t0:t0 + T].to(idx.device)
        x = self.transformer.wte(idx)  # [B, T, C]
        # ngpt: the rows are unit at every projection; normalising here keeps h on the sphere between lazy ones
        x = unit(x) if self.config.arch == "ngpt" else norm(x)
        if self.config.mhc_enabled:  # replicate into n streams (+ stream embedding): [B, T, n*C]
            n = self.config.mhc_num_streams
            x = x.unsqueeze(-2).expand(B, T, n, x.size(-1))
            if hasattr(self, "stream_embed"):  # zero-mean over streams: it makes the replicated streams differ
                # without moving their mean; H_pre's and the read-out's stream preferences (0.73 vs 0.5) see the
                # differences from step 0, so the mHC model does not start as an exact copy of the baseline
                x = x + (self.stream_embed - self.stream_embed.mean(dim=0)).to(x.dtype)
            x = x.reshape(B, T, -1)
            if self.config.mhc_bf16_streams and torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))  # the streams' dtype from here to the read-out
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        if hasattr(self, "stream_readout"):  # collapse the streams before the final norm: learned weights ...
            x = self.stream_readout(x)
        elif self.config.mhc_enabled:  # ... or HC's plain sum
            x = x.view(B, T, self.config.mhc_num_streams, -1).sum(dim=-2)
        return x if self.config.arch == "ngpt" else norm(x)  # nGPT's h is unit already: no final norm

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx: [B, T] token ids. Returns logits [B, T, V] (fp32) when targets is None ([B, 1, V] with last_only:
        generation reads no other position), else the loss (a scalar for 'mean'/'sum', [B, T] for 'none').
        Targets of -1 are ignored. Softcap and loss are computed in fp32 (softcap_cross_entropy)."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None and last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)  # [B, T, V] in the compute dtype (bf16 under autocast)
        cap = self.config.logit_softcap
        if self.config.arch == "ngpt":  # bounded by |s_z| already: no softcap (logit_softcap is not used)
            logits, cap = self.s_z().float() * logits.float(), 0.0
        if targets is None:
            return softcap(logits.float(), cap)
        return softcap_cross_entropy(logits, targets, cap, loss_reduction)

    def set_activation_checkpointing(self, mode: str):
        """Run state (never in a checkpoint): "off"; "mhc" recomputes each mHC connection's coefficient math,
        read-out and mixing in backward (only the streams, H_post and the branch output stay saved); "full"
        recomputes every sub-layer (each keeps only its input). The numbers are unchanged (tested); the memory
        and time costs are in docs/performance.md."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise UserError(f"--activation-checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)} "
                            f"(got {mode!r})")
        if mode == "mhc" and not self.config.mhc_enabled:
            raise UserError("--activation-checkpointing mhc recomputes the mHC connections, and this model has no "
                            "mHC: use full (every sub-layer) or off")
        if mode != "off" and self.config.arch == "ngpt":
            raise UserError("--activation-checkpointing is not implemented for --arch ngpt: use off")
        for block in self.transformer.h:
            block.recompute = mode == "full"
            if block.mhc_enabled:
                block.mhc_attn.recompute = block.mhc_mlp.recompute = mode == "mhc"

    # -- mHC gates (the RL controller's knobs) and analysis -------------------------------------------------------
    def mhc_modules(self) -> list:
        """The 2L DynamicMHC modules in order: layer 0 attention, layer 0 MLP, layer 1 attention, ..."""
        if not self.config.mhc_enabled:
            raise UserError("this model has no mHC (mhc_enabled is false): there are no gates to set or read")
        return [m for block in self.transformer.h for m in (block.mhc_attn, block.mhc_mlp)]

    def mhc_parameters(self) -> list:
        """Every mHC parameter: the connections' phi, alpha, biases and gates, the stream embedding and the
        read-out (empty for the baseline). They train with AdamW at --mhc-lr (nanochat/optim.py)."""
        if not self.config.mhc_enabled:
            return []
        params = [p for m in self.mhc_modules() for p in m.parameters()]
        if hasattr(self, "stream_embed"):
            params.append(self.stream_embed)
        if hasattr(self, "stream_readout"):
            params += list(self.stream_readout.parameters())
        return params

    def set_mhc_gate(self, value):
        """Override every sub-layer's gate with one value in [0, 1], or with one value per example (shape [B]: a
        batch of rollouts, each with its own global gate). Numbers may be python, numpy or 0-d tensors."""
        g = gate_tensor(value, "gate")
        if g.dim() > 1:
            raise UserError(f"set_mhc_gate: expected one gate or one per example [B], got shape {tuple(g.shape)}")
        self._apply_gates(g.unsqueeze(-1).expand(*g.shape, 2 * self.config.n_layer), 1)

    def set_mhc_gates_per_layer(self, values):
        """values[i] in [0, 1] overrides both sub-layers of layer i: shape [L], or [B, L] for one vector per
        example."""
        self._apply_gates(self._gate_matrix(values, self.config.n_layer, "per layer"), 2)

    def set_mhc_gates_per_sublayer(self, values):
        """values[j] in [0, 1] overrides sub-layer j (attention, MLP, attention, ...): shape [2L], or [B, 2L]."""
        self._apply_gates(self._gate_matrix(values, 2 * self.config.n_layer, "per sub-layer"), 1)

    def set_mhc_gates_by_count(self, values, source: str = "gates"):
        """One flat gate vector whose length says what it sets: 1 value (every sub-layer), L (per layer) or 2L
        (per sub-layer). For a user's list of gates (base_eval --mhc-gates, analysis tools)."""
        values = [float(v) for v in values]
        L = self.config.n_layer
        self.mhc_modules()
        setters = {1: lambda v: self.set_mhc_gate(v[0]), L: self.set_mhc_gates_per_layer,
                   2 * L: self.set_mhc_gates_per_sublayer}
        if len(values) not in setters:
            raise UserError(f"{source}: {len(values)} gate values; this model takes 1 (global), {L} (per layer) or "
                            f"{2 * L} (per sub-layer)")
        setters[len(values)](values)

    def _gate_matrix(self, values, expected: int, what: str) -> torch.Tensor:
        self.mhc_modules()  # a model without mHC refuses before anything else
        g = gate_tensor(values, "gate")
        if g.dim() not in (1, 2) or g.size(-1) != expected:
            got = f"{g.size(-1)}" if g.dim() in (1, 2) else f"shape {tuple(g.shape)}"
            raise UserError(f"expected {expected} gate values {what}, got {got} (shape [{expected}] or "
                            f"[B, {expected}] for one vector per example)")
        return g

    def _apply_gates(self, gates: torch.Tensor, repeat: int):
        """gates: [k] or [B, k] checked values; sub-layer j takes column j // repeat."""
        for j, m in enumerate(self.mhc_modules()):
            m.gate_override = gates[..., j // repeat].contiguous().to(m.b_pre.device)

    def clear_mhc_gates(self):
        """Drop the overrides: every gate returns to its learned (or fixed) value."""
        for m in self.mhc_modules():
            m.clear_gate()

    def mhc_gate_tensor(self) -> torch.Tensor:
        """The effective gates: [2L], or [B, 2L] while per-example overrides are set."""
        gates = [m.gate().detach().float().cpu() for m in self.mhc_modules()]
        B = max((g.numel() for g in gates if g.dim() == 1), default=0)
        if B:
            return torch.stack([g.expand(B) for g in gates], dim=-1)
        return torch.stack(gates)

    def get_mhc_gates(self) -> list:
        """The effective gate of each of the 2L sub-layers (B such lists under per-example overrides)."""
        return self.mhc_gate_tensor().tolist()

    def capture_mhc(self, enabled: bool = True):
        """When on, every forward keeps each sub-layer's H_res/H_pre/H_post (detached) for analysis; off by
        default, and then it costs nothing."""
        for m in self.mhc_modules():
            m.capture = enabled
            m.captured = {}

    def captured_mhc(self) -> list[dict]:
        """The matrices of the last forward, one dict per sub-layer (see capture_mhc)."""
        return [m.captured for m in self.mhc_modules()]

    @torch.no_grad()
    def mhc_connection_stats(self, idx: torch.Tensor) -> list[dict]:
        """nanochat.mhc.connection_stats of every sub-layer over one forward of idx [B, T], in eval mode (no gate
        noise or sampling); the training mode and the capture setting are restored."""
        was_training = self.training
        self.eval()
        self.capture_mhc(True)
        try:
            self(idx)
            gates = self.get_mhc_gates()
            return [dict(sublayer=j, **connection_stats(c, gates[j])) for j, c in enumerate(self.captured_mhc())]
        finally:
            self.capture_mhc(False)
            self.train(was_training)
