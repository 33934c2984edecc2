"""GPT-3 (Brown et al., 2020) as its open replica GPT-Neo (transformers' gpt_neo): GPT-2's pre-norm blocks with
dense ("global") and locally banded ("local", a causal window of window_size keys) attention alternating
across layers, unscaled scores (scale=1.0), q/k/v without bias, tied LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ptm_kernels.nn import LayerNorm

from .decoder_blocks import CausalSelfAttention, DecoderBlock, DecoderLM, GeluMLP
from .hf_weights import export_to_hf, load_from_hf


@dataclass
class GPT3Config:
    vocab_size: int = 50257
    max_position_embeddings: int = 2048
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: Optional[int] = None  # 4 * hidden_size
    attention_layers: List[str] = field(default_factory=lambda: ["global", "local"] * 12)
    window_size: int = 256
    activation: str = "tanh"
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True


_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


class GPT3(DecoderLM):
    def __init__(self, config: GPT3Config):
        c = self.config = config
        if len(c.attention_layers) != c.num_layers:
            raise ValueError(f"attention_layers has {len(c.attention_layers)} entries for {c.num_layers} layers")
        d = c.hidden_size
        blocks = [DecoderBlock(
            CausalSelfAttention(d, c.num_heads, qkv_bias=False, scale=1.0, dropout=c.attention_dropout),
            GeluMLP(d, c.intermediate_size or 4 * d, c.activation),
            LayerNorm(d, c.layer_norm_epsilon), LayerNorm(d, c.layer_norm_epsilon),
            pre_norm=True, resid_dropout=c.resid_dropout) for _ in range(c.num_layers)]
        windows = [c.window_size if kind == "local" else None for kind in c.attention_layers]
        super().__init__(c.vocab_size, d, blocks, LayerNorm(d, c.layer_norm_epsilon),
                         max_positions=c.max_position_embeddings, embed_dropout=c.embed_dropout,
                         tie_embeddings=c.tie_word_embeddings, windows=windows)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_rows(self):
        rows = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False),
                ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False),
                ("lm_head.weight", "lm_head.weight", False)]
        for i in range(self.config.num_layers):
            a, b = f"blocks.{i}.", f"transformer.h.{i}."
            att = b + "attn.attention."
            rows += [(a + "norm1.weight", b + "ln_1.weight", False), (a + "norm1.bias", b + "ln_1.bias", False),
                     (a + "attn.qkv.weight", (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"),
                      False),
                     (a + "attn.out.weight", att + "out_proj.weight", False),
                     (a + "attn.out.bias", att + "out_proj.bias", False),
                     (a + "norm2.weight", b + "ln_2.weight", False), (a + "norm2.bias", b + "ln_2.bias", False),
                     (a + "mlp.fc.weight", b + "mlp.c_fc.weight", False),
                     (a + "mlp.fc_bias", b + "mlp.c_fc.bias", False),
                     (a + "mlp.proj.weight", b + "mlp.c_proj.weight", False),
                     (a + "mlp.proj.bias", b + "mlp.c_proj.bias", False)]
        return rows

    @classmethod
    def from_hf(cls, hf_model) -> "GPT3":
        h = hf_model.config
        config = GPT3Config(vocab_size=h.vocab_size, max_position_embeddings=h.max_position_embeddings,
                            hidden_size=h.hidden_size, num_layers=h.num_layers, num_heads=h.num_heads,
                            intermediate_size=h.intermediate_size, attention_layers=list(h.attention_layers),
                            window_size=h.window_size, activation=_GELU[h.activation_function],
                            resid_dropout=h.resid_dropout, embed_dropout=h.embed_dropout,
                            attention_dropout=h.attention_dropout, layer_norm_epsilon=h.layer_norm_epsilon,
                            tie_word_embeddings=h.tie_word_embeddings)
        model = cls(config)
        return load_from_hf(model, hf_model.state_dict(), model.hf_rows())

    def to_hf(self):
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        c = self.config
        # transformers takes the layer kinds run-length encoded: [[kinds], repeats]
        h = GPTNeoConfig(vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings,
                         hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
                         intermediate_size=c.intermediate_size,
                         attention_types=[[[kind], 1] for kind in c.attention_layers], window_size=c.window_size,
                         activation_function="gelu_new" if c.activation == "tanh" else "gelu",
                         resid_dropout=c.resid_dropout, embed_dropout=c.embed_dropout,
                         attention_dropout=c.attention_dropout, layer_norm_epsilon=c.layer_norm_epsilon,
                         tie_word_embeddings=c.tie_word_embeddings)
        return export_to_hf(self, GPTNeoForCausalLM(h), self.hf_rows())
