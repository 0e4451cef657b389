"""A nanochat-mHC model for Hugging Face transformers (trust_remote_code): nanochat's GPT with Dynamic
Manifold-Constrained Hyper-Connections (arXiv 2512.24880, Eq. 7-9) around every attention and MLP sub-layer.

Written beside the weights by `python -m scripts.export_hf`; depends on torch and transformers only. The attention,
MLP, norms and rotary embedding are transformers' own NanoChat modules (the baseline GPT of the same repo exports
to NanoChatForCausalLM directly); this file adds the n residual streams and their connections. Around each
sub-layer, with the streams x: [B, T, n, C]:

    logits = (x @ phi) / RMS(x) * alpha + b                     [n pre | n post | n*n res], one projection
    H_pre  = sigmoid(logits_pre)                                [n]     read-out of the streams
    H_post = 2 * sigmoid(logits_post)                           [n]     write-back to the streams
    H_res  = (1 - g) I + g SinkhornKnopp(logits_res / tau)      [n, n]  doubly stochastic mixing, gate g
    y      = branch(RMSNorm(sum_i H_pre[i] x[i]))
    x_next = H_res @ x + H_post[j] * y                          per stream j

The streams start as n copies of the normed token embedding plus a zero-mean stream embedding, and end in a
learned read-out (sum_i H_out[i] x[i], H_out = sigmoid((x @ phi) / RMS(x) * alpha + b)) or a plain sum. The
coefficient math, the read-out, the mixing and the streams stay in float32 whatever the model's dtype (as in
training); the branches run in the model's dtype. The gates come from the config (mhc_gates; see
configuration_nanochat_mhc.py). Generation uses transformers' KV cache through the NanoChat attention.
"""
import dataclasses
import inspect

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.nanochat.modeling_nanochat import (NanoChatAttention, NanoChatMLP, NanoChatRMSNorm,
                                                            NanoChatRotaryEmbedding)

from .configuration_nanochat_mhc import NanoChatMHCConfig

# transformers 5.25 renamed the KV cache argument and output field `past_key_values` to `cache` (the old name is
# deprecated): this file speaks whichever the installed version has, and takes either name from its caller
CACHE_ARG = "cache" if "cache" in inspect.signature(NanoChatAttention.forward).parameters else "past_key_values"
CACHE_FIELD = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
               else "past_key_values")

# Sinkhorn works on exp(logits - column max); float32's exp() underflows below about -87, so log-ratios are floored
# at -80 nats (entries that far below their column's maximum weigh e^-80, about 2e-35)
MIN_LOG_RATIO = -80.0


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / RMS over the last dim: [..., D] -> [..., 1]."""
    return torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def sinkhorn(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """[N, n, n] logits -> doubly stochastic [N, n, n]: Sinkhorn-Knopp in its scaling form, P = diag(r) K diag(c)
    with K = exp(logits), alternating the column step c = 1 / (K^T r) and the row step r = 1 / (K c)."""
    logits = logits - logits.amax(dim=-2, keepdim=True)        # a constant per column is absorbed by the first step
    K = logits.clamp_min(MIN_LOG_RATIO).exp()
    r = torch.ones_like(K[..., 0])                              # [N, n]
    c = r
    for _ in range(num_iters):
        c = (K * r[..., :, None]).sum(-2).reciprocal()          # columns
        r = (K * c[..., None, :]).sum(-1).reciprocal()          # rows
    return K * r[..., :, None] * c[..., None, :]


class MHCConnection(nn.Module):
    """One Dynamic mHC connection around a branch: forward(streams [B, T, n, C] fp32, branch, gate) -> the same."""

    def __init__(self, config: NanoChatMHCConfig):
        super().__init__()
        n, C = config.mhc_num_streams, config.hidden_size
        self.n, self.eps = n, config.rms_norm_eps
        self.num_iters, self.tau = config.mhc_sinkhorn_iters, config.mhc_sinkhorn_tau
        if config.mhc_dynamic:
            self.phi = nn.Parameter(torch.empty(n * C, n * n + 2 * n))
            self.alpha = nn.Parameter(torch.empty(3))            # alpha_pre, alpha_post, alpha_res
        else:
            self.phi = self.alpha = None
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        if config.mhc_gate_learnable:
            self.gate_logit = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("gate_fixed", torch.empty(()))

    def learned_gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit) if hasattr(self, "gate_logit") else self.gate_fixed

    def coefficients(self, flat: torch.Tensor, gate: torch.Tensor):
        """flat: [N, n*C] fp32 streams -> H_pre [N', n], H_post [N', n], H_res [N', n, n] (N' = N, or 1 static)."""
        n = self.n
        bias = torch.cat([self.b_pre, self.b_post, self.b_res.flatten()]).float()           # [n*n + 2n]
        if self.phi is not None:
            alpha = torch.repeat_interleave(self.alpha.float(), torch.tensor([n, n, n * n], device=flat.device))
            logits = bias + (flat @ self.phi.float()) * (rms_scale(flat, self.eps) * alpha)
        else:
            logits = bias[None]
        H_pre = torch.sigmoid(logits[:, :n])
        H_post = 2 * torch.sigmoid(logits[:, n:2 * n])
        H_res = sinkhorn(logits[:, 2 * n:].reshape(-1, n, n) / self.tau, self.num_iters)
        eye = torch.eye(n, device=flat.device, dtype=H_res.dtype)
        return H_pre, H_post, torch.lerp(eye, H_res, gate.float())

    def forward(self, streams: torch.Tensor, branch, gate: torch.Tensor, branch_dtype: torch.dtype):
        B, T, n, C = streams.shape
        xs = streams.reshape(B * T, n, C)
        H_pre, H_post, H_res = self.coefficients(xs.reshape(B * T, n * C), gate)
        read = torch.einsum("bi,bic->bc", H_pre.expand(B * T, n), xs)                       # [N, C]
        branch_in = (read * rms_scale(read, self.eps)).to(branch_dtype)                     # the branch's pre-norm
        y = branch(branch_in.view(B, T, C)).reshape(B * T, 1, C).float()                    # [N, 1, C]
        mixed = torch.matmul(H_res.expand(B * T, n, n), xs)                                 # H_res @ x, [N, n, C]
        return (mixed + H_post.expand(B * T, n)[..., None] * y).view(B, T, n, C)


class StreamReadout(nn.Module):
    """The n streams -> the head's input: sum_i H_out[i] x[i], H_out = sigmoid((x @ phi) / RMS(x) * alpha + b)."""

    def __init__(self, config: NanoChatMHCConfig):
        super().__init__()
        n, C = config.mhc_num_streams, config.hidden_size
        self.eps = config.rms_norm_eps
        self.phi = nn.Parameter(torch.empty(n * C, n))
        self.alpha = nn.Parameter(torch.empty(()))
        self.b = nn.Parameter(torch.empty(n))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        B, T, n, C = streams.shape
        flat = streams.reshape(B * T, n * C)
        H_out = torch.sigmoid(self.b.float() + (flat @ self.phi.float()) * (rms_scale(flat, self.eps) *
                                                                            self.alpha.float()))
        return torch.einsum("bi,bic->bc", H_out, streams.reshape(B * T, n, C)).view(B, T, C)


class NanoChatMHCDecoderLayer(nn.Module):
    def __init__(self, config: NanoChatMHCConfig, layer_idx: int):
        super().__init__()
        self.self_attn = NanoChatAttention(config=config, layer_idx=layer_idx)
        self.mlp = NanoChatMLP(config)
        self.attn_connection = MHCConnection(config)
        self.mlp_connection = MHCConnection(config)

    def forward(self, streams, gates, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        dtype = self.mlp.fc1.weight.dtype

        def attention(h):
            return self.self_attn(hidden_states=h, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, **{CACHE_ARG: cache}, **kwargs)[0]

        streams = self.attn_connection(streams, attention, gates[0], dtype)
        return self.mlp_connection(streams, self.mlp, gates[1], dtype)


class NanoChatMHCPreTrainedModel(PreTrainedModel):
    config_class = NanoChatMHCConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["NanoChatMHCDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        """A fresh model's connections start near the identity, as in training (transformers' init functions
        leave loaded weights alone)."""
        super()._init_weights(module)
        if isinstance(module, MHCConnection):
            if module.phi is not None:
                init.normal_(module.phi, std=module.phi.size(0) ** -0.5)
                init.constant_(module.alpha, 0.01)
            init.zeros_(module.b_pre)
            init.zeros_(module.b_post)
            init.copy_(module.b_res, torch.eye(module.n) * 2.0)
            if hasattr(module, "gate_logit"):
                init.constant_(module.gate_logit, -1.386)          # sigmoid = 0.2, the repo's initial gate
            else:
                init.constant_(module.gate_fixed, 0.2)
        elif isinstance(module, StreamReadout):
            init.normal_(module.phi, std=module.phi.size(0) ** -0.5)
            init.constant_(module.alpha, 0.01)
            init.zeros_(module.b)
        elif isinstance(module, NanoChatMHCModel) and module.stream_embed is not None:
            init.normal_(module.stream_embed)


class NanoChatMHCModel(NanoChatMHCPreTrainedModel):
    def __init__(self, config: NanoChatMHCConfig):
        super().__init__(config)
        n = config.mhc_num_streams
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([NanoChatMHCDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NanoChatRMSNorm(eps=config.rms_norm_eps)
        self.rotary_emb = NanoChatRotaryEmbedding(config=config)
        # one stream needs no embedding and has nothing to read out
        self.stream_embed = nn.Parameter(torch.empty(n, config.hidden_size)) if n > 1 else None
        self.readout = StreamReadout(config) if n > 1 and config.mhc_readout == "learned" else None
        self.post_init()

    def gates(self) -> list:
        """One gate per sub-layer (2L, a 0-d tensor each): config.mhc_gates, or the learned ones."""
        L, gates = self.config.num_hidden_layers, self.config.mhc_gates
        connections = [c for layer in self.layers for c in (layer.attn_connection, layer.mlp_connection)]
        if gates is None:
            return [c.learned_gate() for c in connections]
        self.config.check_gates(gates)
        values = [gates] * (2 * L) if isinstance(gates, (int, float)) else list(gates)
        if len(values) == 1:
            values = values * (2 * L)
        elif len(values) == L:
            values = [v for v in values for _ in range(2)]
        device = self.embed_tokens.weight.device
        return [torch.tensor(float(v), device=device) for v in values]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache=None, past_key_values: Cache | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values   # either name (CACHE_ARG)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        # the cache positionally: its keyword is past_key_values before transformers 5.25, cache from it
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)

        h = self.norm(inputs_embeds).float()                                                 # [B, T, C]
        n = self.config.mhc_num_streams
        streams = h[:, :, None, :].expand(-1, -1, n, -1)                                    # [B, T, n, C] fp32
        if self.stream_embed is not None:
            embed = self.stream_embed.float()
            streams = streams + (embed - embed.mean(dim=0))
        gates = self.gates()
        for i, layer in enumerate(self.layers):
            streams = layer(streams, gates[2 * i:2 * i + 2], attention_mask=causal_mask,
                            position_embeddings=position_embeddings, cache=cache, **kwargs)
        h = self.readout(streams) if self.readout is not None else streams.sum(dim=2)       # [B, T, C] fp32
        h = self.norm(h).to(inputs_embeds.dtype)
        return BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_FIELD: cache})


class NanoChatMHCForCausalLM(NanoChatMHCPreTrainedModel, GenerationMixin):
    def __init__(self, config: NanoChatMHCConfig):
        super().__init__(config)
        self.model = NanoChatMHCModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, **kwargs)
        h = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        cap = self.config.final_logit_softcapping
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})


__all__ = ["NanoChatMHCForCausalLM", "NanoChatMHCModel", "NanoChatMHCPreTrainedModel"]
