"""The GPT model, nanochat style.

- rotary position embeddings, no learned positions
- QK-norm (parameter-free RMSNorm on queries and keys)
- ReLU^2 MLP, no biases anywhere
- parameter-free RMSNorm: pre-norm in each block, after the token embedding and before the head
- untied token embedding and lm_head, logit softcap
- attention through scaled_dot_product_attention (flash kernel on GPU), grouped-query attention capable
- each sub-layer sits in a connection (nanochat/mhc.py): Dynamic mHC over n residual streams, or the plain
  residual x + branch(norm(x)) when mHC is disabled -- one block for both

Architecture variants are strategies (Architecture, below): each gives its block, the norms around the stack, the
head, its init, optimizers and an after-step hook, registered by its --arch name. "gpt" is this file's;
"ngpt" (the normalized Transformer) is nanochat/ngpt.py. A new variant is one module and a register_architecture
call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import UserError, from_flat_dict, to_flat_dict
from nanochat.mhc import (DynamicMHC, GateController, MHCConfig, StreamEnds, StreamReadout, connection_stats,
                          make_connection)


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
    # Dynamic mHC (nanochat/mhc.py): every setting in one nested MHCConfig; disabled = the plain residual baseline.
    # Serialised flat, as mhc_<setting> (to_dict/from_dict: checkpoints, config.json)
    mhc: MHCConfig = field(default_factory=MHCConfig)
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
        if self.arch not in ARCHITECTURES:
            raise UserError(f"arch must be one of {', '.join(ARCHITECTURES)} (got {self.arch!r})")
        if not self.logit_scale > 0 or not self.ngpt_alpha_init > 0:
            raise UserError(f"logit_scale and ngpt_alpha_init must be > 0 (got {self.logit_scale}, "
                            f"{self.ngpt_alpha_init})")
        ARCHITECTURES[self.arch].validate_model(self)
        if self.mhc.enabled:
            self.mhc.validate()

    def to_dict(self) -> dict:
        """Flat settings (mhc_<setting>): the form checkpoints and config.json hold."""
        return to_flat_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """From flat settings (a checkpoint's model_config; keys added since take their defaults) or nested ones."""
        return from_flat_dict(cls, d, "model config")


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

    def qk(self, q, k):
        """Queries and keys after RoPE -> (q, k, softmax scale): QK-norm, SDPA's default 1/sqrt(D) (None)."""
        return norm(q), norm(k), None

    def forward(self, x, cos_sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k, scale = self.qk(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))
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

    def up(self, x):
        return self.c_fc(x)  # [B, T, 4C]

    def forward(self, x):
        return self.c_proj(F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)
        # the connection around each sub-layer: mHC (sub-layers 2i, 2i + 1, as in the paper) or the plain residual
        self.mhc_attn = make_connection(config.n_embd, config.mhc, 2 * layer_idx)
        self.mhc_mlp = make_connection(config.n_embd, config.mhc, 2 * layer_idx + 1)
        self.recompute = False  # run state: GPT.set_activation_checkpointing("full")

    def forward(self, x, cos_sin, kv_cache=None):
        if self.recompute and kv_cache is None and torch.is_grad_enabled():
            # --activation-checkpointing full: each sub-layer keeps only its input x for backward
            x = checkpoint(self.attn_sublayer, x, cos_sin, None, use_reentrant=False)
            return checkpoint(self.mlp_sublayer, x, use_reentrant=False)
        return self.mlp_sublayer(self.attn_sublayer(x, cos_sin, kv_cache))

    def attn_sublayer(self, x, cos_sin, kv_cache=None):  # x: [B, T, C], or [B, T, n*C] with mHC
        return self.mhc_attn(x, lambda h: self.attn(h, cos_sin, kv_cache))  # the connection applies the pre-norm

    def mlp_sublayer(self, x):
        return self.mhc_mlp(x, self.mlp)


class Architecture:
    """An architecture variant (--arch NAME): what differs between variants, so GPT and the training loop call
    hooks instead of branching. This base is the baseline GPT ("gpt"); nanochat/ngpt.py is another."""
    name = "gpt"
    training_flags: tuple = ()  # TrainConfig fields only this variant reads: set under another --arch, an error

    def validate_model(self, config: GPTConfig):
        """Model-config combinations this variant cannot build (GPTConfig.validate)."""

    def validate_training(self, cfg):
        """Training-flag combinations this variant refuses (TrainConfig.validate)."""

    def block(self, config: GPTConfig, layer_idx: int) -> nn.Module:
        return Block(config, layer_idx)

    def build(self, model: GPT):
        """Add this variant's own modules to the model (nGPT: the logit scale)."""

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """After the token embedding."""
        return norm(x)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """Before the LM head."""
        return norm(x)

    def head(self, model: GPT, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The LM head's output -> (logits, softcap)."""
        return logits, model.config.logit_softcap

    def init_weights(self, model: GPT):
        """After the common init (GPT.init_weights)."""

    def project_weights(self, model: GPT):
        """Put the weights back where this variant keeps them (nGPT: the sphere); nothing for gpt."""

    def optimizers(self, model: GPT, cfg, ns: dict) -> list:
        """The optimizers of a training run, from its TrainConfig and the Newton-Schulz settings `ns`."""
        from nanochat.optim import setup_optimizers
        return setup_optimizers(model, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
                                matrix_lr=cfg.matrix_lr, scalar_lr=cfg.scalar_lr, mhc_lr=cfg.mhc_lr,
                                weight_decay=cfg.weight_decay, **ns)

    def after_step(self, model: GPT, step: int, cfg) -> dict:
        """After optimizer step `step` (0-based); returns extra metrics for the step's record."""
        return {}


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture):
    """Make arch.name a value of GPTConfig.arch (and --arch)."""
    ARCHITECTURES[arch.name] = arch


register_architecture(Architecture())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.architecture = ARCHITECTURES[config.arch]
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([self.architecture.block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.architecture.build(self)
        # mHC's stream ends (identity without mHC); the read-out is initialised like the H_pre of a sub-layer 2L
        self.stream_ends = StreamEnds(config.n_embd, config.mhc, 2 * config.n_layer, init=False)
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)
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
        `out_proj_init_scale` of that (nanochat uses exactly 0), so each block starts near the identity. Then the
        architecture's own (nGPT: every matrix onto the sphere)."""
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
            for conn in (getattr(block, "mhc_attn", None), getattr(block, "mhc_mlp", None)):
                if isinstance(conn, DynamicMHC):
                    conn.reset_parameters()
        self.stream_ends.reset_parameters()
        self.architecture.init_weights(self)
        cos, sin = self._rotary_tables(self.cos.size(1), device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    @torch.no_grad()
    def project_weights(self):
        """The architecture's weight projection (nGPT: onto the sphere, at init and after optimizer steps); a no-op
        for gpt."""
        self.architecture.project_weights(self)

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
        if cfg.mhc.enabled:
            n, C = cfg.mhc.num_streams, cfg.n_embd
            flops += 2 * cfg.n_layer * (6 * n * n * C + 10 * n * C)
            if self.stream_ends.readout is not None:
                flops += 4 * n * C
        return flops

    # -- forward --------------------------------------------------------------------------------------------------
    def hidden_states(self, idx, kv_cache=None) -> torch.Tensor:
        """idx: [B, T] -> the final normed (ngpt: unit) hidden state [B, T, C] (the LM head's input)."""
        B, T = idx.shape
        # the new tokens' positions: a slice, or a [T] tensor from a static cache (the compiled decode)
        positions = slice(0, T) if kv_cache is None else kv_cache.positions(T)
        if isinstance(positions, slice) and positions.stop > self.cos.size(1):
            raise ValueError(f"sequence of {positions.stop} tokens exceeds the rotary table ({self.cos.size(1)})")
        cos_sin = self.cos[:, positions], self.sin[:, positions]                 # [1, T, 1, D/2] each
        x = self.transformer.wte(idx)  # [B, T, C]
        x = self.architecture.embed(x)
        x = self.stream_ends.expand(x)  # mHC: [B, T, n*C], n streams (identity without mHC)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = self.stream_ends.reduce(x)  # [B, T, C]
        return self.architecture.final(x)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx: [B, T] token ids. Returns logits [B, T, V] (fp32) when targets is None ([B, 1, V] with last_only:
        generation reads no other position), else the loss (a scalar for 'mean'/'sum', [B, T] for 'none').
        Targets of -1 are ignored. Softcap and loss are computed in fp32 (softcap_cross_entropy)."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None and last_only:
            x = x[:, -1:]
        logits, cap = self.architecture.head(self, self.lm_head(x))  # [B, T, V], compute dtype (bf16 in autocast)
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
        if mode == "mhc" and not self.config.mhc.enabled:
            raise UserError("--activation-checkpointing mhc recomputes the mHC connections, and this model has no "
                            "mHC: use full (every sub-layer) or off")
        if mode != "off" and not all(isinstance(b, Block) for b in self.transformer.h):
            raise UserError(f"--activation-checkpointing is not implemented for --arch {self.config.arch}: use off")
        for block in self.transformer.h:
            block.recompute = mode == "full"
        if self.config.mhc.enabled:
            for conn in self.mhc_modules():
                conn.recompute = mode == "mhc"

    # -- mHC gates (the RL controller's knobs) and analysis -------------------------------------------------------
    def mhc_modules(self) -> list:
        """The 2L DynamicMHC modules in order: layer 0 attention, layer 0 MLP, layer 1 attention, ..."""
        if not self.config.mhc.enabled:
            raise UserError("this model has no mHC (mhc_enabled is false): there are no gates to set or read")
        return [m for block in self.transformer.h for m in (block.mhc_attn, block.mhc_mlp)]

    def mhc_parameters(self) -> list:
        """Every mHC parameter: the connections' phi, alpha, biases and gates, the stream embedding and the
        read-out (empty for the baseline). They train with AdamW at --mhc-lr (nanochat/optim.py)."""
        if not self.config.mhc.enabled:
            return []
        return [p for m in self.mhc_modules() for p in m.parameters()] + list(self.stream_ends.parameters())

    # the gate API (nanochat.mhc.GateController): the RL controller's knobs, run state never saved
    def mhc_gates(self) -> GateController:
        return GateController(self.mhc_modules(), self.config.n_layer)

    def set_mhc_gate(self, value):
        """Every sub-layer's gate: one value in [0, 1], or one per example (shape [B])."""
        self.mhc_gates().set_global(value)

    def set_mhc_gates_per_layer(self, values):
        """values[i] in [0, 1] overrides both sub-layers of layer i: shape [L], or [B, L]."""
        self.mhc_gates().set_per_layer(values)

    def set_mhc_gates_per_sublayer(self, values):
        """values[j] in [0, 1] overrides sub-layer j (attention, MLP, attention, ...): shape [2L], or [B, 2L]."""
        self.mhc_gates().set_per_sublayer(values)

    def set_mhc_gates_by_count(self, values, source: str = "gates"):
        """1 value (every sub-layer), L (per layer) or 2L (per sub-layer), told apart by the count."""
        self.mhc_gates().set_by_count(values, source)

    def clear_mhc_gates(self):
        """Drop the overrides: every gate returns to its learned (or fixed) value."""
        self.mhc_gates().clear()

    def mhc_gate_tensor(self) -> torch.Tensor:
        """The effective gates: [2L], or [B, 2L] while per-example overrides are set."""
        return self.mhc_gates().tensor()

    def get_mhc_gates(self) -> list:
        """The effective gate of each of the 2L sub-layers (B such lists under per-example overrides)."""
        return self.mhc_gate_tensor().tolist()

    def set_inference_sinkhorn_iters(self, k: int | None):
        """Run state (never in a checkpoint): k Sinkhorn iterations for H_res instead of the trained mhc_sinkhorn_iters
        when inferring (eval mode with grad disabled; training and backpropagation keep the exact count); None =
        exact, the default. k in [1, mhc_sinkhorn_iters], sinkhorn constraint only. What a k costs in logits and
        saves in time: benchmarks/sinkhorn_inference.py."""
        if not self.config.mhc.enabled:
            raise UserError("inference Sinkhorn iterations: this model has no mHC (mhc_enabled is false), so there "
                            "is no Sinkhorn to shorten")
        for conn in self.mhc_modules():
            conn.set_inference_sinkhorn_iters(k)

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


# checkpoints written before the stream ends became one module (commit 132bf44 and earlier) -> today's names
LEGACY_KEYS = (("stream_embed", "stream_ends.embed"), ("stream_readout.", "stream_ends.readout."))


def _rename_legacy_keys(module, state_dict, prefix, *args):
    for old, new in LEGACY_KEYS:
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


import nanochat.ngpt  # noqa: E402,F401 -- registers --arch ngpt (it builds on this module's classes)
