"""DistilBERT (Sanh et al., 2019): a 6-layer BERT distilled from BERT-base. Same layer; no token type
embeddings and no pooler; the classifier reads the first token through pre_classifier + ReLU.

transformers names its config fields differently (dim, n_layers, ...): the config here keeps BERT's names and
translates in from_hf / to_hf, so the BERT blocks are reused as they are.

config -> DistilBertModel (embeddings without token types, BERT's layers) -> task models (models.heads).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import Tensor, nn

from . import activations
from .bert import BertConfig, embeddings, layer
from .convert import HFTwin, config_kwargs, prefixed
from .encoder import Encoder, EncoderInputs, embeddings_mapping, layer_mapping, use_sinusoidal_positions
from .heads import (ClassificationHead, MaskedLM, MLMHead, QuestionAnswering, SequenceClassification,
                    TokenClassification, init_weights)

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


class DistilBertModel(HFTwin, Encoder):
    """No pooler; forward(input_ids, attention_mask, position_ids=..., ...): token_type_ids raise (none here)."""
    hf_class, config_class = "DistilBertModel", DistilBertConfig

    def __init__(self, config: DistilBertConfig, add_pooling_layer: bool = False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError("add_pooling_layer=True: this model has no pooler (transformers' has none either)")
        c = self.config = config
        self.embeddings = embeddings(c)
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        init_weights(self)
        if c.sinusoidal_pos_embds:
            use_sinusoidal_positions(self.embeddings.position)

    def run(self, x: EncoderInputs) -> Tensor:
        h = self.embeddings(x.input_ids, x.position_ids, x.token_type_ids)  # [B, L, C]
        for lyr in self.layers:
            h = lyr(h, None, x.mask)[0]
        return h

    def hf_mapping(self) -> list:
        m = prefixed([x for x in embeddings_mapping() if not x[0].startswith("token_type")], "embeddings.", "")
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(DISTILBERT_LAYER_NAMES), f"layers.{i}.", f"transformer.layer.{i}.")
        return m


class DistilBertForMaskedLM(MaskedLM):
    hf_class, config_class, hf_base = "DistilBertForMaskedLM", DistilBertConfig, "distilbert"
    hf_decoder = "vocab_projector.weight"
    hf_head = ("", "vocab_transform", "vocab_layer_norm", "vocab_projector.bias", None)

    def __init__(self, config: DistilBertConfig):
        super().__init__(config, DistilBertModel(config),
                         MLMHead(config.hidden_size, config.vocab_size, config.hidden_act, config.layer_norm_eps))


class DistilBertForSequenceClassification(SequenceClassification):
    """pre_classifier + ReLU on the first token, dropout, classifier."""
    hf_class, config_class, hf_base = "DistilBertForSequenceClassification", DistilBertConfig, "distilbert"

    def __init__(self, config: DistilBertConfig):
        c = config
        super().__init__(c, DistilBertModel(c),
                         ClassificationHead(c.hidden_size, c.num_labels, dense=c.hidden_size, act="relu",
                                            p_mid=c.classifier_dropout),
                         pooled=False, hf_names=("pre_classifier", "classifier"))


class DistilBertForTokenClassification(TokenClassification):
    """dropout (the config's `dropout`, as transformers), classifier."""
    hf_class, config_class, hf_base = "DistilBertForTokenClassification", DistilBertConfig, "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__(config, DistilBertModel(config),
                         ClassificationHead(config.hidden_size, config.num_labels, p_in=config.hidden_dropout_prob))


class DistilBertForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "DistilBertForQuestionAnswering", DistilBertConfig, "distilbert"

    def __init__(self, config: DistilBertConfig):
        super().__init__(config, DistilBertModel(config), dropout=config.qa_dropout)
