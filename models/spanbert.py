"""SpanBERT (Joshi et al., 2020): BERT trained on masked spans (masking.span_select) with MLM plus the span
boundary objective (SBO, heads.SpanBoundaryHead), and no NSP.

transformers has no SpanBERT: `from_hf` takes a BertForMaskedLM (SpanBERT checkpoints are BERT checkpoints) and
leaves the SBO head as initialised; the SBO is checked in tests against a plain PyTorch transcription of the
paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from .bert import BertConfig, BertForMaskedLM
from .encoder import Output
from .heads import SpanBoundaryHead, cross_entropy

__all__ = ["SpanBertConfig", "SpanBertForPreTraining", "SpanBoundaryHead"]


@dataclass
class SpanBertConfig(BertConfig):
    max_span_length: int = 30  # tokens; a span longer than this shares the last position embedding
    sbo_weight: float = 1.0


class SpanBertForPreTraining(BertForMaskedLM):
    """MLM + SBO. forward(input_ids, ..., spans=[N, 3], labels=original ids at masked positions) ->
    Output(last_hidden_state, logits (without labels), prediction_logits (the SBO's [T, V]), loss)."""
    config_class = SpanBertConfig
    hf_own = ("sbo.",)

    def __init__(self, config: SpanBertConfig):
        super().__init__(config)
        c = config
        self.sbo = SpanBoundaryHead(c.hidden_size, c.vocab_size, c.max_span_length, c.hidden_act, c.layer_norm_eps)

    def forward(self, input_ids: Tensor, *args, spans: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        padded = inputs.unpack(h)
        sbo = None if spans is None else self.sbo(padded, spans, self.decoder())  # [T, V]
        logits, loss = self.predict(h, inputs, labels)
        if loss is not None and sbo is not None:
            _, b, pos = SpanBoundaryHead.targets(spans)
            loss = loss + self.config.sbo_weight * cross_entropy(sbo, labels[b, pos])
        return Output(last_hidden_state=padded, logits=logits, prediction_logits=sbo, loss=loss)
