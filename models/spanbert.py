"""SpanBERT (Joshi et al., 2020): BERT trained on masked spans (masking.span_select) with MLM plus the span
boundary objective (SBO), and no NSP.

SBO predicts each token x_i of a masked span (s..e) from the two boundary tokens outside it and the position
of i inside the span: y_i = LN(GeLU(W2 LN(GeLU(W1 [h_{s-1}; h_{e+1}; p_{i-s}])))), scored against the tied
input embeddings. transformers has no SpanBERT: `from_hf` takes a BertForMaskedLM (SpanBERT checkpoints are
BERT checkpoints) and leaves the SBO head as initialised; the SBO is checked in tests against a plain
PyTorch transcription of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels.nn import LayerNorm

from .bert import BertConfig, BertForMaskedLM, Output, init_weights, mlm_loss
from .encoder import BiasAct, unpack


@dataclass
class SpanBertConfig(BertConfig):
    max_span_length: int = 30  # tokens; a span longer than this shares the last position embedding
    sbo_weight: float = 1.0


class SpanBoundaryHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, max_span: int, act: str, eps: float):
        super().__init__()
        self.position = nn.Embedding(max_span, hidden)
        self.fc1, self.norm1 = BiasAct(3 * hidden, hidden, act), LayerNorm(hidden, eps=eps)
        self.fc2, self.norm2 = BiasAct(hidden, hidden, act), LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.max_span = max_span

    @staticmethod
    def targets(spans: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """For spans [N, 3] of (b, start, end) (end exclusive), every span token: (span index, b, position)."""
        n = spans[:, 2] - spans[:, 1]
        span = torch.repeat_interleave(torch.arange(len(spans), device=spans.device), n)
        first = torch.cumsum(n, 0) - n
        pos = spans[span, 1] + torch.arange(int(n.sum()), device=spans.device) - first[span]
        return span, spans[span, 0], pos

    def forward(self, h: Tensor, spans: Tensor, word_embeddings: Tensor) -> Tensor:
        """h [B, L, C]; spans [N, 3] with 1 <= start < end < L. Logits [T, V], T = the spans' total length, in
        the order of `targets(spans)`."""
        span, b, pos = self.targets(spans)
        left = h[b, spans[span, 1] - 1]  # the boundary tokens just outside the span
        right = h[b, spans[span, 2]]
        p = self.position((pos - spans[span, 1]).clamp(max=self.max_span - 1))
        x = self.norm1(self.fc1(torch.cat([left, right, p], -1)))
        x = self.norm2(self.fc2(x))
        return F.linear(x, word_embeddings, self.bias)


class SpanBertForPreTraining(BertForMaskedLM):
    """MLM + SBO. forward(input_ids, ..., spans=[N, 3], labels=original ids at masked positions)."""
    config_class = SpanBertConfig
    hf_own = ("sbo.",)

    def __init__(self, config: SpanBertConfig):
        super().__init__(config)
        c = config
        self.sbo = SpanBoundaryHead(c.hidden_size, c.vocab_size, c.max_span_length, c.hidden_act, c.layer_norm_eps)
        init_weights(self.sbo)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                unpad=False, spans: Optional[Tensor] = None, labels=None) -> Output:
        h, packing = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, lengths=lengths,
                                      unpad=unpad)
        word = self.bert.embeddings.word.weight
        logits = unpack(self.mlm(h, word), packing)
        h = unpack(h, packing)
        sbo = None if spans is None else self.sbo(h, spans, word)
        loss = mlm_loss(logits, labels)
        if loss is not None and sbo is not None:
            _, b, pos = SpanBoundaryHead.targets(spans)
            loss = loss + self.config.sbo_weight * F.cross_entropy(sbo.float(), labels[b, pos])
        return Output(last_hidden_state=h, logits=logits, prediction_logits=sbo, loss=loss)
