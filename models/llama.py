"""LLaMA (Touvron et al., 2023): pre-norm RMSNorm blocks, rotary positions, grouped-query attention, SwiGLU
MLP, no biases, untied LM head (tie_word_embeddings if a config asks for it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ptm_kernels.nn import GatedMLP, RMSNorm, RotaryEmbedding

from .convert import config_kwargs
from .decoder_blocks import CausalSelfAttention, DecoderBlock, DecoderLM


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

    @classmethod
    def from_hf(cls, hf_config):
        rope = getattr(hf_config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"LLaMA with rope_type={rope['rope_type']!r} (only the default rotary)")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise NotImplementedError("LLaMA with attention or MLP biases")
        kw = config_kwargs(cls, hf_config)
        kw["rope_theta"] = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return cls(**kw)

    def to_hf(self):
        import transformers

        kw = dataclasses.asdict(self)
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}
        return transformers.LlamaConfig(**kw)


class Llama(DecoderLM):
    config_class, hf_class = LlamaConfig, "LlamaForCausalLM"

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

    def hf_mapping(self):
        m = [("wte.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
        for i in range(self.config.num_hidden_layers):
            a, b = f"blocks.{i}.", f"model.layers.{i}."
            att = b + "self_attn."
            m += [(a + "norm1.weight", b + "input_layernorm.weight"),
                  (a + "attn.qkv.weight", (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")),
                  (a + "attn.out.weight", att + "o_proj.weight"),
                  (a + "norm2.weight", b + "post_attention_layernorm.weight")]
            m += [(a + f"mlp.{p}.weight", b + f"mlp.{p}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
        return m
