"""T5 (Raffel et al., 2019): pre-norm encoder-decoder with RMSNorm, unscaled attention and a bucketed relative
position bias; v1.0 (ReLU FFN, output scaled by d_model^-0.5 before the tied head) and v1.1 (gated GELU FFN).

    model = T5.from_hf(hf_model)                              # T5ForConditionalGeneration's weights
    out = model(src, attention_mask=src_mask, labels=tgt)       # logits, loss
    ids = model.generate(src, 20, attention_mask=src_mask, num_beams=4)

The relative position bias is computed once per stack as a Toeplitz table [H, Lq + Lk - 1]
(`t5_relative_table`: bidirectional buckets in the encoder, causal ones in the decoder) and shared by all its
layers through the mask; no [H, Lq, Lk] bias tensor is built, and its gradient reaches the bucket embedding
through the kernel's Toeplitz-bias gradient. Cross-attention has no position bias.

transformers >= 5 always ties T5's lm_head to the shared embedding and reads `tie_word_embeddings=False` in a
config as "do not scale the decoder output" (v1.1); here the two are separate config fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from ptm_kernels import AttentionMask
from ptm_kernels.attention_mask import t5_relative_table
from ptm_kernels.nn import Linear, RMSNorm

from . import activations
from .blocks import MLP, Attention, Block, run_blocks
from .seq2seq import DecoderInputs, EncoderDecoderLM


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None  # num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # v1.0; "gated-gelu" for v1.1
    tie_word_embeddings: bool = True  # lm_head shares the embedding
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model^-0.5 (v1.0)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act  # transformers' convention


class T5(EncoderDecoderLM):
    """T5ForConditionalGeneration."""

    hf_class = "T5ForConditionalGeneration"

    def __init__(self, config: T5Config):
        super().__init__()
        c = self.config = config
        H, D, p = c.num_heads, c.d_kv, c.dropout_rate

        def norm():
            return RMSNorm(c.d_model, eps=c.layer_norm_epsilon, cast="t5")

        def mlp():
            return MLP(c.d_model, c.d_ff, c.act, gated=c.gated, bias=False, dropout=p)

        def attn(cross=False):  # unscaled scores, no biases
            return Attention(c.d_model, H, head_dim=D, cross=cross, qkv_bias=False, out_bias=False, scale=1.0,
                             dropout=p)

        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder_bias = nn.Embedding(c.relative_attention_num_buckets, H)  # relative position buckets
        self.decoder_bias = nn.Embedding(c.relative_attention_num_buckets, H)
        self.encoder_layers = nn.ModuleList(
            Block(attn(), mlp(), norm(), norm(), pre_norm=True, resid_dropout=p) for _ in range(c.num_layers))
        self.decoder_layers = nn.ModuleList(
            Block(attn(), mlp(), norm(), norm(), pre_norm=True, resid_dropout=p, cross_attn=attn(cross=True),
                  norm3=norm())
            for _ in range(c.num_decoder_layers or c.num_layers))
        self.encoder_norm, self.decoder_norm = norm(), norm()
        self.drop = nn.Dropout(p)  # on the embeddings and the output of each stack
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    # ------------------------------------------------------------------------------------------ running

    def relative_table(self, weight: Tensor, Lq: int, Lk: int, bidirectional: bool) -> Tensor:
        """The bucketed relative position bias as a Toeplitz table [H, Lq + Lk - 1] (a mask part, no [Lq, Lk])."""
        c = self.config
        return t5_relative_table(weight, Lq, Lk, bidirectional=bidirectional,
                                 num_buckets=c.relative_attention_num_buckets,
                                 max_distance=c.relative_attention_max_distance)

    def run_encoder(self, input_ids: Tensor, mask: AttentionMask) -> Tensor:
        L = input_ids.shape[1]
        mask = mask & AttentionMask.toeplitz(self.relative_table(self.encoder_bias.weight, L, L, bidirectional=True))
        x = self.drop(self.shared(input_ids))  # [B, L, d]
        return self.drop(run_blocks(self.encoder_layers, x, mask, self.encoder_norm))

    def run_decoder(self, inputs: DecoderInputs) -> Tensor:
        mask = inputs.relative_self_mask(
            lambda Lq, Lk: self.relative_table(self.decoder_bias.weight, Lq, Lk, bidirectional=False))
        x = self.drop(self.shared(inputs.input_ids))  # [B, L, d]
        return self.drop(inputs.run(self.decoder_layers, x, mask, self.decoder_norm))

    def project(self, h: Tensor) -> Tensor:
        if self.config.scale_decoder_outputs:  # v1.0: the tied head sees the output scaled by d_model^-0.5
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    # ------------------------------------------------------------------------------ transformers weights

    @staticmethod
    def config_from_hf(hf_model) -> T5Config:
        h = hf_model.config
        activations.check(h.dense_act_fn, "feed_forward_proj")
        if h.is_gated_act != h.feed_forward_proj.startswith("gated-"):
            raise NotImplementedError(f"T5 with config field is_gated_act={h.is_gated_act} against "
                                      f"feed_forward_proj={h.feed_forward_proj!r}")
        config = T5Config(
            vocab_size=h.vocab_size, d_model=h.d_model, d_kv=h.d_kv, d_ff=h.d_ff, num_layers=h.num_layers,
            num_decoder_layers=h.num_decoder_layers, num_heads=h.num_heads,
            relative_attention_num_buckets=h.relative_attention_num_buckets,
            relative_attention_max_distance=h.relative_attention_max_distance, dropout_rate=h.dropout_rate,
            layer_norm_epsilon=h.layer_norm_epsilon, feed_forward_proj=h.feed_forward_proj,
            tie_word_embeddings=hf_model.lm_head.weight is hf_model.shared.weight,
            scale_decoder_outputs=getattr(h, "scale_decoder_outputs", h.tie_word_embeddings),
            pad_token_id=h.pad_token_id, eos_token_id=h.eos_token_id,
            decoder_start_token_id=getattr(h, "decoder_start_token_id", None) or h.pad_token_id)
        if config.act != h.dense_act_fn:  # what transformers' T5 runs is dense_act_fn
            raise NotImplementedError(f"T5 with config field dense_act_fn={h.dense_act_fn!r} against "
                                      f"feed_forward_proj={h.feed_forward_proj!r}")
        return config

    def hf_config(self):
        from transformers import T5Config as HFConfig

        c = self.config
        return HFConfig(vocab_size=c.vocab_size, d_model=c.d_model, d_kv=c.d_kv, d_ff=c.d_ff,
                        num_layers=c.num_layers, num_decoder_layers=c.num_decoder_layers, num_heads=c.num_heads,
                        relative_attention_num_buckets=c.relative_attention_num_buckets,
                        relative_attention_max_distance=c.relative_attention_max_distance,
                        dropout_rate=c.dropout_rate, layer_norm_epsilon=c.layer_norm_epsilon,
                        feed_forward_proj=c.feed_forward_proj, tie_word_embeddings=c.scale_decoder_outputs,
                        pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
                        decoder_start_token_id=c.decoder_start_token_id)

    def hf_mapping(self) -> list:
        c = self.config
        m = [("shared.weight", k) for k in ("shared.weight", "encoder.embed_tokens.weight",
                                             "decoder.embed_tokens.weight")]
        m += [("lm_head.weight", "lm_head.weight"),
              ("encoder_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              ("decoder_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              ("encoder_norm.weight", "encoder.final_layer_norm.weight"),
              ("decoder_norm.weight", "decoder.final_layer_norm.weight")]

        def attn(ours, theirs):
            return [(f"{ours}.qkv.weight", tuple(f"{theirs}.{x}.weight" for x in "qkv")),
                    (f"{ours}.out.weight", f"{theirs}.o.weight")]

        def ffn(ours, theirs):
            if c.gated:
                return [(f"{ours}.gate.weight", f"{theirs}.wi_0.weight"), (f"{ours}.fc.weight", f"{theirs}.wi_1.weight"),
                        (f"{ours}.proj.weight", f"{theirs}.wo.weight")]
            return [(f"{ours}.fc.weight", f"{theirs}.wi.weight"), (f"{ours}.proj.weight", f"{theirs}.wo.weight")]

        for i in range(len(self.encoder_layers)):
            a, b = f"encoder_layers.{i}", f"encoder.block.{i}.layer"
            m += attn(f"{a}.attn", f"{b}.0.SelfAttention") + ffn(f"{a}.mlp", f"{b}.1.DenseReluDense")
            m += [(f"{a}.norm1.weight", f"{b}.0.layer_norm.weight"), (f"{a}.norm2.weight", f"{b}.1.layer_norm.weight")]
        for i in range(len(self.decoder_layers)):
            a, b = f"decoder_layers.{i}", f"decoder.block.{i}.layer"
            m += attn(f"{a}.attn", f"{b}.0.SelfAttention") + ffn(f"{a}.mlp", f"{b}.2.DenseReluDense")
            m += [(f"{a}.cross_attn.q.weight", f"{b}.1.EncDecAttention.q.weight"),
                  (f"{a}.cross_attn.kv.weight", (f"{b}.1.EncDecAttention.k.weight", f"{b}.1.EncDecAttention.v.weight")),
                  (f"{a}.cross_attn.out.weight", f"{b}.1.EncDecAttention.o.weight")]
            m += [(f"{a}.norm{j + 1}.weight", f"{b}.{j}.layer_norm.weight") for j in range(3)]
        return m
