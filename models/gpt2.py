"""GPT-2 (Radford et al., 2019): pre-norm blocks, learned positions, tanh GELU, tied LM head.

transformers' GPT2LMHeadModel stores its projections as Conv1D, weight [in, out]: from_hf / to_hf transpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ptm_kernels.nn import LayerNorm

from .decoder_blocks import CausalSelfAttention, DecoderBlock, DecoderLM, GeluMLP
from .hf_weights import export_to_hf, load_from_hf


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # 4 * n_embd
    activation: str = "tanh"  # GELU approximation: "tanh" (gelu_new) or "none" (erf)
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True


_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


class GPT2(DecoderLM):
    def __init__(self, config: GPT2Config):
        c = self.config = config
        blocks = [DecoderBlock(
            CausalSelfAttention(c.n_embd, c.n_head, dropout=c.attn_pdrop),
            GeluMLP(c.n_embd, c.n_inner or 4 * c.n_embd, c.activation),
            LayerNorm(c.n_embd, c.layer_norm_epsilon), LayerNorm(c.n_embd, c.layer_norm_epsilon),
            pre_norm=True, resid_dropout=c.resid_pdrop) for _ in range(c.n_layer)]
        super().__init__(c.vocab_size, c.n_embd, blocks, LayerNorm(c.n_embd, c.layer_norm_epsilon),
                         max_positions=c.n_positions, embed_dropout=c.embd_pdrop,
                         tie_embeddings=c.tie_word_embeddings)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_rows(self):
        rows = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False),
                ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False),
                ("lm_head.weight", "lm_head.weight", False)]
        for i in range(self.config.n_layer):
            a, b = f"blocks.{i}.", f"transformer.h.{i}."
            rows += [(a + "norm1.weight", b + "ln_1.weight", False), (a + "norm1.bias", b + "ln_1.bias", False),
                     (a + "attn.qkv.weight", b + "attn.c_attn.weight", True),
                     (a + "attn.qkv.bias", b + "attn.c_attn.bias", False),
                     (a + "attn.out.weight", b + "attn.c_proj.weight", True),
                     (a + "attn.out.bias", b + "attn.c_proj.bias", False),
                     (a + "norm2.weight", b + "ln_2.weight", False), (a + "norm2.bias", b + "ln_2.bias", False),
                     (a + "mlp.fc.weight", b + "mlp.c_fc.weight", True),
                     (a + "mlp.fc_bias", b + "mlp.c_fc.bias", False),
                     (a + "mlp.proj.weight", b + "mlp.c_proj.weight", True),
                     (a + "mlp.proj.bias", b + "mlp.c_proj.bias", False)]
        return rows

    @classmethod
    def from_hf(cls, hf_model) -> "GPT2":
        h = hf_model.config
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(h, flag, False):
                raise NotImplementedError(f"GPT-2 with {flag}=True")
        if not getattr(h, "scale_attn_weights", True):
            raise NotImplementedError("GPT-2 with scale_attn_weights=False")
        config = GPT2Config(vocab_size=h.vocab_size, n_positions=h.n_positions, n_embd=h.n_embd, n_layer=h.n_layer,
                            n_head=h.n_head, n_inner=h.n_inner, activation=_GELU[h.activation_function],
                            resid_pdrop=h.resid_pdrop, embd_pdrop=h.embd_pdrop, attn_pdrop=h.attn_pdrop,
                            layer_norm_epsilon=h.layer_norm_epsilon, tie_word_embeddings=h.tie_word_embeddings)
        model = cls(config)
        return load_from_hf(model, hf_model.state_dict(), model.hf_rows())

    def to_hf(self):
        from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

        c = self.config
        h = HFConfig(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                     n_head=c.n_head, n_inner=c.n_inner,
                     activation_function="gelu_new" if c.activation == "tanh" else "gelu",
                     resid_pdrop=c.resid_pdrop, embd_pdrop=c.embd_pdrop, attn_pdrop=c.attn_pdrop,
                     layer_norm_epsilon=c.layer_norm_epsilon, tie_word_embeddings=c.tie_word_embeddings)
        return export_to_hf(self, GPT2LMHeadModel(h), self.hf_rows())
