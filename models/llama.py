"""LLaMA (Touvron et al., 2023): pre-norm RMSNorm blocks, rotary positions, grouped-query attention, SwiGLU
MLP, no biases, untied LM head (tie_word_embeddings if a config asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ptm_kernels.nn import GatedMLP, RMSNorm, RotaryEmbedding

from .decoder_blocks import CausalSelfAttention, DecoderBlock, DecoderLM
from .hf_weights import export_to_hf, load_from_hf


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # < num_attention_heads: grouped-query attention
    head_dim: Optional[int] = None  # hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False


class Llama(DecoderLM):
    def __init__(self, config: LlamaConfig):
        c = self.config = config
        d = c.hidden_size
        head_dim = c.head_dim or d // c.num_attention_heads
        rotary = RotaryEmbedding(head_dim, c.max_position_embeddings, c.rope_theta)  # shared by the layers
        blocks = [DecoderBlock(
            CausalSelfAttention(d, c.num_attention_heads, c.num_key_value_heads, head_dim, qkv_bias=False,
                                out_bias=False, dropout=c.attention_dropout, rotary=rotary),
            GatedMLP(d, c.intermediate_size, act="silu"),
            RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps), pre_norm=True)
            for _ in range(c.num_hidden_layers)]
        super().__init__(c.vocab_size, d, blocks, RMSNorm(d, c.rms_norm_eps), tie_embeddings=c.tie_word_embeddings)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_rows(self):
        rows = [("wte.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False),
                ("lm_head.weight", "lm_head.weight", False)]
        for i in range(self.config.num_hidden_layers):
            a, b = f"blocks.{i}.", f"model.layers.{i}."
            att = b + "self_attn."
            rows += [(a + "norm1.weight", b + "input_layernorm.weight", False),
                     (a + "attn.qkv.weight", (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"),
                      False),
                     (a + "attn.out.weight", att + "o_proj.weight", False),
                     (a + "norm2.weight", b + "post_attention_layernorm.weight", False)]
            rows += [(a + f"mlp.{p}.weight", b + f"mlp.{p}.weight", False)
                     for p in ("gate_proj", "up_proj", "down_proj")]
        return rows

    @classmethod
    def from_hf(cls, hf_model) -> "Llama":
        h = hf_model.config
        rope = getattr(h, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"LLaMA with rope_type={rope['rope_type']!r} (only the default rotary)")
        if getattr(h, "attention_bias", False) or getattr(h, "mlp_bias", False):
            raise NotImplementedError("LLaMA with attention or MLP biases")
        config = LlamaConfig(vocab_size=h.vocab_size, hidden_size=h.hidden_size, intermediate_size=h.intermediate_size,
                             num_hidden_layers=h.num_hidden_layers, num_attention_heads=h.num_attention_heads,
                             num_key_value_heads=h.num_key_value_heads, head_dim=getattr(h, "head_dim", None),
                             max_position_embeddings=h.max_position_embeddings,
                             rope_theta=rope.get("rope_theta", getattr(h, "rope_theta", 10000.0)),
                             rms_norm_eps=h.rms_norm_eps, attention_dropout=h.attention_dropout,
                             tie_word_embeddings=h.tie_word_embeddings)
        model = cls(config)
        return load_from_hf(model, hf_model.state_dict(), model.hf_rows())

    def to_hf(self):
        from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

        c = self.config
        h = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                     max_position_embeddings=c.max_position_embeddings,
                     rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                     rms_norm_eps=c.rms_norm_eps, attention_dropout=c.attention_dropout,
                     tie_word_embeddings=c.tie_word_embeddings)
        return export_to_hf(self, LlamaForCausalLM(h), self.hf_rows())
