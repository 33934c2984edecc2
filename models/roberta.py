"""RoBERTa (Liu et al., 2019): BERT's architecture, trained longer on more data, MLM only (no NSP).

What differs from BERT in the model itself: position ids count real tokens from padding_idx + 1 (padding
keeps position padding_idx), and the heads (an LM head with its own names, a classification head with a
tanh hidden layer on the <s> token instead of a pooler).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import (BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel, MLMHead, Output,
                   _BertTask, init_weights, mlm_loss)
from .convert import SingleLabelClassifier, prefixed
from .encoder import unpack


@dataclass
class RobertaConfig(BertConfig):
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    hf_config_class = "RobertaConfig"


class RobertaModel(BertModel):
    def __init__(self, config: RobertaConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer)
        pad = config.pad_token_id
        self.embeddings.position.padding_idx = pad  # as transformers: no gradient into the padding position
        with torch.no_grad():
            self.embeddings.position.weight[pad].zero_()

    def default_position_ids(self, input_ids: Tensor) -> Tensor:
        pad = self.config.pad_token_id
        real = input_ids.ne(pad).long()
        return torch.cumsum(real, 1) * real + pad


class _RobertaTask(_BertTask):
    base = "roberta"
    model_class = RobertaModel
    config_class = RobertaConfig


class RobertaForMaskedLM(_RobertaTask):
    hf_class = "RobertaForMaskedLM"

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.lm_head = MLMHead(c.hidden_size, c.vocab_size, "gelu", c.layer_norm_eps)  # GELU whatever hidden_act
        init_weights(self.lm_head)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h, packing = self.roberta.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                         unpad=unpad)
        logits = unpack(self.lm_head(h, self.roberta.embeddings.word.weight), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return (self.encoder_mapping() + [("roberta.embeddings.word.weight", "lm_head.decoder.weight")]
                + prefixed(MLMHead.mapping("dense", "layer_norm", "bias", "decoder.bias"), "lm_head.", "lm_head."))


class RobertaForSequenceClassification(SingleLabelClassifier, _RobertaTask):
    """dense + tanh + out_proj on the first (<s>) token; no pooler."""
    hf_class = "RobertaForSequenceClassification"

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.dropout = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.dense), init_weights(self.out_proj)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h = self.roberta(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                         unpad=unpad).last_hidden_state
        x = F.dropout(h[:, 0], self.dropout, self.training)
        x = F.dropout(torch.tanh(self.dense(x)), self.dropout, self.training)
        logits = self.out_proj(x)
        return Output(last_hidden_state=h, logits=logits,
                      loss=None if labels is None else F.cross_entropy(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + [
            ("dense.weight", "classifier.dense.weight"), ("dense.bias", "classifier.dense.bias"),
            ("out_proj.weight", "classifier.out_proj.weight"), ("out_proj.bias", "classifier.out_proj.bias")]


class RobertaForTokenClassification(_RobertaTask, BertForTokenClassification):
    hf_class = "RobertaForTokenClassification"


class RobertaForQuestionAnswering(_RobertaTask, BertForQuestionAnswering):
    hf_class = "RobertaForQuestionAnswering"
