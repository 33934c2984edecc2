"""DistilBERT (Sanh et al., 2019): a 6-layer BERT distilled from BERT-base. Same layer; no token type
embeddings and no pooler; the classifier reads the first token through pre_classifier + ReLU.

transformers names its config fields differently (dim, n_layers, ...): the config here keeps BERT's names and
translates in from_hf / to_hf, so the BERT blocks are reused as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import activations
from .bert import (BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel, MLMHead, Output,
                   _BertTask, init_weights, mlm_loss)
from .convert import SingleLabelClassifier, config_kwargs, prefixed
from .encoder import embeddings_mapping, layer_mapping, unpack, use_sinusoidal_positions

_RENAMES = (("hidden_size", "dim"), ("num_hidden_layers", "n_layers"), ("num_attention_heads", "n_heads"),
            ("intermediate_size", "hidden_dim"), ("hidden_dropout_prob", "dropout"),
            ("attention_probs_dropout_prob", "attention_dropout"), ("hidden_act", "activation"),
            ("classifier_dropout", "seq_classif_dropout"))


@dataclass
class DistilBertConfig(BertConfig):
    num_hidden_layers: int = 6
    type_vocab_size: int = 0  # no token type embeddings
    qa_dropout: float = 0.1
    classifier_dropout: float = 0.2

    hf_config_class = "DistilBertConfig"

    sinusoidal_pos_embds: bool = False  # fixed sin/cos positions (frozen; transformers 5 lets them train)

    @classmethod
    def from_hf(cls, hf_config):
        activations.check(hf_config.activation, "activation")
        return cls(**config_kwargs(cls, hf_config, _RENAMES), type_vocab_size=0)

    def to_hf(self):
        import transformers

        d = dataclasses.asdict(self)
        kw = {hf: d.pop(ours) for ours, hf in _RENAMES}
        kw.update(vocab_size=d["vocab_size"], max_position_embeddings=d["max_position_embeddings"],
                  pad_token_id=d["pad_token_id"], num_labels=d["num_labels"], qa_dropout=d["qa_dropout"],
                  sinusoidal_pos_embds=d["sinusoidal_pos_embds"])
        return transformers.DistilBertConfig(**kw)


DISTILBERT_LAYER_NAMES = dict(q="attention.q_lin", k="attention.k_lin", v="attention.v_lin", o="attention.out_lin",
                              attn_norm="sa_layer_norm", fc1="ffn.lin1", fc2="ffn.lin2", ffn_norm="output_layer_norm")


class DistilBertModel(BertModel):
    def __init__(self, config: DistilBertConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)  # DistilBERT has no pooler
        if config.sinusoidal_pos_embds:
            use_sinusoidal_positions(self.embeddings.position)

    def hf_mapping(self) -> list:
        m = prefixed([x for x in embeddings_mapping() if not x[0].startswith("token_type")], "embeddings.", "")
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(DISTILBERT_LAYER_NAMES), f"layers.{i}.", f"transformer.layer.{i}.")
        return m


class _DistilBertTask(_BertTask):
    base = "distilbert"
    model_class = DistilBertModel
    config_class = DistilBertConfig


class DistilBertForMaskedLM(_DistilBertTask):
    hf_class = "DistilBertForMaskedLM"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.mlm = MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps)
        init_weights(self.mlm)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, lengths=None, unpad=False,
                labels=None) -> Output:
        h, packing = self.distilbert.encode(input_ids, attention_mask, None, position_ids, lengths=lengths,
                                            unpad=unpad)
        logits = unpack(self.mlm(h, self.distilbert.embeddings.word.weight), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return (self.encoder_mapping() + [("distilbert.embeddings.word.weight", "vocab_projector.weight")]
                + prefixed(MLMHead.mapping("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"), "mlm.", ""))


class DistilBertForSequenceClassification(SingleLabelClassifier, _DistilBertTask):
    hf_class = "DistilBertForSequenceClassification"

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.pre_classifier = nn.Linear(c.hidden_size, c.hidden_size)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.pre_classifier), init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, position_ids=None, *, lengths=None, unpad=False,
                labels=None) -> Output:
        h = self.distilbert(input_ids, attention_mask, None, position_ids, lengths=lengths,
                            unpad=unpad).last_hidden_state
        x = torch.relu(self.pre_classifier(h[:, 0]))
        logits = self.classifier(F.dropout(x, self.config.classifier_dropout, self.training))
        return Output(last_hidden_state=h, logits=logits,
                      loss=None if labels is None else F.cross_entropy(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + [
            ("pre_classifier.weight", "pre_classifier.weight"), ("pre_classifier.bias", "pre_classifier.bias"),
            ("classifier.weight", "classifier.weight"), ("classifier.bias", "classifier.bias")]


class DistilBertForTokenClassification(_DistilBertTask, BertForTokenClassification):
    hf_class = "DistilBertForTokenClassification"

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw) -> Output:
        return super().forward(input_ids, attention_mask, None, position_ids, **kw)


class DistilBertForQuestionAnswering(_DistilBertTask, BertForQuestionAnswering):
    hf_class = "DistilBertForQuestionAnswering"

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw) -> Output:
        return super().forward(input_ids, attention_mask, None, position_ids, **kw)
