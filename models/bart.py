"""BART (Lewis et al., 2019): a post-norm encoder-decoder with learned positions (offset by 2, as fairseq
stored them), a LayerNorm on the embeddings, GELU FFNs, a head tied to the shared embedding plus a
`final_logits_bias`.

    model = Bart.from_hf(hf_model)                       # BartForConditionalGeneration's weights
    out = model(src, attention_mask=src_mask, labels=tgt)
    ids = model.generate(src, 20, attention_mask=src_mask, num_beams=4, length_penalty=2.0)

`TransformerSeq2Seq` is the family's skeleton; Pegasus (pegasus.py: sinusoidal positions, pre-norm, final
norms) and MASS (mass.py) configure it differently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ptm_kernels.nn import LayerNorm, Linear

from . import activations
from .convert import refuse_unless
from .blocks import MLP, Attention, Block, run_blocks
from .seq2seq import DecoderInputs, EncoderDecoderLM


@dataclass
class BartConfig:
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    max_position_embeddings: int = 1024
    scale_embedding: bool = False  # multiply token embeddings by sqrt(d_model)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    eos_token_id: int = 2
    decoder_start_token_id: int = 2

    HF_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                 "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function", "dropout",
                 "attention_dropout", "activation_dropout", "max_position_embeddings", "scale_embedding",
                 "pad_token_id", "eos_token_id", "decoder_start_token_id")


def sinusoid_table(n_positions: int, dim: int) -> Tensor:
    """Pegasus' (and XLM's, not interleaved) sinusoids: sin in the first half of the features, cos in the second."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    half = dim // 2 + dim % 2
    out = torch.empty(n_positions, dim, dtype=torch.float64)
    out[:, :half] = torch.sin(angle[:, 0::2])
    out[:, half:] = torch.cos(angle[:, 1::2])
    return out.float()


class TransformerSeq2Seq(EncoderDecoderLM):
    """Token embeddings shared by encoder, decoder and head; positions learned (`position_offset` added to the
    index) or sinusoidal; optional embedding LayerNorm (BART) and final LayerNorms (Pegasus); pre- or
    post-norm layers with biased projections and a `final_logits_bias` buffer added to the logits."""

    pre_norm = False
    sinusoidal = False
    position_offset = 2
    embed_norm = True
    final_norm = False

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        d, eps = c.d_model, c.layer_norm_eps

        def norm():
            return LayerNorm(d, eps=eps)

        def mlp(dim):
            return MLP(d, dim, c.activation_function, dropout=c.activation_dropout)

        def attn(heads, cross=False):
            return Attention(d, heads, cross=cross, dropout=c.attention_dropout)

        self.shared = nn.Embedding(c.vocab_size, d, padding_idx=c.pad_token_id)
        self.embed_scale = math.sqrt(d) if c.scale_embedding else 1.0
        n_pos = c.max_position_embeddings + (0 if self.sinusoidal else self.position_offset)
        self.encoder_positions = self.decoder_positions = None  # learned positions, or the sinusoid buffer
        if self.sinusoidal:
            self.register_buffer("positions", sinusoid_table(n_pos, d), persistent=False)
        else:
            self.encoder_positions = nn.Embedding(n_pos, d)
            self.decoder_positions = nn.Embedding(n_pos, d)
        self.encoder_embed_norm, self.decoder_embed_norm = (norm(), norm()) if self.embed_norm else (None, None)
        self.drop = nn.Dropout(c.dropout)  # on the embeddings
        self.encoder_layers = nn.ModuleList(
            Block(attn(c.encoder_attention_heads), mlp(c.encoder_ffn_dim), norm(), norm(), self.pre_norm, c.dropout)
            for _ in range(c.encoder_layers))
        self.decoder_layers = nn.ModuleList(
            Block(attn(c.decoder_attention_heads), mlp(c.decoder_ffn_dim), norm(), norm(), self.pre_norm, c.dropout,
                  cross_attn=attn(c.decoder_attention_heads, cross=True), norm3=norm())
            for _ in range(c.decoder_layers))
        self.encoder_norm, self.decoder_norm = (norm(), norm()) if self.final_norm else (None, None)
        self.lm_head = Linear(d, c.vocab_size, bias=False)
        self.lm_head.weight = self.shared.weight
        self.register_buffer("final_logits_bias", torch.zeros(1, c.vocab_size))

    # ------------------------------------------------------------------------------------------ running

    def embed(self, input_ids: Tensor, position_ids: Tensor, positions: Optional[nn.Embedding],
              norm: Optional[nn.Module]) -> Tensor:
        """Scaled token embeddings + positions (learned: `positions`, offset; else the sinusoids), norm, dropout."""
        x = self.shared(input_ids) * self.embed_scale  # [B, L, d]
        if positions is None:
            x = x + self.positions[position_ids]
        else:
            x = x + positions(position_ids + self.position_offset)
        if norm is not None:
            x = norm(x)
        return self.drop(x)

    def run_encoder(self, input_ids: Tensor, mask) -> Tensor:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.embed(input_ids, position_ids, self.encoder_positions, self.encoder_embed_norm)
        return run_blocks(self.encoder_layers, x, mask, self.encoder_norm)

    def run_decoder(self, inputs: DecoderInputs) -> Tensor:
        x = self.embed(inputs.input_ids, inputs.position_ids, self.decoder_positions, self.decoder_embed_norm)
        return inputs.run(self.decoder_layers, x, final_norm=self.decoder_norm)

    def project(self, h: Tensor) -> Tensor:
        return self.lm_head(h) + self.final_logits_bias

    # ------------------------------------------------------------------------------ transformers weights

    hf_layer_norms = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")

    @classmethod
    def config_from_hf(cls, hf_model):
        h = hf_model.config
        if getattr(h, "add_final_layer_norm", False) or getattr(h, "normalize_before", False):
            raise NotImplementedError("mBART-style pre-norm configs (config fields add_final_layer_norm, "
                                      "normalize_before): use a model that sets pre_norm")
        activations.check(h.activation_function, "activation_function")
        # LayerDrop skips whole layers at random in training: not implemented here
        refuse_unless(h, h.model_type, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
        return cls.config_class(**{k: getattr(h, k) for k in cls.config_class.HF_FIELDS})

    def hf_config(self):
        import transformers

        c = self.config
        return getattr(transformers, self.hf_config_class)(
            **{k: getattr(c, k) for k in c.HF_FIELDS}, forced_eos_token_id=None)

    def hf_mapping(self) -> list:
        m = [("shared.weight", f"model.{k}.weight") for k in ("shared", "encoder.embed_tokens", "decoder.embed_tokens")]
        m += [("lm_head.weight", "lm_head.weight"), ("final_logits_bias", "final_logits_bias")]
        for side in ("encoder", "decoder"):
            if not self.sinusoidal:
                m.append((f"{side}_positions.weight", f"model.{side}.embed_positions.weight"))
            if self.embed_norm:
                m += [(f"{side}_embed_norm.{p}", f"model.{side}.layernorm_embedding.{p}") for p in ("weight", "bias")]
            if self.final_norm:
                m += [(f"{side}_norm.{p}", f"model.{side}.layer_norm.{p}") for p in ("weight", "bias")]

        def attn(ours, theirs, cross=False):
            out = []
            for p in ("weight", "bias"):
                if cross:
                    out += [(f"{ours}.q.{p}", f"{theirs}.q_proj.{p}"),
                            (f"{ours}.kv.{p}", (f"{theirs}.k_proj.{p}", f"{theirs}.v_proj.{p}"))]
                else:
                    out.append((f"{ours}.qkv.{p}", tuple(f"{theirs}.{x}_proj.{p}" for x in "qkv")))
                out.append((f"{ours}.out.{p}", f"{theirs}.out_proj.{p}"))
            return out

        for side, layers in (("encoder", self.encoder_layers), ("decoder", self.decoder_layers)):
            norms = (self.hf_layer_norms[0], self.hf_layer_norms[2]) if side == "encoder" else self.hf_layer_norms
            for i in range(len(layers)):
                a, b = f"{side}_layers.{i}", f"model.{side}.layers.{i}"
                m += attn(f"{a}.attn", f"{b}.self_attn")
                if side == "decoder":
                    m += attn(f"{a}.cross_attn", f"{b}.encoder_attn", cross=True)
                m += [(f"{a}.mlp.fc.weight", f"{b}.fc1.weight"), (f"{a}.mlp.fc_bias", f"{b}.fc1.bias")]
                for p in ("weight", "bias"):
                    m += [(f"{a}.mlp.proj.{p}", f"{b}.fc2.{p}")]
                    m += [(f"{a}.norm{j + 1}.{p}", f"{b}.{n}.{p}") for j, n in enumerate(norms)]
        return m


class Bart(TransformerSeq2Seq):
    """BartForConditionalGeneration."""

    config_class = BartConfig
    hf_class, hf_config_class = "BartForConditionalGeneration", "BartConfig"
