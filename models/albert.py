"""ALBERT (Lan et al., 2019): BERT with fewer parameters, and sentence order prediction.

- factorized embeddings: V x E embeddings, then one E x H projection (E << H);
- cross-layer sharing: num_hidden_groups groups of inner_group_num layers; layer i of num_hidden_layers runs
  group i * groups // layers (one group: every layer runs the same weights);
- SOP instead of NSP (see masking.sop_pairs); the MLM head maps back down to E before the tied decoder.

config -> AlbertModel (embeddings E, projection E -> H, the shared layers, pooler) -> task models (models.heads).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .bert import BertConfig, PooledTwin, embeddings, layer
from .convert import config_kwargs, prefixed
from .encoder import Encoder, EncoderInputs, embeddings_mapping, layer_mapping
from .heads import (ClassificationHead, MaskedLM, MLMHead, PreTraining, QuestionAnswering, SequenceClassification,
                    TokenClassification, init_weights)


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


class AlbertModel(PooledTwin, Encoder):
    hf_class, config_class = "AlbertModel", AlbertConfig

    def __init__(self, config: AlbertConfig, add_pooling_layer: bool = True):
        super().__init__()
        c = self.config = config
        self.embeddings = embeddings(c, c.embedding_size)
        self.project = nn.Linear(c.embedding_size, c.hidden_size)  # the factorization's E x H
        # the distinct layers: group g's inner layers at g * inner_group_num + j
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_groups * c.inner_group_num))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooling_layer else None
        init_weights(self)

    def run(self, x: EncoderInputs) -> Tensor:
        c = self.config
        h = self.project(self.embeddings(x.input_ids, x.position_ids, x.token_type_ids))  # [B, L, E] -> [B, L, H]
        for i in range(c.num_hidden_layers):
            g = i * c.num_hidden_groups // c.num_hidden_layers
            for j in range(c.inner_group_num):
                h = self.layers[g * c.inner_group_num + j](h, None, x.mask)[0]
        return h

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


def mlm_head(c: AlbertConfig) -> MLMHead:  # H -> E, then the tied E x V decoder
    return MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps, out_dim=c.embedding_size)


class AlbertForPreTraining(PreTraining):
    """MLM + sentence order prediction (dropout on the pooled vector, then the classifier)."""
    hf_class, config_class, hf_base = "AlbertForPreTraining", AlbertConfig, "albert"
    hf_decoder = "predictions.decoder.weight"
    hf_head = ("predictions.", "dense", "LayerNorm", "bias", "decoder.bias")
    hf_sentence = "sop_classifier.classifier"

    def __init__(self, config: AlbertConfig):
        c = config
        super().__init__(c, AlbertModel(c), mlm_head(c),
                         ClassificationHead(c.hidden_size, c.num_labels, p_in=c.classifier_dropout_prob))


class AlbertForMaskedLM(MaskedLM):
    hf_class, config_class, hf_base = "AlbertForMaskedLM", AlbertConfig, "albert"
    hf_decoder, hf_head = AlbertForPreTraining.hf_decoder, AlbertForPreTraining.hf_head

    def __init__(self, config: AlbertConfig):
        super().__init__(config, AlbertModel(config, add_pooling_layer=False), mlm_head(config))


class AlbertForSequenceClassification(SequenceClassification):
    hf_class, config_class, hf_base = "AlbertForSequenceClassification", AlbertConfig, "albert"

    def __init__(self, config: AlbertConfig):
        super().__init__(config, AlbertModel(config))


class AlbertForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "AlbertForTokenClassification", AlbertConfig, "albert"

    def __init__(self, config: AlbertConfig):
        super().__init__(config, AlbertModel(config, add_pooling_layer=False))


class AlbertForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "AlbertForQuestionAnswering", AlbertConfig, "albert"

    def __init__(self, config: AlbertConfig):
        super().__init__(config, AlbertModel(config, add_pooling_layer=False))
