"""ELECTRA (Clark et al., 2020): replaced-token detection.

A small generator (an MLM) fills the masked positions with samples; the discriminator (a BERT encoder with an
embedding projection E -> H) labels every token original or replaced. Generator and discriminator share the
token and position embeddings. `ElectraForPreTraining` / `ElectraForMaskedLM` mirror transformers' classes;
`ElectraPreTrainer` ties the two together with the sampling of masking.electra_replace.

config -> ElectraModel (embeddings E, projection E -> H when they differ, BERT's layers) -> task models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .bert import BertConfig, embeddings, layer
from .convert import HFTwin, prefixed
from .encoder import BERT_LAYER_NAMES, Encoder, EncoderInputs, Output, embeddings_mapping, layer_mapping
from .heads import (ClassificationHead, MaskedLM, MLMHead, QuestionAnswering, ReplacedTokenDetection,
                    SequenceClassification, TokenClassification, cross_entropy, first_token_classifier, init_weights)
from .masking import electra_replace


@dataclass
class ElectraConfig(BertConfig):
    embedding_size: int = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024

    hf_config_class = "ElectraConfig"


class ElectraModel(HFTwin, Encoder):
    """BERT's encoder under embeddings of size E, projected to H when they differ; no pooler."""

    hf_class, config_class = "ElectraModel", ElectraConfig

    def __init__(self, config: ElectraConfig, add_pooling_layer: bool = False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError("add_pooling_layer=True: this model has no pooler (transformers' has none either)")
        c = self.config = config
        self.embeddings = embeddings(c, c.embedding_size)
        self.project = nn.Linear(c.embedding_size, c.hidden_size) if c.embedding_size != c.hidden_size else None
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        init_weights(self)

    def run(self, x: EncoderInputs) -> Tensor:
        h = self.embeddings(x.input_ids, x.position_ids, x.token_type_ids)  # [B, L, E]
        if self.project is not None:
            h = self.project(h)  # [B, L, H]
        for lyr in self.layers:
            h = lyr(h, None, x.mask)[0]
        return h

    def hf_mapping(self) -> list:
        m = prefixed(embeddings_mapping(), "embeddings.", "")
        if self.project is not None:
            m += [("project.weight", "embeddings_project.weight"), ("project.bias", "embeddings_project.bias")]
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(BERT_LAYER_NAMES), f"layers.{i}.", f"encoder.layer.{i}.")
        return m


class ElectraForPreTraining(ReplacedTokenDetection):
    """The discriminator: dense + hidden_act, then one logit per token, > 0 meaning 'replaced'."""
    hf_class, config_class, hf_base = "ElectraForPreTraining", ElectraConfig, "electra"

    def __init__(self, config: ElectraConfig):
        c = config
        super().__init__(c, ElectraModel(c), ClassificationHead(c.hidden_size, 1, dense=c.hidden_size,
                                                                act=c.hidden_act))


class ElectraForMaskedLM(MaskedLM):
    """The generator: dense H -> E, GELU (whatever hidden_act says), LayerNorm, then the tied E x V decoder."""
    hf_class, config_class, hf_base = "ElectraForMaskedLM", ElectraConfig, "electra"
    hf_decoder = "generator_lm_head.weight"
    hf_head = ("", "generator_predictions.dense", "generator_predictions.LayerNorm", "generator_lm_head.bias", None)

    def __init__(self, config: ElectraConfig):
        c = config
        super().__init__(c, ElectraModel(c),
                         MLMHead(c.hidden_size, c.vocab_size, "gelu", c.layer_norm_eps, out_dim=c.embedding_size))


class ElectraForSequenceClassification(SequenceClassification):
    """ELECTRA's GLUE head: on the first token, dropout, dense, GELU (transformers hard-codes erf GELU here,
    whatever hidden_act says), dropout, out_proj."""
    hf_class, config_class, hf_base = "ElectraForSequenceClassification", ElectraConfig, "electra"

    def __init__(self, config: ElectraConfig):
        c = config
        super().__init__(c, ElectraModel(c),
                         first_token_classifier(c, "gelu"),
                         pooled=False, hf_names=("classifier.dense", "classifier.out_proj"))


class ElectraForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "ElectraForTokenClassification", ElectraConfig, "electra"

    def __init__(self, config: ElectraConfig):
        super().__init__(config, ElectraModel(config))


class ElectraForQuestionAnswering(QuestionAnswering):
    hf_class, config_class, hf_base = "ElectraForQuestionAnswering", ElectraConfig, "electra"

    def __init__(self, config: ElectraConfig):
        super().__init__(config, ElectraModel(config))


class ElectraPreTrainer(nn.Module):
    """Generator + discriminator with shared embeddings, and the joint loss of the paper:
    L = L_MLM(generator) + disc_weight * L_disc (the sampled tokens carry no gradient to the generator).

    The generator's head runs on the selected (masked) rows only: their logits [N, V] are what the sampling
    and the MLM loss need (prediction_logits of the output)."""

    def __init__(self, generator: ElectraConfig, discriminator: ElectraConfig, disc_weight: float = 50.0):
        super().__init__()
        if generator.embedding_size != discriminator.embedding_size:
            raise ValueError("generator and discriminator share embeddings: embedding_size must be equal")
        self.generator = ElectraForMaskedLM(generator)
        self.discriminator = ElectraForPreTraining(discriminator)
        self.generator.backbone.embeddings = self.discriminator.backbone.embeddings  # one set of embeddings
        self.disc_weight = disc_weight

    def forward(self, masked_ids: Tensor, original_ids: Tensor, selected: Tensor, attention_mask=None,
                token_type_ids=None, *, unpad: bool = False, temperature: float = 1.0,
                generator: Optional[torch.Generator] = None) -> Output:
        """masked_ids: the generator input (e.g. from masking.mask_tokens); selected [B, L] bool: its masked
        positions. Output: logits (the discriminator's, [B, L]), prediction_logits (the generator's at the
        selected positions, [N, V] in row-major order), loss."""
        gen = self.generator
        h, inputs = gen.backbone.encode(masked_ids, attention_mask, token_type_ids, unpad=unpad)
        rows = h[inputs.pack(selected)]  # [N, C]: the selected positions (packed or padded alike)
        logits = gen.mlm(rows, gen.decoder())  # [N, V]
        gen_loss = cross_entropy(logits, original_ids[selected])
        disc_ids, replaced = electra_replace(logits, original_ids, selected, temperature, generator)
        disc = self.discriminator(disc_ids, attention_mask, token_type_ids, unpad=unpad, labels=replaced)
        return Output(logits=disc.logits, prediction_logits=logits, loss=gen_loss + self.disc_weight * disc.loss)


def generator_config(discriminator: ElectraConfig, scale: int = 4) -> ElectraConfig:
    """The paper's generator: the discriminator's config with hidden size, heads and FFN divided by `scale`."""
    return dataclasses.replace(discriminator, hidden_size=discriminator.hidden_size // scale,
                               num_attention_heads=max(1, discriminator.num_attention_heads // scale),
                               intermediate_size=discriminator.intermediate_size // scale)
