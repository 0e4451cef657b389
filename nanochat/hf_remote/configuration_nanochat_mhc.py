"""Configuration of a nanochat-mHC model for Hugging Face transformers (trust_remote_code).

Written beside the weights by `python -m scripts.export_hf`; depends on transformers only. Every field that is not
an mHC setting has the meaning of transformers' own NanoChatConfig (the baseline GPT of the same repo exports to that
class directly); the mhc_* fields are the Dynamic mHC settings of the checkpoint (arXiv 2512.24880).

mhc_gates chooses the gate g of every connection, H_res := (1 - g) I + g H_res:
- None: the learned gates stored in the weights (sigmoid(gate_logit), or the fixed gate_fixed);
- one number in [0, 1]: every sub-layer;
- a list of num_hidden_layers numbers: one per layer (its attention and MLP sub-layers);
- a list of 2 * num_hidden_layers numbers: one per sub-layer (layer 0 attention, layer 0 MLP, layer 1 attention...).
It is read at every forward, so `model.config.mhc_gates = [...]` (or `from_pretrained(dir, mhc_gates=0.5)`) changes
the gates of a loaded model.
"""
from transformers import PretrainedConfig


class NanoChatMHCConfig(PretrainedConfig):
    model_type = "nanochat_mhc"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=32768, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=6, num_key_value_heads=None, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1.1920928955078125e-07, final_logit_softcapping=15.0,
                 mhc_num_streams=4, mhc_sinkhorn_iters=20, mhc_sinkhorn_tau=1.0, mhc_dynamic=True,
                 mhc_readout="learned", mhc_gate_learnable=True, mhc_gates=None,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # what transformers' rotary helpers read (the plain RoPE of theta, rotate-half layout)
        self.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
        self.rms_norm_eps = rms_norm_eps  # float32's machine epsilon: F.rms_norm's default, which nanochat trains with
        self.final_logit_softcapping = final_logit_softcapping
        self.hidden_act = "relu2"
        self.attention_bias = False
        self.attention_dropout = 0.0
        self.mhc_num_streams = mhc_num_streams
        self.mhc_sinkhorn_iters = mhc_sinkhorn_iters
        self.mhc_sinkhorn_tau = mhc_sinkhorn_tau
        self.mhc_dynamic = mhc_dynamic
        self.mhc_readout = mhc_readout
        self.mhc_gate_learnable = mhc_gate_learnable
        self.mhc_gates = mhc_gates
        self.use_cache = use_cache
        kwargs.pop("tie_word_embeddings", None)  # never tied: the LM head has its own weights
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False, **kwargs)
        self.check_gates(self.mhc_gates)

    def check_gates(self, gates):
        """None, one number, num_hidden_layers numbers or 2 * num_hidden_layers numbers, each in [0, 1]."""
        if gates is None:
            return
        values = [gates] if isinstance(gates, (int, float)) and not isinstance(gates, bool) else gates
        L = self.num_hidden_layers
        ok = isinstance(values, (list, tuple)) and len(values) in (1, L, 2 * L) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values)
        if not ok:
            raise ValueError(f"mhc_gates must be null (the learned gates), one number in [0, 1], {L} numbers (per "
                             f"layer) or {2 * L} (per sub-layer); got {gates!r}")


__all__ = ["NanoChatMHCConfig"]
