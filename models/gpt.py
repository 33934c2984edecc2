"""GPT (Radford et al., 2018; transformers' openai-gpt): post-norm blocks, learned positions, tied LM head.

No final norm: each block ends with LayerNorm(x + MLP(x)). transformers stores the projections as Conv1D
(weight [in, out]), which from_hf / to_hf transpose. Its "gelu" is the tanh approximation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ptm_kernels.nn import LayerNorm

from .convert import config_kwargs, prefixed
from .blocks import MLP, Attention, Block
from .decoder_blocks import DecoderLM

# openai-gpt's afn names -> models.activations' (transformers' ACT2FN) names
OPENAI_GPT_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass
class GPTConfig:
    vocab_size: int = 40478
    n_positions: int = 512
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    afn: str = "gelu"  # openai-gpt's own names: its "gelu" is gelu_new (the tanh GELU); also relu, silu, swish
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_hf(cls, hf_config):
        if hf_config.afn not in OPENAI_GPT_ACTIVATIONS:
            raise NotImplementedError(f"openai-gpt with config field afn={hf_config.afn!r} "
                                      f"(transformers knows {sorted(OPENAI_GPT_ACTIVATIONS)})")
        return cls(**config_kwargs(cls, hf_config))

    def to_hf(self):
        import transformers

        return transformers.OpenAIGPTConfig(**dataclasses.asdict(self))


# A DecoderBlock against a block of transformers' openai-gpt, whose names GPT-2 keeps; the third item marks the
# Conv1D weights, which transformers stores [in, out]
GPT_BLOCK_MAPPING = [("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias"),
                     ("attn.out.weight", "attn.c_proj.weight", True), ("attn.out.bias", "attn.c_proj.bias"),
                     ("norm1.weight", "ln_1.weight"), ("norm1.bias", "ln_1.bias"),
                     ("mlp.fc.weight", "mlp.c_fc.weight", True), ("mlp.fc_bias", "mlp.c_fc.bias"),
                     ("mlp.proj.weight", "mlp.c_proj.weight", True), ("mlp.proj.bias", "mlp.c_proj.bias"),
                     ("norm2.weight", "ln_2.weight"), ("norm2.bias", "ln_2.bias")]


class GPT(DecoderLM):
    config_class, hf_class = GPTConfig, "OpenAIGPTLMHeadModel"

    def __init__(self, config: GPTConfig):
        c = self.config = config
        blocks = [Block(
            Attention(c.n_embd, c.n_head, dropout=c.attn_pdrop),
            MLP(c.n_embd, 4 * c.n_embd, OPENAI_GPT_ACTIVATIONS[c.afn]),
            LayerNorm(c.n_embd, c.layer_norm_epsilon), LayerNorm(c.n_embd, c.layer_norm_epsilon),
            pre_norm=False, resid_dropout=c.resid_pdrop) for _ in range(c.n_layer)]
        super().__init__(c.vocab_size, c.n_embd, blocks, None, max_positions=c.n_positions,
                         embed_dropout=c.embd_pdrop, tie_embeddings=True)

    # ------------------------------------------------------------------------------ transformers weights

    def hf_mapping(self):
        m = [("wte.weight", "transformer.tokens_embed.weight"), ("wpe.weight", "transformer.positions_embed.weight"),
             ("lm_head.weight", "lm_head.weight")]
        for i in range(self.config.n_layer):
            m += prefixed(GPT_BLOCK_MAPPING, f"blocks.{i}.", f"transformer.h.{i}.")
        return m
