"""MobileBERT (Sun et al., 2020): a thin, deep BERT for phones, as transformers' `mobilebert`.

Each layer keeps the residual stream at H (512) but computes in a bottleneck of T (intra_bottleneck_size, 128):
- bottlenecks: `bottleneck_in` maps the H-wide input to T (the attention's residual); with
  key_query_shared_bottleneck a second projection H -> T feeds the queries and keys, while the values read the
  H-wide input; `bottleneck_out` maps back to H at the end of the layer (add & norm with the layer's input);
- stacked FFNs: num_feedforward_networks FFNs (T -> I -> T, add & norm) after the attention instead of one;
- NoNorm: `x * weight + bias` per feature in place of LayerNorm (normalization_type="no_norm");
- embeddings: word vectors of size E (128); with trigram_input the vectors of the next, current and previous
  tokens are concatenated (3E) and projected to H.
The MLM head scores against [word embeddings E | an extra H - E block] (both V x ...), so the tied decoder
still covers the full hidden size.

    model = MobileBertForMaskedLM.from_hf(hf_model)
    out = model(input_ids, attention_mask=mask, unpad=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from .bert import BertConfig, PooledTwin
from .blocks import MLP, Attention
from .convert import prefixed
from .encoder import Encoder, EncoderInputs, InputRules
from .heads import (MLMHead, MaskedLM, NextSentencePrediction, PreTraining, QuestionAnswering, SequenceClassification,
                    TokenClassification, init_weights)

_TORCH_LN_EPS = 1e-5  # two of transformers' norms are built without the config's eps


@dataclass
class MobileBertConfig(BertConfig):
    hidden_size: int = 512
    num_hidden_layers: int = 24
    num_attention_heads: int = 4
    intermediate_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.0
    embedding_size: int = 128
    trigram_input: bool = True
    use_bottleneck: bool = True
    intra_bottleneck_size: int = 128
    use_bottleneck_attention: bool = False
    key_query_shared_bottleneck: bool = True
    num_feedforward_networks: int = 4
    normalization_type: str = "no_norm"
    classifier_activation: bool = True

    hf_config_class = "MobileBertConfig"

    @property
    def true_hidden_size(self) -> int:
        return self.intra_bottleneck_size if self.use_bottleneck else self.hidden_size


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm: an elementwise affine x * weight + bias, no statistics. Called
    like ptm_kernels' LayerNorm: with `residual`, returns (norm(x + residual), x + residual)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if residual is None:
            return torch.addcmul(self.bias, x, self.weight)
        s = x + residual
        return torch.addcmul(self.bias, s, self.weight), s


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "no_norm":
        return NoNorm(dim)
    if kind == "layer_norm":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown normalization_type {kind!r}")


# ------------------------------------------------------------------------------------------- embeddings


def trigram_neighbours(input_ids: Tensor) -> Tensor:
    """[B, L, 2]: the next and the previous token id of each position, -1 past either end of the row. Computed
    on the padded batch, so that packing (unpad=True) keeps each token's neighbours as they were."""
    nxt = F.pad(input_ids[:, 1:], (0, 1), value=-1)
    prev = F.pad(input_ids[:, :-1], (1, 0), value=-1)
    return torch.stack([nxt, prev], -1)


def trigram_inputs(input_ids: Tensor) -> dict:
    return dict(neighbour_ids=trigram_neighbours(input_ids))


class MobileBertEmbeddings(nn.Module):
    """word (E) [+ next and previous words: trigram] -> project to H, + position + token type, norm, dropout."""

    def __init__(self, c: MobileBertConfig):
        super().__init__()
        self.word = nn.Embedding(c.vocab_size, c.embedding_size, padding_idx=c.pad_token_id)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.trigram = c.trigram_input
        self.project = nn.Linear(c.embedding_size * (3 if c.trigram_input else 1), c.hidden_size)
        self.use_project = c.trigram_input or c.embedding_size != c.hidden_size
        self.project.requires_grad_(self.use_project)  # else unused, as in transformers; kept for the round trip
        self.norm = make_norm(c.normalization_type, c.hidden_size, _TORCH_LN_EPS)
        self.dropout = c.hidden_dropout_prob

    def _word_or_zero(self, ids: Tensor) -> Tensor:
        return self.word(ids.clamp_min(0)) * ids.ge(0).unsqueeze(-1).to(self.word.weight.dtype)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                neighbour_ids: Optional[Tensor] = None) -> Tensor:
        x = self.word(input_ids)
        if self.trigram:
            nxt, prev = neighbour_ids.unbind(-1)
            x = torch.cat([self._word_or_zero(nxt), x, self._word_or_zero(prev)], -1)
        if self.use_project:
            x = self.project(x)
        types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        x = x + self.position(position_ids) + self.token_type(types)
        return F.dropout(self.norm(x), self.dropout, self.training)


# ------------------------------------------------------------------------------------------------ layer


class FFN(nn.Module):
    """blocks.MLP (fc -> act, its bias fused -> proj), dropout, add & norm with the input."""

    def __init__(self, dim: int, inner: int, act: str, norm: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(dim, inner, act)
        self.norm = norm
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.dropout(self.mlp(x), self.dropout, self.training), residual=x)[0]


class MobileBertLayer(nn.Module):
    def __init__(self, c: MobileBertConfig):
        super().__init__()
        H, T, I = c.hidden_size, c.true_hidden_size, c.intermediate_size
        self.use_bottleneck = c.use_bottleneck
        self.bottleneck_attention = c.use_bottleneck and c.use_bottleneck_attention  # q, k, v all from `inner`
        self.shared_qk = c.use_bottleneck and c.key_query_shared_bottleneck and not self.bottleneck_attention
        self.dropout = c.hidden_dropout_prob

        def norm(dim, eps=c.layer_norm_eps):
            return make_norm(c.normalization_type, dim, eps)

        if c.use_bottleneck:
            self.bottleneck_in = nn.Linear(H, T)
            self.bottleneck_in_norm = norm(T)
            if c.key_query_shared_bottleneck:
                self.bottleneck_qk = nn.Linear(H, T)
                self.bottleneck_qk_norm = norm(T)
        # queries and keys always read the same input (projection `qk`), the values their own (`v`)
        self.attn = Attention(T, c.num_attention_heads, kv_size=T if self.bottleneck_attention else H,
                              layout=("qk", "v"), dropout=c.attention_probs_dropout_prob)
        self.attn_norm = norm(T)
        self.ffns = nn.ModuleList(FFN(T, I, c.hidden_act, norm(T)) for _ in range(c.num_feedforward_networks - 1))
        self.ffn = FFN(T, I, c.hidden_act, norm(T, _TORCH_LN_EPS), 0.0 if c.use_bottleneck else c.hidden_dropout_prob)
        if c.use_bottleneck:
            self.bottleneck_out = nn.Linear(T, H)
            self.bottleneck_out_norm = norm(H)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        if self.use_bottleneck:
            inner = self.bottleneck_in_norm(self.bottleneck_in(x))  # the T-wide residual of the attention
        else:
            inner = x
        if self.bottleneck_attention:
            qk_in, v_in = inner, inner
        elif self.shared_qk:
            qk_in, v_in = self.bottleneck_qk_norm(self.bottleneck_qk(x)), x
        else:
            qk_in, v_in = x, x
        a = self.attn(qk_in, mask, context=v_in)  # [B, L, T]
        if not self.use_bottleneck:
            a = F.dropout(a, self.dropout, self.training)
        h = self.attn_norm(a, residual=inner)[0]
        for ffn in self.ffns:
            h = ffn(h)
        h = self.ffn(h)
        if not self.use_bottleneck:
            return h
        out = F.dropout(self.bottleneck_out(h), self.dropout, self.training)
        return self.bottleneck_out_norm(out, residual=x)[0]


def layer_mapping(c: MobileBertConfig) -> list:
    """(our key, HF key) pairs of one layer (HF names relative to encoder.layer.<i>.)."""
    def lin(ours, hf):
        return [(f"{ours}.weight", f"{hf}.weight"), (f"{ours}.bias", f"{hf}.bias")]

    a = "attention.self."
    m = [("attn.qk.weight", (a + "query.weight", a + "key.weight")),
         ("attn.qk.bias", (a + "query.bias", a + "key.bias"))]
    m += lin("attn.v", a + "value") + lin("attn.out", "attention.output.dense")
    m += lin("attn_norm", "attention.output.LayerNorm")
    def ffn(ours, hf, out):  # an FFN: its MLP's fc (bias kept apart) and proj, and the norm
        return ([(f"{ours}.mlp.fc.weight", f"{hf}intermediate.dense.weight"),
                 (f"{ours}.mlp.fc_bias", f"{hf}intermediate.dense.bias")]
                + lin(f"{ours}.mlp.proj", f"{out}.dense") + lin(f"{ours}.norm", f"{out}.LayerNorm"))

    for j in range(c.num_feedforward_networks - 1):
        m += ffn(f"ffns.{j}", f"ffn.{j}.", f"ffn.{j}.output")
    m += ffn("ffn", "", "output")
    if c.use_bottleneck:
        m += lin("bottleneck_in", "bottleneck.input.dense") + lin("bottleneck_in_norm", "bottleneck.input.LayerNorm")
        m += lin("bottleneck_out", "output.bottleneck.dense")
        m += lin("bottleneck_out_norm", "output.bottleneck.LayerNorm")
        if c.key_query_shared_bottleneck:
            m += lin("bottleneck_qk", "bottleneck.attention.dense")
            m += lin("bottleneck_qk_norm", "bottleneck.attention.LayerNorm")
    return m


# ------------------------------------------------------------------------------------------------ model


class MobileBertModel(PooledTwin, Encoder):
    """The pooler is dense + tanh on the first token with classifier_activation, else the first token as is."""
    hf_class, config_class = "MobileBertModel", MobileBertConfig

    def __init__(self, config: MobileBertConfig, add_pooling_layer: bool = True):
        super().__init__()
        c = self.config = config
        # the trigram input reads each token's neighbours in the padded batch (so packing keeps them)
        self.rules = InputRules(per_token=trigram_inputs) if c.trigram_input else InputRules()
        self.embeddings = MobileBertEmbeddings(c)
        self.layers = nn.ModuleList(MobileBertLayer(c) for _ in range(c.num_hidden_layers))
        self.pooler = None
        if add_pooling_layer:  # without classifier_activation a parameter-free pooler: the first token as is
            self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if c.classifier_activation else nn.Identity()
        init_weights(self)

    def run(self, x: EncoderInputs) -> Tensor:
        h = self.embeddings(x.input_ids, x.position_ids, x.token_type_ids, x.extra.get("neighbour_ids"))  # [B, L, H]
        for lyr in self.layers:
            h = lyr(h, x.mask)
        return h

    def pool(self, h: Tensor) -> Tensor:
        return torch.tanh(self.pooler(h[:, 0])) if self.config.classifier_activation else h[:, 0]

    def hf_mapping(self) -> list:
        e = "embeddings."
        m = [(e + "word.weight", e + "word_embeddings.weight"),
             (e + "position.weight", e + "position_embeddings.weight"),
             (e + "token_type.weight", e + "token_type_embeddings.weight"),
             (e + "project.weight", e + "embedding_transformation.weight"),
             (e + "project.bias", e + "embedding_transformation.bias"),
             (e + "norm.weight", e + "LayerNorm.weight"), (e + "norm.bias", e + "LayerNorm.bias")]
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(self.config), f"layers.{i}.", f"encoder.layer.{i}.")
        if isinstance(self.pooler, nn.Linear):
            m += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
        return m


# ------------------------------------------------------------------------------------------------ tasks


def mlm_head(c: MobileBertConfig) -> MLMHead:
    """BERT's transform, then scores against [word embeddings (V x E) | extra columns (V x (H - E))]."""
    return MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps,
                   extra_columns=c.hidden_size - c.embedding_size)


MobileBertMLMHead = mlm_head  # the old name


class MobileBertForPreTraining(PreTraining):
    """MLM + NSP (MobileBERT is distilled from IB-BERT layer by layer, then pre-trained with these)."""
    hf_class, config_class, hf_base = "MobileBertForPreTraining", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config), mlm_head(config))

    def hf_mapping(self):
        return super().hf_mapping() + [("mlm.dense", "cls.predictions.dense.weight")]


class MobileBertForMaskedLM(MaskedLM):
    hf_class, config_class, hf_base = "MobileBertForMaskedLM", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config, add_pooling_layer=False), mlm_head(config))

    def hf_mapping(self):
        return super().hf_mapping() + [("mlm.dense", "cls.predictions.dense.weight")]


class MobileBertForNextSentencePrediction(NextSentencePrediction):
    hf_class, config_class, hf_base = "MobileBertForNextSentencePrediction", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config))


class MobileBertForSequenceClassification(SequenceClassification):
    hf_class, config_class, hf_base = "MobileBertForSequenceClassification", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config))


class MobileBertForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "MobileBertForTokenClassification", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config, add_pooling_layer=False))


class MobileBertForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "MobileBertForQuestionAnswering", MobileBertConfig, "mobilebert"

    def __init__(self, config: MobileBertConfig):
        super().__init__(config, MobileBertModel(config, add_pooling_layer=False))
