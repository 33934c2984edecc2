"""GPT-2 (Radford et al., 2019): pre-norm blocks, learned positions, tanh GELU (by default), tied LM head.

transformers' GPT2LMHeadModel stores its projections as Conv1D, weight [in, out]: from_hf / to_hf transpose.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ptm_kernels.nn import LayerNorm

from . import activations
from .convert import config_kwargs, prefixed
from .blocks import MLP, Attention, Block
from .decoder_blocks import DecoderLM
from .gpt import GPT_BLOCK_MAPPING  # transformers' GPT-2 blocks keep openai-gpt's names


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # 4 * n_embd
    activation_function: str = "gelu_new"  # transformers' name (models.activations): gelu_new is the tanh GELU
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf_config):
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if getattr(hf_config, flag, False):
                raise NotImplementedError(f"GPT-2 with config field {flag}=True")
        if not getattr(hf_config, "scale_attn_weights", True):
            raise NotImplementedError("GPT-2 with config field scale_attn_weights=False")
        activations.check(hf_config.activation_function, "activation_function")
        return cls(**config_kwargs(cls, hf_config))

    def to_hf(self):
        import transformers

        return transformers.GPT2Config(**dataclasses.asdict(self))


class GPT2(DecoderLM):
    config_class, hf_class = GPT2Config, "GPT2LMHeadModel"

    def __init__(self, config: GPT2Config):
        c = self.config = config
        blocks = [Block(
            Attention(c.n_embd, c.n_head, dropout=c.attn_pdrop),
            MLP(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation_function),
            LayerNorm(c.n_embd, c.layer_norm_epsilon), LayerNorm(c.n_embd, c.layer_norm_epsilon),
            pre_norm=True, resid_dropout=c.resid_pdrop) for _ in range(c.n_layer)]
        super().__init__(c.vocab_size, c.n_embd, blocks, LayerNorm(c.n_embd, c.layer_norm_epsilon),
                         max_positions=c.n_positions, embed_dropout=c.embd_pdrop,
                         tie_embeddings=c.tie_word_embeddings)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_mapping(self):
        m = [("wte.weight", "transformer.wte.weight"), ("wpe.weight", "transformer.wpe.weight"),
             ("norm.weight", "transformer.ln_f.weight"), ("norm.bias", "transformer.ln_f.bias"),
             ("lm_head.weight", "lm_head.weight")]
        for i in range(self.config.n_layer):
            m += prefixed(GPT_BLOCK_MAPPING, f"blocks.{i}.", f"transformer.h.{i}.")
        return m
