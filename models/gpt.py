"""GPT (Radford et al., 2018; transformers' openai-gpt): post-norm blocks, learned positions, tied LM head.

No final norm: each block ends with LayerNorm(x + MLP(x)). transformers stores the projections as Conv1D
(weight [in, out]), which from_hf / to_hf transpose. Its "gelu" is the tanh approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptm_kernels.nn import LayerNorm

from .decoder_blocks import CausalSelfAttention, DecoderBlock, DecoderLM, GeluMLP
from .hf_weights import export_to_hf, load_from_hf


@dataclass
class GPTConfig:
    vocab_size: int = 40478
    n_positions: int = 512
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    activation: str = "tanh"  # GELU approximation ("gelu" in transformers' openai-gpt is gelu_new = tanh)
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5


class GPT(DecoderLM):
    def __init__(self, config: GPTConfig):
        c = self.config = config
        blocks = [DecoderBlock(
            CausalSelfAttention(c.n_embd, c.n_head, dropout=c.attn_pdrop),
            GeluMLP(c.n_embd, 4 * c.n_embd, c.activation),
            LayerNorm(c.n_embd, c.layer_norm_epsilon), LayerNorm(c.n_embd, c.layer_norm_epsilon),
            pre_norm=False, resid_dropout=c.resid_pdrop) for _ in range(c.n_layer)]
        super().__init__(c.vocab_size, c.n_embd, blocks, None, max_positions=c.n_positions,
                         embed_dropout=c.embd_pdrop, tie_embeddings=True)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_rows(self):
        rows = [("wte.weight", "transformer.tokens_embed.weight", False),
                ("wpe.weight", "transformer.positions_embed.weight", False),
                ("lm_head.weight", "lm_head.weight", False)]
        for i in range(self.config.n_layer):
            a, b = f"blocks.{i}.", f"transformer.h.{i}."
            rows += [(a + "attn.qkv.weight", b + "attn.c_attn.weight", True),
                     (a + "attn.qkv.bias", b + "attn.c_attn.bias", False),
                     (a + "attn.out.weight", b + "attn.c_proj.weight", True),
                     (a + "attn.out.bias", b + "attn.c_proj.bias", False),
                     (a + "norm1.weight", b + "ln_1.weight", False), (a + "norm1.bias", b + "ln_1.bias", False),
                     (a + "mlp.fc.weight", b + "mlp.c_fc.weight", True),
                     (a + "mlp.fc_bias", b + "mlp.c_fc.bias", False),
                     (a + "mlp.proj.weight", b + "mlp.c_proj.weight", True),
                     (a + "mlp.proj.bias", b + "mlp.c_proj.bias", False),
                     (a + "norm2.weight", b + "ln_2.weight", False), (a + "norm2.bias", b + "ln_2.bias", False)]
        return rows

    @classmethod
    def from_hf(cls, hf_model) -> "GPT":
        h = hf_model.config
        if h.afn not in ("gelu", "gelu_new"):
            raise NotImplementedError(f"openai-gpt with afn={h.afn!r} (only gelu)")
        config = GPTConfig(vocab_size=h.vocab_size, n_positions=h.n_positions, n_embd=h.n_embd, n_layer=h.n_layer,
                           n_head=h.n_head, resid_pdrop=h.resid_pdrop, embd_pdrop=h.embd_pdrop,
                           attn_pdrop=h.attn_pdrop, layer_norm_epsilon=h.layer_norm_epsilon)
        model = cls(config)
        return load_from_hf(model, hf_model.state_dict(), model.hf_rows())

    def to_hf(self):
        from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

        c = self.config
        h = OpenAIGPTConfig(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer,
                            n_head=c.n_head, afn="gelu", resid_pdrop=c.resid_pdrop, embd_pdrop=c.embd_pdrop,
                            attn_pdrop=c.attn_pdrop, layer_norm_epsilon=c.layer_norm_epsilon)
        return export_to_hf(self, OpenAIGPTLMHeadModel(h), self.hf_rows())
