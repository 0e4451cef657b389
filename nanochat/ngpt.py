"""--arch ngpt: the normalized Transformer (nGPT, arXiv 2410.01131, after NVIDIA/ngpt), one architecture variant
(nanochat/gpt.py's Architecture, registered as "ngpt").

Embeddings, weight rows along the d_model axis and hidden states live on the unit sphere; each sub-layer moves the
hidden state a step |alpha| towards its normalised branch output and renormalises, h <- Norm(h + |alpha|
(Norm(block(h)) - h)); no RMSNorm, no final norm, no softcap; learned scales s_qk (queries and keys), s_u (MLP up)
and s_z (logits). The training loop renormalises the weights after optimizer steps (after_step: every
--lazy-proj-freq steps; the reference does it every step, the lazy variant is the user's own).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError
from nanochat.gpt import MLP, Architecture, CausalSelfAttention, register_architecture

NGPT_MHC_ERROR = ("arch ngpt cannot be combined with mHC (mhc_enabled): mHC mixes n residual streams with a doubly "
                  "stochastic H_res, and averages of unit vectors leave the sphere nGPT keeps its hidden states on; "
                  "renormalising every stream would change what H_res and nGPT's alpha mean (no published form)")
NGPT_ONLY_FLAGS = ("scalar_alpha", "ngpt_alpha_init", "logit_scale", "lazy_proj_freq", "ngpt_optimizer", "ngpt_lr")


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


class NGPTAttention(CausalSelfAttention):
    """s_qk (per key head and dimension: the reference's [n_head, head_dim] when there is no GQA) times unit
    queries and keys after RoPE; the scores are then cosines, so the softmax scale is sqrt(D)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.s_qk = Scale(self.n_kv_head * self.head_dim, 1.0, config.n_embd ** -0.5)

    def qk(self, q, k):
        s_k = self.s_qk().view(self.n_kv_head, self.head_dim)                # [Hkv, D]
        s_q = s_k.repeat_interleave(self.n_head // self.n_kv_head, dim=0)   # query head h reads kv head h // g
        return s_q * unit(q), s_k * unit(k), self.head_dim ** 0.5


class NGPTMLP(MLP):
    """ReLU^2 kept (the baseline's matmuls), so only the reference's s_u; there is no gate v."""

    def __init__(self, config):
        super().__init__(config)
        self.s_u = Scale(4 * config.n_embd, 1.0, 1.0)
        self.u_gain = config.n_embd ** 0.5  # unit rows make c_fc(x) cosines of size ~1/sqrt(C): back to O(1)

    def up(self, x):
        return self.c_fc(x) * (self.s_u() * self.u_gain)


class NGPTBlock(nn.Module):
    """x: [B, T, C], unit rows; each sub-layer moves a step |alpha| towards its normalised output, then renormalises.
    alpha_A, alpha_M (eigen learning rates): per dimension, or one each with scalar_alpha."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.attn = NGPTAttention(config, layer_idx)
        self.mlp = NGPTMLP(config)
        size = 1 if config.scalar_alpha else config.n_embd
        self.alpha_attn = Scale(size, config.ngpt_alpha_init, config.n_embd ** -0.5)
        self.alpha_mlp = Scale(size, config.ngpt_alpha_init, config.n_embd ** -0.5)

    def forward(self, x, cos_sin, kv_cache=None):
        x = unit(x + self.alpha_attn().abs() * (unit(self.attn(x, cos_sin, kv_cache)) - x))
        return unit(x + self.alpha_mlp().abs() * (unit(self.mlp(x)) - x))


class NGPT(Architecture):
    name = "ngpt"
    training_flags = NGPT_ONLY_FLAGS

    def validate_model(self, config):
        if config.mhc.enabled:
            raise UserError(NGPT_MHC_ERROR)

    def validate_training(self, cfg):
        if cfg.mhc.enabled:
            raise UserError("--arch ngpt with --mhc-enabled: mHC mixes n residual streams with a doubly stochastic "
                            "H_res, and averages of unit vectors leave the sphere nGPT keeps its hidden states on "
                            "(docs/design.md, nGPT). Drop --mhc-enabled")
        for name, why in (("weight_decay", "the weights live on the unit sphere, decay would only fight the "
                           "projection"), ("warmup_ratio", "as the reference, nGPT trains without LR warmup")):
            if getattr(cfg, name) != 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} with --arch ngpt: must be 0 "
                                f"({why})")
        unused = ["embedding_lr", "unembedding_lr", "scalar_lr"] + (["matrix_lr"] if cfg.ngpt_optimizer == "adamw"
                                                                     else [])
        changed = changed_flags(cfg, unused)
        if changed:  # these LRs belong to the gpt recipe; a silently ignored flag would mislead a sweep
            muon = "" if cfg.ngpt_optimizer == "muon" else ", or --ngpt-optimizer muon (then --matrix-lr is Muon's)"
            raise UserError(f"{changed} not used with --arch ngpt: set --ngpt-lr (the matrices; the vectors get 0.3x "
                            f"it){muon}")

    def block(self, config, layer_idx: int) -> nn.Module:
        return NGPTBlock(config, layer_idx)

    def build(self, model):
        model.s_z = Scale(model.config.vocab_size, model.config.logit_scale, model.config.n_embd ** -0.5)

    def embed(self, x):  # the rows are unit at every projection; normalising keeps h on the sphere between lazy ones
        return unit(x)

    def final(self, x):  # h is unit already: no final norm
        return x

    def head(self, model, logits):  # logits = s_z * cosines, bounded by |s_z|: no softcap (logit_softcap unused)
        return model.s_z().float() * logits.float(), 0.0

    @torch.no_grad()
    def init_weights(self, model):
        """The reference: every matrix N(0, 1/C), then onto the sphere; the scales at their reference values."""
        for w, _ in self.sphere_matrices(model):
            nn.init.normal_(w, mean=0.0, std=model.config.n_embd ** -0.5)
        for m in model.modules():
            if isinstance(m, Scale):
                m.reset_parameters()
        self.project_weights(model)

    def sphere_matrices(self, model) -> list:
        """(weight, dim) of every matrix whose vectors along the d_model axis nGPT keeps at unit norm: the rows
        ([out, C], dim 1) of wte, lm_head, c_q/c_k/c_v and the MLP's c_fc; the columns ([C, in], dim 0) of the
        attention and MLP output projections."""
        out = [(model.transformer.wte.weight, 1), (model.lm_head.weight, 1)]
        for block in model.transformer.h:
            out += [(block.attn.c_q.weight, 1), (block.attn.c_k.weight, 1), (block.attn.c_v.weight, 1),
                    (block.mlp.c_fc.weight, 1), (block.attn.c_proj.weight, 0), (block.mlp.c_proj.weight, 0)]
        return out

    @torch.no_grad()
    def project_weights(self, model):
        for w, dim in self.sphere_matrices(model):
            w.copy_(unit(w.float(), dim=dim).to(w.dtype))

    def optimizers(self, model, cfg, ns: dict) -> list:
        """No weight decay, no warmup (validate_training refuses them), its own LRs."""
        from nanochat.optim import setup_ngpt_optimizers
        return setup_ngpt_optimizers(model, lr=cfg.ngpt_lr, optimizer=cfg.ngpt_optimizer, matrix_lr=cfg.matrix_lr,
                                     **ns)

    def after_step(self, model, step: int, cfg) -> dict:
        """Back onto the sphere every lazy_proj_freq steps; reports the projections so far (the one at init
        included) after `step + 1` steps."""
        if (step + 1) % cfg.lazy_proj_freq == 0:
            self.project_weights(model)
        return {"projections": 1 + (step + 1) // cfg.lazy_proj_freq}


def changed_flags(cfg, names) -> str:
    """The flags among `names` set away from their defaults, as --flag text."""
    import dataclasses
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    return ", ".join("--" + n.replace("_", "-") for n in names if getattr(cfg, n) != defaults[n])


register_architecture(NGPT())
