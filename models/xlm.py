"""XLM (Lample & Conneau, 2019): cross-lingual language model pre-training, as transformers' `xlm`.

BERT's post-norm layer (attention, add & norm, ReLU/GELU FFN of width 4H, add & norm) under embeddings of
their own: word + position (+ language, one learned vector per language, when n_langs > 1 and use_lang_emb),
then LayerNorm. Segment ids, when given, are looked up in the *word* embedding table, as transformers does.
Options:
- sinusoidal_embeddings: fixed sin/cos position vectors (the paper's, from "Attention is all you need");
  kept as a frozen parameter here (transformers 5 lets them train) and read from the HF weights by from_hf;
- causal: the CLM objective, a left-to-right mask (the causal part of AttentionMask, combined with the padding
  or packing mask); MLM and TLM (translation LM: two languages concatenated, `langs` marking each token) use
  the bidirectional mask.

Heads: LM (tied to the word embeddings, with a bias), sequence classification (the "first" token summary with
an optional projection and activation), token classification, span QA (XLMForQuestionAnsweringSimple), and
SQuAD 2.0 QA with beam search and answerability (XLMForQuestionAnswering, heads.SQuADHead).

config -> XLMModel (word + position + language embeddings, BERT's layers) -> task models (models.heads).

    model = XLMWithLMHeadModel.from_hf(hf_model)
    out = model(input_ids, attention_mask=mask, langs=langs, unpad=True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from torch import Tensor, nn

from .bert import BertConfig, layer
from .convert import HFTwin, config_kwargs, prefixed
from .encoder import Embeddings, Encoder, EncoderInputs, InputRules, layer_mapping, use_sinusoidal_positions
from .heads import (ClassificationHead, EncoderTask, MaskedLM, MLMHead, QuestionAnswering, SequenceClassification,
                    SQuADHead, SQuADOutput, TokenClassification, init_weights)

_RENAMES = (("hidden_dropout_prob", "dropout"), ("attention_probs_dropout_prob", "attention_dropout"))


@dataclass
class XLMConfig(BertConfig):
    vocab_size: int = 30145
    hidden_size: int = 2048
    num_attention_heads: int = 16
    intermediate_size: Optional[int] = None  # always 4 * hidden_size in XLM
    type_vocab_size: int = 0  # segment ids go through the word embeddings
    pad_token_id: int = 2
    n_langs: int = 1
    use_lang_emb: bool = True
    sinusoidal_embeddings: bool = False
    causal: bool = False
    summary_type: str = "first"
    summary_use_proj: bool = True
    summary_activation: Optional[str] = None
    summary_proj_to_labels: bool = True
    summary_first_dropout: float = 0.1
    start_n_top: int = 5  # XLMForQuestionAnswering's beam: the most probable starts, and ends per start
    end_n_top: int = 5

    hf_config_class = "XLMConfig"

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.intermediate_size != 4 * self.hidden_size:
            raise ValueError("XLM's FFN is 4 * hidden_size wide")

    @classmethod
    def from_hf(cls, hf_config):
        kw = config_kwargs(cls, hf_config, _RENAMES)
        kw["hidden_act"] = "gelu" if hf_config.gelu_activation else "relu"
        if getattr(hf_config, "asm", False):
            raise NotImplementedError("XLM's adaptive softmax output layer (asm=True) is not supported")
        if not getattr(hf_config, "is_encoder", True):
            raise NotImplementedError("XLM as a decoder")
        return cls(**kw)

    def to_hf(self):
        import transformers

        d = dataclasses.asdict(self)
        kw = {hf: d.pop(ours) for ours, hf in _RENAMES}
        kw.update(emb_dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
                  gelu_activation=d["hidden_act"] == "gelu")
        for k in ("vocab_size", "max_position_embeddings", "layer_norm_eps", "pad_token_id", "num_labels", "n_langs",
                  "use_lang_emb", "sinusoidal_embeddings", "causal", "summary_type", "summary_use_proj",
                  "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "start_n_top",
                  "end_n_top"):
            kw[k] = d[k]
        return transformers.XLMConfig(**kw)


def xlm_layer_names(i: int) -> dict:
    return dict(q=f"attentions.{i}.q_lin", k=f"attentions.{i}.k_lin", v=f"attentions.{i}.v_lin",
                o=f"attentions.{i}.out_lin", attn_norm=f"layer_norm1.{i}", fc1=f"ffns.{i}.lin1",
                fc2=f"ffns.{i}.lin2", ffn_norm=f"layer_norm2.{i}")


class XLMModel(HFTwin, Encoder):
    """Takes `langs` [B, L] as a keyword; without attention_mask and lengths, lengths count the non-pad ids.
    Segment ids (token_type_ids), when given, are looked up in the word embeddings."""
    hf_class, config_class = "XLMModel", XLMConfig

    def __init__(self, config: XLMConfig, add_pooling_layer: bool = False):
        super().__init__()
        if add_pooling_layer:
            raise ValueError("add_pooling_layer=True: this model has no pooler (transformers' has none either)")
        c = self.config = config
        self.rules = InputRules(lengths_from_pad=c.pad_token_id, causal=c.causal)
        self.embeddings = Embeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, 0, c.layer_norm_eps,
                                     c.hidden_dropout_prob, c.pad_token_id)
        self.lang = nn.Embedding(c.n_langs, c.hidden_size) if c.n_langs > 1 and c.use_lang_emb else None
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_hidden_layers))
        init_weights(self)
        if c.sinusoidal_embeddings:
            use_sinusoidal_positions(self.embeddings.position)

    def run(self, x: EncoderInputs) -> Tensor:
        e = self.embeddings.sum(x.input_ids, x.position_ids)  # [B, L, C]: word + position
        langs = x.extra.get("langs")
        if langs is not None and self.lang is not None:
            e = e + self.lang(langs)
        if x.token_type_ids is not None:
            e = e + self.embeddings.word(x.token_type_ids)
        h = self.embeddings.finish(e)
        for lyr in self.layers:
            h = lyr(h, None, x.mask)[0]
        if x.real is not None and x.packing is None:  # transformers zeroes the padded positions' states
            h = h * x.real.unsqueeze(-1).to(h.dtype)
        return h

    def hf_mapping(self) -> list:
        m = [("embeddings.word.weight", "embeddings.weight"),
             ("embeddings.position.weight", "position_embeddings.weight"),
             ("embeddings.norm.weight", "layer_norm_emb.weight"), ("embeddings.norm.bias", "layer_norm_emb.bias")]
        if self.lang is not None:
            m += [("lang.weight", "lang_embeddings.weight")]
        for i in range(len(self.layers)):
            m += prefixed(layer_mapping(xlm_layer_names(i)), f"layers.{i}.", "")
        return m


class XLMWithLMHeadModel(MaskedLM):
    """MLM / TLM / CLM scores: the hidden state against the tied word embeddings, plus a bias (no transform)."""
    hf_class, config_class, hf_base = "XLMWithLMHeadModel", XLMConfig, "transformer"
    hf_decoder = "pred_layer.proj.weight"
    hf_head = ("", None, None, "pred_layer.proj.bias", None)

    def __init__(self, config: XLMConfig):
        super().__init__(config, XLMModel(config), MLMHead(config.hidden_size, config.vocab_size, None))


class XLMForSequenceClassification(SequenceClassification):
    """transformers' sequence summary: the first token, dropout, an optional projection (to num_labels when
    summary_proj_to_labels) and an optional tanh."""
    hf_class, config_class, hf_base = "XLMForSequenceClassification", XLMConfig, "transformer"

    def __init__(self, config: XLMConfig):
        c = config
        if c.summary_type != "first":
            raise NotImplementedError(f"summary_type {c.summary_type!r}: only 'first' is supported")
        if c.summary_activation not in (None, "tanh"):
            raise NotImplementedError(f"summary_activation {c.summary_activation!r}")
        n_out = c.num_labels if c.summary_proj_to_labels and c.num_labels > 0 else c.hidden_size
        super().__init__(c, XLMModel(c),
                         ClassificationHead(c.hidden_size, None, dense=n_out if c.summary_use_proj else None,
                                            act=c.summary_activation or "linear", p_in=c.summary_first_dropout),
                         pooled=False, hf_names=("sequence_summary.summary", None))


class XLMForTokenClassification(TokenClassification):
    hf_class, config_class, hf_base = "XLMForTokenClassification", XLMConfig, "transformer"

    def __init__(self, config: XLMConfig):
        super().__init__(config, XLMModel(config))


class XLMForQuestionAnsweringSimple(QuestionAnswering):
    hf_class, config_class, hf_base = "XLMForQuestionAnsweringSimple", XLMConfig, "transformer"

    def __init__(self, config: XLMConfig):
        super().__init__(config, XLMModel(config))


class XLMForQuestionAnswering(QuestionAnswering):
    """SQuAD 2.0 QA with beam search over (start, end) and an answerability class (heads.SQuADHead).
    forward(input_ids, ..., start_positions=, end_positions=, cls_index=, is_impossible=, p_mask=) -> heads.SQuADOutput."""
    hf_class, config_class, hf_base = "XLMForQuestionAnswering", XLMConfig, "transformer"

    def __init__(self, config: XLMConfig):
        EncoderTask.__init__(self, config, XLMModel(config))
        self.qa_outputs = SQuADHead(config.hidden_size, config.layer_norm_eps, config.start_n_top, config.end_n_top)

    def forward(self, input_ids: Tensor, *args, start_positions=None, end_positions=None, cls_index=None,
                is_impossible=None, p_mask=None, **kwargs) -> SQuADOutput:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        h = inputs.unpack(h)  # [B, L, C]: the head gathers starts and the cls token by position
        out = self.qa_outputs(h, start_positions, end_positions, cls_index, is_impossible, p_mask)
        out.last_hidden_state = h
        return out

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + prefixed(self.qa_outputs.mapping(), "qa_outputs.", "qa_outputs.")
