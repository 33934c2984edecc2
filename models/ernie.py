"""ERNIE (Sun et al., 2019-2021), as transformers' `ernie` (ERNIE 1.0 / 2.0 / 3.0 checkpoints): BERT's
architecture with one more embedding table, the task type (ERNIE 2.0's continual multi-task pre-training
tells its tasks apart with it), added to the word, position and token type embeddings before the LayerNorm.

ERNIE's knowledge masking (entity- and phrase-level) is whole-word / n-gram masking over the entity and phrase
spans: see masking.py. The heads are BERT's, under the `ernie` prefix.

    model = ErnieForMaskedLM.from_hf(hf_model)
    out = model(input_ids, attention_mask=mask, task_type_ids=task, unpad=True)

config -> ErnieModel (BERT's embeddings + task types, BERT's layers, pooler) -> task models (models.heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .bert import BertConfig, PooledTwin, bert_mapping, embeddings, layer, mlm_head
from .encoder import Encoder, EncoderInputs
from .heads import (MaskedLM, NextSentencePrediction, PreTraining, QuestionAnswering, SequenceClassification,
                    TokenClassification, init_weights)


@dataclass
class ErnieConfig(BertConfig):
    task_type_vocab_size: int = 3
    use_task_id: bool = False

    hf_config_class = "ErnieConfig"


class ErnieModel(PooledTwin, Encoder):
    """Takes `task_type_ids` [B, L] as a keyword (ids default to 0, as in transformers); packed with unpad=True."""
    hf_class, config_class = "ErnieModel", ErnieConfig

    def __init__(self, config: ErnieConfig, add_pooling_layer: bool = True):
        super().__init__()
        c = self.config = config
        self.embeddings = embeddings(c)
        self.task_type = nn.Embedding(c.task_type_vocab_size, c.hidden_size) if c.use_task_id else None
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooling_layer else None
        init_weights(self)

    def run(self, x: EncoderInputs) -> Tensor:
        e = self.embeddings.sum(x.input_ids, x.position_ids, x.token_type_ids)  # [B, L, C], before the norm
        if self.task_type is not None:
            ids: Optional[Tensor] = x.extra.get("task_type_ids")
            e = e + self.task_type(ids if ids is not None else torch.zeros_like(x.input_ids))
        h = self.embeddings.finish(e)
        for lyr in self.layers:
            h = lyr(h, None, x.mask)[0]
        return h

    def hf_mapping(self) -> list:
        m = bert_mapping(self)
        if self.task_type is not None:
            m += [("task_type.weight", "embeddings.task_type_embeddings.weight")]
        return m


class ErnieForPreTraining(PreTraining):
    hf_class, config_class, hf_base = "ErnieForPreTraining", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config), mlm_head(config))


class ErnieForMaskedLM(MaskedLM):
    hf_class, config_class, hf_base = "ErnieForMaskedLM", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config, add_pooling_layer=False), mlm_head(config))


class ErnieForNextSentencePrediction(NextSentencePrediction):
    hf_class, config_class, hf_base = "ErnieForNextSentencePrediction", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config))


class ErnieForSequenceClassification(SequenceClassification):
    hf_class, config_class, hf_base = "ErnieForSequenceClassification", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config))


class ErnieForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "ErnieForTokenClassification", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config, add_pooling_layer=False))


class ErnieForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "ErnieForQuestionAnswering", ErnieConfig, "ernie"

    def __init__(self, config: ErnieConfig):
        super().__init__(config, ErnieModel(config, add_pooling_layer=False))
