"""RoBERTa (Liu et al., 2019): BERT's architecture, trained longer on more data, MLM only (no NSP).

What differs from BERT in the model itself: position ids count real tokens from padding_idx + 1 (padding
keeps position padding_idx), and the heads (an LM head with its own names, a classification head with a
tanh hidden layer on the <s> token instead of a pooler).

config -> RobertaModel (BERT's embeddings and layers, RoBERTa's positions) -> task models (models.heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bert import BertConfig, BertModel
from .encoder import InputRules
from .heads import (MLMHead, MaskedLM, QuestionAnswering, SequenceClassification, TokenClassification,
                    first_token_classifier)


@dataclass
class RobertaConfig(BertConfig):
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    hf_config_class = "RobertaConfig"


class RobertaModel(BertModel):
    """BERT with RoBERTa's position ids (from the pad id) and a padding row in the position table."""
    hf_class, config_class = "RobertaModel", RobertaConfig

    def __init__(self, config: RobertaConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer)
        pad = config.pad_token_id
        self.rules = InputRules(positions_after_pad=pad)
        self.embeddings.position.padding_idx = pad  # as transformers: no gradient into the padding position
        with torch.no_grad():
            self.embeddings.position.weight[pad].zero_()


class RobertaForMaskedLM(MaskedLM):
    hf_class, config_class, hf_base = "RobertaForMaskedLM", RobertaConfig, "roberta"
    hf_decoder = "lm_head.decoder.weight"
    hf_head = ("lm_head.", "dense", "layer_norm", "bias", "decoder.bias")

    def __init__(self, config: RobertaConfig):  # the LM head's GELU whatever hidden_act says
        super().__init__(config, RobertaModel(config, add_pooling_layer=False),
                         MLMHead(config.hidden_size, config.vocab_size, "gelu", config.layer_norm_eps))


class RobertaForSequenceClassification(SequenceClassification):
    """dense + tanh + out_proj on the first (<s>) token; no pooler."""
    hf_class, config_class, hf_base = "RobertaForSequenceClassification", RobertaConfig, "roberta"

    def __init__(self, config: RobertaConfig):
        c = config
        super().__init__(c, RobertaModel(c, add_pooling_layer=False),
                         first_token_classifier(c, "tanh"),
                         pooled=False, hf_names=("classifier.dense", "classifier.out_proj"))


class RobertaForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "RobertaForTokenClassification", RobertaConfig, "roberta"

    def __init__(self, config: RobertaConfig):
        super().__init__(config, RobertaModel(config, add_pooling_layer=False))


class RobertaForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "RobertaForQuestionAnswering", RobertaConfig, "roberta"

    def __init__(self, config: RobertaConfig):
        super().__init__(config, RobertaModel(config, add_pooling_layer=False))
