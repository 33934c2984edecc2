"""BERT (Devlin et al., 2018): embeddings, post-norm encoder, pooler, and its pre-training and fine-tuning heads.

    model = BertForPreTraining.from_hf(hf_model)          # transformers' weights, same numbers
    out = model(input_ids, attention_mask=mask, unpad=True)  # padded positions never reach a Linear

The variants (RoBERTa, ALBERT, ELECTRA, SpanBERT, UniLM, ...) import BertModel and the heads from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from . import activations
from .convert import HFTwin, SingleLabelClassifier, config_kwargs, load_into_hf, prefixed, refuse_unless
from .encoder import (BERT_LAYER_NAMES, BiasAct, Embeddings, EncoderLayer, Packing, embeddings_mapping,
                      layer_mapping, padding_mask, unpack)


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


@dataclass
class Output:
    """What the models return; the fields a model does not produce stay None (names as in transformers)."""
    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None
    seq_relationship_logits: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, BiasAct)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------- model


class BertModel(HFTwin, nn.Module):
    """The encoder and its pooler; `from_hf` takes transformers' plain BertModel (every sentence-transformers
    BERT checkpoint is one), with or without its pooler."""

    hf_class, config_class = "BertModel", BertConfig

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        c = self.config = config
        self.embeddings = self.make_embeddings(c)
        self.layers = nn.ModuleList(self.make_layer(c) for _ in range(self.num_layer_modules(c)))
        self.pooler = nn.Linear(c.hidden_size, c.hidden_size) if add_pooling_layer else None
        init_weights(self)

    # -- hooks the variants override
    @staticmethod
    def make_embeddings(c, dim: Optional[int] = None) -> Embeddings:
        return Embeddings(c.vocab_size, dim or c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                          c.layer_norm_eps, c.hidden_dropout_prob, c.pad_token_id)

    @staticmethod
    def make_layer(c) -> EncoderLayer:
        return EncoderLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.layer_norm_eps,
                            c.hidden_dropout_prob, c.attention_probs_dropout_prob, c.hidden_act)

    @staticmethod
    def num_layer_modules(c) -> int:
        return c.num_hidden_layers

    def default_position_ids(self, input_ids: Tensor) -> Tensor:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)

    def embed(self, input_ids, position_ids, token_type_ids, **extra_ids) -> Tensor:
        return self.embeddings(input_ids, position_ids, token_type_ids, **extra_ids)

    def extend_mask(self, mask: AttentionMask) -> AttentionMask:
        """The padding (or packing) mask with the model's own parts added (XLM's causal mode)."""
        return mask

    def run_layers(self, x: Tensor, mask: AttentionMask) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x

    # --
    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None, *,
               lengths: Optional[Tensor] = None, unpad: bool = False, mask: Optional[AttentionMask] = None,
               **extra_ids: Tensor):
        """The last hidden state and its Packing: [B, L, C] and None, or with unpad=True the real tokens
        only, [1, T, C], and the Packing that restores them (`unpack`). `mask` replaces the padding mask
        (UniLM's modes); it cannot be combined with unpad. `extra_ids`: further per-token inputs [B, L, ...] of
        a variant's embeddings (ERNIE's task_type_ids, XLM's langs), packed like the others and passed on to
        `embed`."""
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids)
        packing = None
        if unpad:
            if mask is not None:
                raise ValueError("unpad=True builds its own (segment) mask; pass mask= without unpad")
            packing = Packing.from_inputs(B, L, attention_mask, lengths, input_ids.device)
            input_ids, position_ids = packing.pack(input_ids), packing.pack(position_ids.expand(B, L))
            token_type_ids = None if token_type_ids is None else packing.pack(token_type_ids)
            extra_ids = {k: None if t is None else packing.pack(t) for k, t in extra_ids.items()}
            mask = self.extend_mask(packing.mask())
        elif mask is None:
            mask = self.extend_mask(padding_mask(attention_mask, lengths))  # one object, shared by the layers
        x = self.embed(input_ids, position_ids, token_type_ids, **extra_ids)
        return self.run_layers(x, mask), packing

    def pool(self, h: Tensor) -> Tensor:
        return torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, mask=None, **extra_ids) -> Output:
        h, packing = self.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                 unpad=unpad, mask=mask, **extra_ids)
        h = unpack(h, packing)
        return Output(last_hidden_state=h, pooler_output=self.pool(h) if self.pooler is not None else None)

    @classmethod
    def build_like(cls, hf_model, config):
        return cls(config, add_pooling_layer=getattr(hf_model, "pooler", None) is not None)

    def to_hf(self):
        import transformers

        hf = getattr(transformers, self.hf_class)(self.hf_config(), add_pooling_layer=self.pooler is not None)
        return load_into_hf(hf, self, self.hf_mapping())

    def hf_mapping(self) -> list:
        m = prefixed(embeddings_mapping(), "embeddings.", "")
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(BERT_LAYER_NAMES), f"layers.{i}.", f"encoder.layer.{i}.")
        if self.pooler is not None:
            m += [("pooler.weight", "pooler.dense.weight"), ("pooler.bias", "pooler.dense.bias")]
        return m


# ----------------------------------------------------------------------------------------------- heads


class MLMHead(nn.Module):
    """transform (dense + act + LayerNorm), then scores against the (tied) input embedding matrix + bias."""

    def __init__(self, hidden: int, vocab: int, act: str, eps: float, out_dim: Optional[int] = None):
        super().__init__()
        out_dim = out_dim or hidden
        self.transform = BiasAct(hidden, out_dim, act)
        self.norm = LayerNorm(out_dim, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(self.transform(h)), word_embeddings, self.bias)

    @staticmethod
    def mapping(dense: str, norm: str, bias: str, decoder_bias: Optional[str] = None) -> list:
        m = [("transform.weight", dense + ".weight"), ("transform.bias", dense + ".bias"),
             ("norm.weight", norm + ".weight"), ("norm.bias", norm + ".bias"), ("bias", bias)]
        return m + ([("bias", decoder_bias)] if decoder_bias else [])


def mlm_loss(logits: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
    if labels is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


class HFModel(HFTwin, nn.Module):
    """A BERT-family model with a transformers twin (from_hf / to_hf: see convert.HFTwin)."""

    config_class = BertConfig


class _BertTask(HFModel):
    """A task model on a BERT-like backbone; variants change the backbone class and its name (`base`, which
    is also its prefix in transformers' state dict) and reuse the heads."""
    base = "bert"
    model_class = BertModel

    def make_backbone(self, config, add_pooling_layer: bool = True) -> None:
        setattr(self, self.base, self.model_class(config, add_pooling_layer=add_pooling_layer))

    @property
    def backbone(self) -> BertModel:
        return getattr(self, self.base)

    def encoder_mapping(self) -> list:
        return prefixed(self.backbone.hf_mapping(), self.base + ".", self.base + ".")

    def tied_decoder(self) -> list:
        return [(f"{self.base}.embeddings.word.weight", "cls.predictions.decoder.weight")]


class BertForPreTraining(_BertTask):
    """MLM + next sentence prediction (the paper's pre-training)."""
    hf_class = "BertForPreTraining"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.mlm = MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps)
        self.nsp = nn.Linear(c.hidden_size, 2)
        init_weights(self.mlm), init_weights(self.nsp)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, next_sentence_label=None, **extra_ids) -> Output:
        h, packing = self.backbone.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                          unpad=unpad, **extra_ids)
        logits = unpack(self.mlm(h, self.backbone.embeddings.word.weight), packing)
        h = unpack(h, packing)
        nsp = self.nsp(self.backbone.pool(h))
        loss = mlm_loss(logits, labels)
        if next_sentence_label is not None:
            loss = F.cross_entropy(nsp, next_sentence_label) + (0 if loss is None else loss)
        return Output(last_hidden_state=h, prediction_logits=logits, seq_relationship_logits=nsp, loss=loss)

    def hf_mapping(self):
        return (self.encoder_mapping() + self.tied_decoder()
                + prefixed(MLMHead.mapping("transform.dense", "transform.LayerNorm", "bias", "decoder.bias"),
                           "mlm.", "cls.predictions.")
                + [("nsp.weight", "cls.seq_relationship.weight"), ("nsp.bias", "cls.seq_relationship.bias")])


class BertForMaskedLM(_BertTask):
    hf_class = "BertForMaskedLM"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.mlm = MLMHead(c.hidden_size, c.vocab_size, c.hidden_act, c.layer_norm_eps)
        init_weights(self.mlm)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        h, packing = self.backbone.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                          unpad=unpad, **extra_ids)
        logits = unpack(self.mlm(h, self.backbone.embeddings.word.weight), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return (self.encoder_mapping() + self.tied_decoder()
                + prefixed(MLMHead.mapping("transform.dense", "transform.LayerNorm", "bias", "decoder.bias"),
                           "mlm.", "cls.predictions."))


class BertForNextSentencePrediction(_BertTask):
    hf_class = "BertForNextSentencePrediction"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.nsp = nn.Linear(c.hidden_size, 2)
        init_weights(self.nsp)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths, unpad=unpad,
                            **extra_ids)
        logits = self.nsp(out.pooler_output)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(last_hidden_state=out.last_hidden_state, logits=logits, loss=loss)

    def hf_mapping(self):
        return self.encoder_mapping() + [("nsp.weight", "cls.seq_relationship.weight"),
                                         ("nsp.bias", "cls.seq_relationship.bias")]


class BertForSequenceClassification(SingleLabelClassifier, _BertTask):
    hf_class = "BertForSequenceClassification"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c)
        self.dropout = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        out = self.backbone(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths, unpad=unpad,
                            **extra_ids)
        logits = self.classifier(F.dropout(out.pooler_output, self.dropout, self.training))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return Output(last_hidden_state=out.last_hidden_state, logits=logits, loss=loss)

    def hf_mapping(self):
        return self.encoder_mapping() + [("classifier.weight", "classifier.weight"),
                                         ("classifier.bias", "classifier.bias")]


class BertForTokenClassification(_BertTask):
    hf_class = "BertForTokenClassification"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.dropout = c.classifier_dropout if c.classifier_dropout is not None else c.hidden_dropout_prob
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)
        init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, labels=None, **extra_ids) -> Output:
        h, packing = self.backbone.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                          unpad=unpad, **extra_ids)
        logits = unpack(self.classifier(F.dropout(h, self.dropout, self.training)), packing)
        return Output(last_hidden_state=unpack(h, packing), logits=logits, loss=mlm_loss(logits, labels))

    def hf_mapping(self):
        return self.encoder_mapping() + [("classifier.weight", "classifier.weight"),
                                         ("classifier.bias", "classifier.bias")]


class BertForQuestionAnswering(_BertTask):
    """Span QA: a start and an end logit per token."""
    hf_class = "BertForQuestionAnswering"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.make_backbone(c, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(c.hidden_size, 2)
        init_weights(self.qa_outputs)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, start_positions=None, end_positions=None, **extra_ids) -> Output:
        h, packing = self.backbone.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                          unpad=unpad, **extra_ids)
        logits = unpack(self.qa_outputs(h), packing)
        start, end = logits.unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
        return Output(last_hidden_state=unpack(h, packing), start_logits=start, end_logits=end, loss=loss)

    def hf_mapping(self):
        return self.encoder_mapping() + [("qa_outputs.weight", "qa_outputs.weight"),
                                         ("qa_outputs.bias", "qa_outputs.bias")]
