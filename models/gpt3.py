"""GPT-3 (Brown et al., 2020) as its open replica GPT-Neo (transformers' gpt_neo): GPT-2's pre-norm blocks with
dense ("global") and locally banded ("local", a causal window of window_size keys) attention alternating
across layers, unscaled scores (scale=1.0), q/k/v without bias, tied LM head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from ptm_kernels.nn import LayerNorm

from . import activations
from .convert import config_kwargs
from .blocks import MLP, Attention, Block
from .decoder_blocks import DecoderLM


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
    activation_function: str = "gelu_new"  # transformers' name (models.activations)
    resid_dropout: float = 0.0
    embed_dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf_config):
        activations.check(hf_config.activation_function, "activation_function")
        kw = config_kwargs(cls, hf_config)
        kw["attention_layers"] = list(hf_config.attention_layers)
        return cls(**kw)

    def to_hf(self):
        import transformers

        kw = dataclasses.asdict(self)
        # transformers takes the layer kinds run-length encoded: [[kinds], repeats]
        kw["attention_types"] = [[[kind], 1] for kind in kw.pop("attention_layers")]
        return transformers.GPTNeoConfig(**kw)


class GPT3(DecoderLM):
    config_class, hf_class = GPT3Config, "GPTNeoForCausalLM"

    def __init__(self, config: GPT3Config):
        c = self.config = config
        if len(c.attention_layers) != c.num_layers:
            raise ValueError(f"attention_layers has {len(c.attention_layers)} entries for {c.num_layers} layers")
        d = c.hidden_size
        blocks = [Block(
            Attention(d, c.num_heads, qkv_bias=False, scale=1.0, dropout=c.attention_dropout),
            MLP(d, c.intermediate_size or 4 * d, c.activation_function),
            LayerNorm(d, c.layer_norm_epsilon), LayerNorm(d, c.layer_norm_epsilon),
            pre_norm=True, resid_dropout=c.resid_dropout) for _ in range(c.num_layers)]
        windows = [c.window_size if kind == "local" else None for kind in c.attention_layers]
        super().__init__(c.vocab_size, d, blocks, LayerNorm(d, c.layer_norm_epsilon),
                         max_positions=c.max_position_embeddings, embed_dropout=c.embed_dropout,
                         tie_embeddings=c.tie_word_embeddings, windows=windows)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_mapping(self):
        m = [("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
             ("norm.weight", "transformer.ln_f.weight"), ("norm.bias", "transformer.ln_f.bias"),
             ("lm_head.weight", "lm_head.weight")]
        for i in range(self.config.num_layers):
            a, b = f"blocks.{i}.", f"transformer.h.{i}."
            att = b + "attn.attention."
            m += [(a + "norm1.weight", b + "ln_1.weight"), (a + "norm1.bias", b + "ln_1.bias"),
                  (a + "attn.qkv.weight", (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")),
                  (a + "attn.out.weight", att + "out_proj.weight"), (a + "attn.out.bias", att + "out_proj.bias"),
                  (a + "norm2.weight", b + "ln_2.weight"), (a + "norm2.bias", b + "ln_2.bias"),
                  (a + "mlp.fc.weight", b + "mlp.c_fc.weight"), (a + "mlp.fc_bias", b + "mlp.c_fc.bias"),
                  (a + "mlp.proj.weight", b + "mlp.c_proj.weight"), (a + "mlp.proj.bias", b + "mlp.c_proj.bias")]
        return m
