"""ALBERT (Lan et al., 2019): BERT with fewer parameters, and sentence order prediction.

- factorized embeddings: V x E embeddings, then one E x H projection (E << H);
- cross-layer sharing: num_hidden_groups groups of inner_group_num layers; layer i of num_hidden_layers runs
  group i * groups // layers (one group: every layer runs the same weights);
- SOP instead of NSP (see masking.sop_pairs); the MLM head maps back down to E before the tied decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask

from .bert import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification,
                   BertModel, MLMHead, Output, _BertTask, init_weights, mlm_loss)
from .convert import config_kwargs, prefixed
from .encoder import embeddings_mapping, layer_mapping, unpack


@dataclass
class AlbertConfig(BertConfig):
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout_prob: float = 0.1
    pad_token_id: int = 0

    hf_config_class = "AlbertConfig"

    @classmethod
    def from_hf(cls, hf_config):
        cls.check_hf(hf_config)
        kw = config_kwargs(cls, hf_config)
        kw["classifier_dropout"] = kw.get("classifier_dropout_prob")  # what the shared heads read
        return cls(**kw)


ALBERT_LAYER_NAMES = dict(q="attention.query", k="attention.key", v="attention.value", o="attention.dense",
                          attn_norm="attention.LayerNorm", fc1="ffn", fc2="ffn_output",
                          ffn_norm="full_layer_layer_norm")


class AlbertModel(BertModel):
    def __init__(self, config: AlbertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer)
        self.project = nn.Linear(config.embedding_size, config.hidden_size)  # the factorization's E x H
        init_weights(self.project)

    @staticmethod
    def make_embeddings(c, dim=None):
        return BertModel.make_embeddings(c, c.embedding_size)

    @staticmethod
    def num_layer_modules(c) -> int:  # self.layers holds the distinct layers: group g's layers at g * inner
        return c.num_hidden_groups * c.inner_group_num

    def embed(self, input_ids, position_ids, token_type_ids) -> Tensor:
        return self.project(self.embeddings(input_ids, position_ids, token_type_ids))

    def run_layers(self, x: Tensor, mask: AttentionMask) -> Tensor:
        c = self.config
        for i in range(c.num_hidden_layers):
            g = i * c.num_hidden_groups // c.num_hidden_layers
            for j in range(c.inner_group_num):
                x = self.layers[g * c.inner_group_num + j](x, mask)
        return x

    def hf_mapping(self) -> list:
        c = self.config
        m = prefixed(embeddings_mapping(), "embeddings.", "")
        m += [("project.weight", "encoder.embedding_hidden_mapping_in.weight"),
              ("project.bias", "encoder.embedding_hidden_mapping_in.bias")]
        for g in range(c.num_hidden_groups):
            for j in range(c.inner_group_num):
                m += prefixed(layer_mapping(ALBERT_LAYER_NAMES), f"layers.{g * c.inner_group_num + j}.",
                              f"encoder.albert_layer_groups.{g}.albert_layers.{j}.")
        if self.pooler is not None:
            m += [("pooler.weight", "pooler.weight"), ("pooler.bias", "pooler.bias")]
        return m


class _AlbertTask(_BertTask):
    base = "albert"
    model_class = AlbertModel
    config_class = AlbertConfig

    def make_mlm(self, c) -> MLMHead:
        return MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps, out_dim=c.embedding_size)

    def mlm_mapping(self) -> list:
        return ([("albert.embeddings.word.weight", "predictions.decoder.weight")]
                + prefixed(MLMHead.mapping("dense", "LayerNorm", "bias", "decoder.bias"), "mlm.", "predictions."))


class AlbertForPreTraining(_AlbertTask):
    """MLM + sentence order prediction."""
    hf_class = "AlbertForPreTraining"

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.mlm = self.make_mlm(c)
        self.sop = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.mlm), init_weights(self.sop)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, sentence_order_label=None) -> Output:
        h, packing = self.albert.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                        unpad=unpad)
        logits = unpack(self.mlm(h, self.albert.embeddings.word.weight), packing)
        h = unpack(h, packing)
        pooled = F.dropout(self.albert.pool(h), self.config.classifier_dropout_prob, self.training)
        sop = self.sop(pooled)
        loss = mlm_loss(logits, labels)
        if sentence_order_label is not None:
            loss = F.cross_entropy(sop, sentence_order_label) + (0 if loss is None else loss)
        return Output(last_hidden_state=h, prediction_logits=logits, seq_relationship_logits=sop, loss=loss)

    def hf_mapping(self):
        return (self.encoder_mapping() + self.mlm_mapping()
                + [("sop.weight", "sop_classifier.classifier.weight"), ("sop.bias", "sop_classifier.classifier.bias")])


class AlbertForMaskedLM(_AlbertTask):
    hf_class = "AlbertForMaskedLM"

    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.mlm = self.make_mlm(c)
        init_weights(self.mlm)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h, packing = self.albert.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                        unpad=unpad)
        logits = unpack(self.mlm(h, self.albert.embeddings.word.weight), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + self.mlm_mapping()


class AlbertForSequenceClassification(_AlbertTask, BertForSequenceClassification):
    hf_class = "AlbertForSequenceClassification"


class AlbertForTokenClassification(_AlbertTask, BertForTokenClassification):
    hf_class = "AlbertForTokenClassification"


class AlbertForQuestionAnswering(_AlbertTask, BertForQuestionAnswering):
    hf_class = "AlbertForQuestionAnswering"
