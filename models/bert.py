"""BERT (Devlin et al., 2018): embeddings, post-norm encoder, pooler, and its pre-training and fine-tuning heads.

    model = BertForPreTraining.from_hf(hf_model)             # transformers' weights, same numbers
    out = model(input_ids, attention_mask=mask, unpad=True)  # padded positions never reach a Linear
    loss = BertForMaskedLM.from_hf(hf)(ids, attention_mask=mask, labels=labels).loss  # head on labelled rows only

config -> BertModel (Embeddings, EncoderLayer x N, pooler) -> task models (models.heads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from . import activations
from .convert import HFTwin, config_kwargs, load_into_hf, prefixed, refuse_unless
from .encoder import (BERT_LAYER_NAMES, Embeddings, Encoder, EncoderInputs, Output, bert_layer, embeddings_mapping,
                      layer_mapping)
from .heads import (MLMHead, MaskedLM, NextSentencePrediction, PreTraining, QuestionAnswering, SequenceClassification,
                    TokenClassification, cross_entropy, init_weights)

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForNextSentencePrediction",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering", "Output",
           "MLMHead", "init_weights"]


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    classifier_dropout: Optional[float] = None

    hf_config_class = "BertConfig"

    @classmethod
    def from_hf(cls, hf_config):
        cls.check_hf(hf_config)
        return cls(**config_kwargs(cls, hf_config))

    @classmethod
    def check_hf(cls, hf_config) -> None:
        """Refuse the BERT-family config fields that change the math and are not represented here."""
        refuse_unless(hf_config, hf_config.model_type, add_cross_attention=False, is_decoder=False)
        activations.check(hf_config.hidden_act, "hidden_act")

    def to_hf(self):
        import transformers

        return getattr(transformers, self.hf_config_class)(**dataclasses.asdict(self))


def embeddings(c, dim: Optional[int] = None) -> Embeddings:
    """BERT's embeddings for a BERT-family config (of width `dim`, default hidden_size)."""
    return Embeddings(c.vocab_size, dim or c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                      c.layer_norm_eps, c.hidden_dropout_prob, c.pad_token_id)


def layer(c):
    """BERT's post-norm encoder layer for a BERT-family config."""
    return bert_layer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps,
                      c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.hidden_act)


# ---------------------------------------------------------------------------------------------- model


class PooledTwin(HFTwin):
    """from_hf / to_hf of a backbone with an optional pooler (transformers' `add_pooling_layer`)."""

    @classmethod
    def build_like(cls, hf_model, config):
        return cls(config, add_pooling_layer=getattr(hf_model, "pooler", None) is not None)

    def to_hf(self):
        import transformers

        hf = getattr(transformers, self.hf_class)(self.hf_config(), add_pooling_layer=self.pooler is not None)
        return load_into_hf(hf, self, self.hf_mapping())


def bert_mapping(model) -> list:
    """(ours, transformers') weight names of a BERT backbone: embeddings, layers, pooler."""
    m = prefixed(embeddings_mapping(), "embeddings.", "")
    for i in range(len(model.layers)):
        m += prefixed(layer_mapping(BERT_LAYER_NAMES), f"layers.{i}.", f"encoder.layer.{i}.")
    if model.pooler is not None:
        m += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
    return m


class BertModel(PooledTwin, Encoder):
    """The encoder and its pooler; `from_hf` takes transformers' plain BertModel (every sentence-transformers
    BERT checkpoint is one), with or without its pooler."""

    hf_class, config_class = "BertModel", BertConfig

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        c = self.config = config
        self.embeddings = embeddings(c)
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooling_layer else None
        init_weights(self)

    def run(self, x: EncoderInputs) -> Tensor:
        h = self.embeddings(x.input_ids, x.position_ids, x.token_type_ids)  # [B, L, C] (packed: [1, T, C])
        for lyr in self.layers:
            h = lyr(h, None, x.mask)[0]  # one mask object for every layer: its kernel arguments are built once
        return h

    def hf_mapping(self) -> list:
        return bert_mapping(self)


# ----------------------------------------------------------------------------------------------- tasks


def mlm_head(c) -> MLMHead:
    return MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps)


class BertForPreTraining(PreTraining):
    """MLM + next sentence prediction (the paper's pre-training)."""
    hf_class, config_class = "BertForPreTraining", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config), mlm_head(config))


class BertForMaskedLM(MaskedLM):
    hf_class, config_class = "BertForMaskedLM", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config, add_pooling_layer=False), mlm_head(config))


class BertForNextSentencePrediction(NextSentencePrediction):
    hf_class, config_class = "BertForNextSentencePrediction", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config))


class BertForSequenceClassification(SequenceClassification):
    hf_class, config_class = "BertForSequenceClassification", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config))


class BertForTokenClassification(TokenClassification):
    hf_class, config_class = "BertForTokenClassification", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config, add_pooling_layer=False))


class BertForQuestionAnswering(QuestionAnswering):
    """Span QA: a start and an end logit per token."""
    hf_class, config_class = "BertForQuestionAnswering", BertConfig

    def __init__(self, config: BertConfig):
        super().__init__(config, BertModel(config, add_pooling_layer=False))


# the old names: the base of the BERT-family models with a transformers twin, and the loss over given logits
class HFModel(HFTwin, nn.Module):
    config_class = BertConfig


mlm_loss = cross_entropy
