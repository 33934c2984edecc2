"""ELECTRA (Clark et al., 2020): replaced-token detection.

A small generator (an MLM) fills the masked positions with samples; the discriminator (a BERT encoder with an
embedding projection E -> H) labels every token original or replaced. Generator and discriminator share the
token and position embeddings. `ElectraForPreTraining` / `ElectraForMaskedLM` mirror transformers' classes;
`ElectraPreTrainer` ties the two together with the sampling of masking.electra_replace.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels.nn import LayerNorm

from .activations import bias_apply
from .bert import (BertConfig, BertForQuestionAnswering, BertForTokenClassification, BertModel, Output, _BertTask,
                   init_weights, mlm_loss)
from .convert import HFTwin, SingleLabelClassifier
from .encoder import unpack
from .masking import electra_replace


@dataclass
class ElectraConfig(BertConfig):
    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    hf_config_class = "ElectraConfig"


class ElectraModel(BertModel):
    """BERT's encoder under embeddings of size E, projected to H when they differ; no pooler."""

    hf_class, config_class = "ElectraModel", ElectraConfig

    def __init__(self, config: ElectraConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=False)
        c = config
        self.project = nn.Linear(c.embedding_size, c.hidden_size) if c.embedding_size != c.hidden_size else None
        if self.project is not None:
            init_weights(self.project)

    @staticmethod
    def make_embeddings(c, dim=None):
        return BertModel.make_embeddings(c, c.embedding_size)

    @classmethod
    def build_like(cls, hf_model, config):
        return cls(config)

    def to_hf(self):
        return HFTwin.to_hf(self)

    def embed(self, input_ids, position_ids, token_type_ids) -> Tensor:
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        return x if self.project is None else self.project(x)

    def hf_mapping(self) -> list:
        m = super().hf_mapping()
        if self.project is not None:
            m += [("project.weight", "embeddings_project.weight"), ("project.bias", "embeddings_project.bias")]
        return m


class _ElectraTask(_BertTask):
    base = "electra"
    model_class = ElectraModel
    config_class = ElectraConfig


class ElectraForPreTraining(_ElectraTask):
    """The discriminator: one logit per token, > 0 meaning 'replaced'."""
    hf_class = "ElectraForPreTraining"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(c.hidden_size))  # fused into the activation
        self.dense_prediction = nn.Linear(c.hidden_size, 1)
        init_weights(self.dense), init_weights(self.dense_prediction)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h, packing = self.electra.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                         unpad=unpad)
        x = bias_apply(self.dense(h), self.dense_bias, self.config.hidden_act)
        logits = unpack(self.dense_prediction(x).squeeze(-1), packing)
        loss = None
        if labels is not None:  # binary cross-entropy over the real tokens
            real = self._real(input_ids, attention_mask, lengths)
            loss = F.binary_cross_entropy_with_logits(logits[real], labels[real].float())
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=loss)

    @staticmethod
    def _real(input_ids, attention_mask, lengths):
        if lengths is not None:
            return torch.arange(input_ids.shape[1], device=input_ids.device) < lengths.view(-1, 1)
        return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    def hf_mapping(self):
        return self.encoder_mapping() + [
            ("dense.weight", "discriminator_predictions.dense.weight"),
            ("dense_bias", "discriminator_predictions.dense.bias"),
            ("dense_prediction.weight", "discriminator_predictions.dense_prediction.weight"),
            ("dense_prediction.bias", "discriminator_predictions.dense_prediction.bias")]


class ElectraForMaskedLM(_ElectraTask):
    """The generator: dense H -> E, GELU, LayerNorm, then the tied E x V decoder."""
    hf_class = "ElectraForMaskedLM"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.dense = nn.Linear(c.hidden_size, c.embedding_size, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(c.embedding_size))
        self.norm = LayerNorm(c.embedding_size, eps=c.layer_norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        init_weights(self.dense)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h, packing = self.electra.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                         unpad=unpad)
        x = self.norm(bias_apply(self.dense(h), self.dense_bias, "gelu"))
        logits = unpack(F.linear(x, self.electra.embeddings.word.weight, self.lm_bias), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + [
            ("dense.weight", "generator_predictions.dense.weight"),
            ("dense_bias", "generator_predictions.dense.bias"),
            ("norm.weight", "generator_predictions.LayerNorm.weight"),
            ("norm.bias", "generator_predictions.LayerNorm.bias"),
            ("electra.embeddings.word.weight", "generator_lm_head.weight"),
            ("lm_bias", "generator_lm_head.bias")]


class ElectraForSequenceClassification(SingleLabelClassifier, _ElectraTask):
    """ELECTRA's GLUE head: on the first token, dropout, dense, GELU (transformers hard-codes erf GELU here,
    whatever hidden_act says), dropout, out_proj."""
    hf_class = "ElectraForSequenceClassification"

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.dropout = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        self.dense = nn.Linear(c.hidden_size, c.hidden_size, bias=False)
        self.dense_bias = nn.Parameter(torch.zeros(c.hidden_size))  # fused into the GELU
        self.out_proj = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.dense), init_weights(self.out_proj)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None) -> Output:
        h, packing = self.electra.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                         unpad=unpad)
        h = unpack(h, packing)
        x = F.dropout(h[:, 0], self.dropout, self.training)
        x = F.dropout(bias_apply(self.dense(x), self.dense_bias, "gelu"), self.dropout, self.training)
        logits = self.out_proj(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(last_hidden_state=h, logits=logits, loss=loss)

    def hf_mapping(self):
        return self.encoder_mapping() + [
            ("dense.weight", "classifier.dense.weight"), ("dense_bias", "classifier.dense.bias"),
            ("out_proj.weight", "classifier.out_proj.weight"), ("out_proj.bias", "classifier.out_proj.bias")]


class ElectraForTokenClassification(_ElectraTask, BertForTokenClassification):
    hf_class = "ElectraForTokenClassification"


class ElectraForQuestionAnswering(_ElectraTask, BertForQuestionAnswering):
    hf_class = "ElectraForQuestionAnswering"


class ElectraPreTrainer(nn.Module):
    """Generator + discriminator with shared embeddings, and the joint loss of the paper:
    L = L_MLM(generator) + disc_weight * L_disc (the sampled tokens carry no gradient to the generator)."""

    def __init__(self, generator: ElectraConfig, discriminator: ElectraConfig, disc_weight: float = 50.0):
        super().__init__()
        if generator.embedding_size != discriminator.embedding_size:
            raise ValueError("generator and discriminator share embeddings: embedding_size must be equal")
        self.generator = ElectraForMaskedLM(generator)
        self.discriminator = ElectraForPreTraining(discriminator)
        self.generator.electra.embeddings = self.discriminator.electra.embeddings  # one set of embeddings
        self.disc_weight = disc_weight

    def forward(self, masked_ids: Tensor, original_ids: Tensor, selected: Tensor, attention_mask=None,
                token_type_ids=None, *, unpad: bool = False, temperature: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Output:
        """masked_ids: the generator input (e.g. from masking.mask_tokens); selected: its masked positions."""
        labels = torch.where(selected, original_ids, torch.full_like(original_ids, -100))
        gen = self.generator(masked_ids, attention_mask, token_type_ids, unpad=unpad, labels=labels)
        disc_ids, replaced = electra_replace(gen.logits, original_ids, selected, temperature, generator)
        disc = self.discriminator(disc_ids, attention_mask, token_type_ids, unpad=unpad, labels=replaced)
        return Output(logits=disc.logits, prediction_logits=gen.logits,
                      loss=gen.loss + self.disc_weight * disc.loss)


def generator_config(discriminator: ElectraConfig, scale: int = 4) -> ElectraConfig:
    """The paper's generator: the discriminator's config with hidden size, heads and FFN divided by `scale`."""
    return dataclasses.replace(discriminator, hidden_size=discriminator.hidden_size // scale,
                               num_attention_heads=max(1, discriminator.num_attention_heads // scale),
                               intermediate_size=discriminator.intermediate_size // scale)
