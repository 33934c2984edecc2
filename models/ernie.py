"""ERNIE (Sun et al., 2019-2021), as transformers' `ernie` (ERNIE 1.0 / 2.0 / 3.0 checkpoints): BERT's
architecture with one more embedding table, the task type (ERNIE 2.0's continual multi-task pre-training
tells its tasks apart with it), added to the word, position and token type embeddings before the LayerNorm.

ERNIE's knowledge masking (entity- and phrase-level) is whole-word / n-gram masking over the entity and phrase
spans: see masking.py. The heads are BERT's, under the `ernie` prefix.

    model = ErnieForMaskedLM.from_hf(hf_model)
    out = model(input_ids, attention_mask=mask, task_type_ids=task, unpad=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import (BertConfig, BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining,
                   BertForQuestionAnswering, BertForSequenceClassification, BertForTokenClassification, BertModel,
                   _BertTask)
from .encoder import Embeddings


@dataclass
class ErnieConfig(BertConfig):
    task_type_vocab_size: int = 3
    use_task_id: bool = False

    hf_config_class = "ErnieConfig"


class ErnieEmbeddings(Embeddings):
    """BERT's embeddings + task type embeddings (when use_task_id; ids default to 0, as in transformers)."""

    def __init__(self, c: ErnieConfig):
        super().__init__(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                         c.layer_norm_eps, c.hidden_dropout_prob, c.pad_token_id)
        self.task_type = nn.Embedding(c.task_type_vocab_size, c.hidden_size) if c.use_task_id else None

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                task_type_ids: Optional[Tensor] = None) -> Tensor:
        x = self.word(input_ids) + self.position(position_ids)
        x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        if self.task_type is not None:
            x = x + self.task_type(task_type_ids if task_type_ids is not None else torch.zeros_like(input_ids))
        return F.dropout(self.norm(x), self.dropout, self.training)


class ErnieModel(BertModel):
    """Takes `task_type_ids` [B, L] as a keyword (encode / forward); with unpad=True it is packed too."""

    @staticmethod
    def make_embeddings(c, dim=None) -> ErnieEmbeddings:
        return ErnieEmbeddings(c)

    def hf_mapping(self) -> list:
        m = super().hf_mapping()
        if self.embeddings.task_type is not None:
            m += [("embeddings.task_type.weight", "embeddings.task_type_embeddings.weight")]
        return m


class _ErnieTask(_BertTask):
    base = "ernie"
    model_class = ErnieModel
    config_class = ErnieConfig


class ErnieForPreTraining(_ErnieTask, BertForPreTraining):
    hf_class = "ErnieForPreTraining"


class ErnieForMaskedLM(_ErnieTask, BertForMaskedLM):
    hf_class = "ErnieForMaskedLM"


class ErnieForNextSentencePrediction(_ErnieTask, BertForNextSentencePrediction):
    hf_class = "ErnieForNextSentencePrediction"


class ErnieForSequenceClassification(_ErnieTask, BertForSequenceClassification):
    hf_class = "ErnieForSequenceClassification"


class ErnieForTokenClassification(_ErnieTask, BertForTokenClassification):
    hf_class = "ErnieForTokenClassification"


class ErnieForQuestionAnswering(_ErnieTask, BertForQuestionAnswering):
    hf_class = "ErnieForQuestionAnswering"
