"""XLM (Lample & Conneau, 2019): cross-lingual language model pre-training, as transformers' `xlm`.

BERT's post-norm layer (attention, add & norm, ReLU/GELU FFN of width 4H, add & norm) under embeddings of
their own: word + position (+ language, one learned vector per language, when n_langs > 1 and use_lang_emb),
then LayerNorm. Segment ids, when given, are looked up in the *word* embedding table, as transformers does.
Options:
- sinusoidal_embeddings: fixed sin/cos position vectors (the paper's, from "Attention is all you need");
  kept as a frozen parameter here (transformers 5 lets them train) and read from the HF weights by from_hf;
- causal: the CLM objective, a left-to-right mask (the causal part of AttentionMask, combined with the padding
  or packing mask); MLM and TLM (translation LM: two languages concatenated, `langs` marking each token) use
  the bidirectional mask.

Heads: LM (tied to the word embeddings, with a bias), sequence classification (the "first" token summary with
an optional projection and activation), token classification, span QA (XLMForQuestionAnsweringSimple).

    model = XLMWithLMHeadModel.from_hf(hf_model)
    out = model(input_ids, attention_mask=mask, langs=langs, unpad=True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask

from .bert import (BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel, Output, _BertTask,
                   init_weights, mlm_loss)
from .convert import SingleLabelClassifier, config_kwargs, prefixed
from .encoder import Embeddings, layer_mapping, unpack, use_sinusoidal_positions

_RENAMES = (("hidden_dropout_prob", "dropout"), ("attention_probs_dropout_prob", "attention_dropout"))


@dataclass
class XLMConfig(BertConfig):
    vocab_size: int = 30145
    hidden_size: int = 2048
    num_attention_heads: int = 16
    intermediate_size: Optional[int] = None  # always 4 * hidden_size in XLM
    type_vocab_size: int = 0  # segment ids go through the word embeddings
    pad_token_id: int = 2
    n_langs: int = 1
    use_lang_emb: bool = True
    sinusoidal_embeddings: bool = False
    causal: bool = False
    summary_type: str = "first"
    summary_use_proj: bool = True
    summary_activation: Optional[str] = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1

    hf_config_class = "XLMConfig"

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.intermediate_size != 4 * self.hidden_size:
            raise ValueError("XLM's FFN is 4 * hidden_size wide")

    @classmethod
    def from_hf(cls, hf_config):
        kw = config_kwargs(cls, hf_config, _RENAMES)
        kw["hidden_act"] = "gelu" if hf_config.gelu_activation else "relu"
        if getattr(hf_config, "asm", False):
            raise NotImplementedError("XLM's adaptive softmax output layer (asm=True) is not supported")
        if not getattr(hf_config, "is_encoder", True):
            raise NotImplementedError("XLM as a decoder")
        return cls(**kw)

    def to_hf(self):
        import transformers

        d = dataclasses.asdict(self)
        kw = {hf: d.pop(ours) for ours, hf in _RENAMES}
        kw.update(emb_dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
                  gelu_activation=d["hidden_act"] == "gelu")
        for k in ("vocab_size", "max_position_embeddings", "layer_norm_eps", "pad_token_id", "num_labels", "n_langs",
                  "use_lang_emb", "sinusoidal_embeddings", "causal", "summary_type", "summary_use_proj",
                  "summary_activation", "summary_proj_to_labels", "summary_first_dropout"):
            kw[k] = d[k]
        return transformers.XLMConfig(**kw)


class XLMEmbeddings(Embeddings):
    def __init__(self, c: XLMConfig):
        super().__init__(c.vocab_size, c.hidden_size, c.max_position_embeddings, 0, c.layer_norm_eps,
                         c.hidden_dropout_prob, c.pad_token_id)
        self.lang = nn.Embedding(c.n_langs, c.hidden_size) if c.n_langs > 1 and c.use_lang_emb else None

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                langs: Optional[Tensor] = None) -> Tensor:
        x = self.word(input_ids) + self.position(position_ids)
        if langs is not None and self.lang is not None:
            x = x + self.lang(langs)
        if token_type_ids is not None:
            x = x + self.word(token_type_ids)
        return F.dropout(self.norm(x), self.dropout, self.training)


def xlm_layer_names(i: int) -> dict:
    return dict(q=f"attentions.{i}.q_lin", k=f"attentions.{i}.k_lin", v=f"attentions.{i}.v_lin",
                o=f"attentions.{i}.out_lin", attn_norm=f"layer_norm1.{i}", fc1=f"ffns.{i}.lin1",
                fc2=f"ffns.{i}.lin2", ffn_norm=f"layer_norm2.{i}")


class XLMModel(BertModel):
    """Takes `langs` [B, L] as a keyword; without attention_mask and lengths, lengths count the non-pad ids."""

    def __init__(self, config: XLMConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)
        if config.sinusoidal_embeddings:
            use_sinusoidal_positions(self.embeddings.position)

    @staticmethod
    def make_embeddings(c, dim=None) -> XLMEmbeddings:
        return XLMEmbeddings(c)

    def extend_mask(self, mask: AttentionMask) -> AttentionMask:
        return mask & AttentionMask.causal() if self.config.causal else mask

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
               **kw):
        if attention_mask is None and lengths is None:
            lengths = input_ids.ne(self.config.pad_token_id).sum(1)
        return super().encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths, **kw)

    def hf_mapping(self) -> list:
        m = [("embeddings.word.weight", "embeddings.weight"),
             ("embeddings.position.weight", "position_embeddings.weight"),
             ("embeddings.norm.weight", "layer_norm_emb.weight"), ("embeddings.norm.bias", "layer_norm_emb.bias")]
        if self.embeddings.lang is not None:
            m += [("embeddings.lang.weight", "lang_embeddings.weight")]
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(xlm_layer_names(i)), f"layers.{i}.", "")
        return m


class _XLMTask(_BertTask):
    base = "transformer"
    model_class = XLMModel
    config_class = XLMConfig


class XLMWithLMHeadModel(_XLMTask):
    """MLM / TLM / CLM scores: the hidden state against the tied word embeddings, plus a bias."""
    hf_class = "XLMWithLMHeadModel"

    def __init__(self, config: XLMConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.lm_bias = nn.Parameter(torch.zeros(c.vocab_size))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        h, packing = self.transformer.encode(input_ids, attention_mask, token_type_ids, position_ids,
                                             lengths=lengths, unpad=unpad, **extra_ids)
        logits = unpack(F.linear(h, self.transformer.embeddings.word.weight, self.lm_bias), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + [("transformer.embeddings.word.weight", "pred_layer.proj.weight"),
                                         ("lm_bias", "pred_layer.proj.bias")]


class XLMForSequenceClassification(SingleLabelClassifier, _XLMTask):
    """transformers' sequence summary: the first token, dropout, an optional projection (to num_labels when
    summary_proj_to_labels) and an optional tanh."""
    hf_class = "XLMForSequenceClassification"

    def __init__(self, config: XLMConfig):
        super().__init__()
        self.config = c = config
        if c.summary_type != "first":
            raise NotImplementedError(f"summary_type {c.summary_type!r}: only 'first' is supported")
        if c.summary_activation not in (None, "tanh"):
            raise NotImplementedError(f"summary_activation {c.summary_activation!r}")
        self.make_backbone(c)
        n_out = c.num_labels if c.summary_proj_to_labels and c.num_labels > 0 else c.hidden_size
        self.summary = nn.Linear(c.hidden_size, n_out) if c.summary_use_proj else None
        if self.summary is not None:
            init_weights(self.summary)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        h = self.transformer(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths, unpad=unpad,
                             **extra_ids).last_hidden_state
        x = F.dropout(h[:, 0], self.config.summary_first_dropout, self.training)
        if self.summary is not None:
            x = self.summary(x)
        logits = torch.tanh(x) if self.config.summary_activation == "tanh" else x
        return Output(last_hidden_state=h, logits=logits,
                      loss=None if labels is None else F.cross_entropy(logits, labels))

    def hf_mapping(self):
        m = self.encoder_mapping()
        if self.summary is not None:
            m += [("summary.weight", "sequence_summary.summary.weight"),
                  ("summary.bias", "sequence_summary.summary.bias")]
        return m


class XLMForTokenClassification(_XLMTask, BertForTokenClassification):
    hf_class = "XLMForTokenClassification"


class XLMForQuestionAnsweringSimple(_XLMTask, BertForQuestionAnswering):
    hf_class = "XLMForQuestionAnsweringSimple"
