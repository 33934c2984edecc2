"""UniLM (Dong et al., 2019): one BERT, three language-model objectives chosen by the self-attention mask.

    bidirectional   every token sees every (real) token                 BERT's MLM / NLU
    left_to_right   token i sees tokens j <= i                          GPT-style LM
    seq2seq         source tokens see the whole source; target token i  encoder-decoder style generation
                    sees the source and the target up to itself

Each mode is an analytic AttentionMask (no [L, L] tensor): seq2seq is prefix_lm(source_length). Padding is a
key-padding part when every sequence is right-padded, else a segments part (real tokens id 1, padding id 0),
which also covers the UniLM layout [source, source padding, target, target padding].
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ptm_kernels import AttentionMask

from .bert import BertForMaskedLM, BertModel
from .encoder import Output

MODES = ("bidirectional", "left_to_right", "seq2seq")


def unilm_mask(mode: str, attention_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
               source_lengths=None) -> AttentionMask:
    if mode == "bidirectional":
        mask = AttentionMask()
    elif mode == "left_to_right":
        mask = AttentionMask.causal()
    elif mode == "seq2seq":
        if source_lengths is None:
            raise ValueError("seq2seq mode needs source_lengths (the length of the bidirectional source part, "
                             "its padding included)")
        mask = AttentionMask.prefix_lm(source_lengths)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if lengths is not None:
        return mask & AttentionMask.key_padding(lengths=lengths)
    if attention_mask is not None:
        real = attention_mask.bool()
        n = real.sum(-1, keepdim=True)
        if torch.equal(real, torch.arange(real.shape[1], device=real.device) < n):  # right padding: lengths
            return mask & AttentionMask.key_padding(lengths=n.squeeze(-1))
        return mask & AttentionMask.segments(real.long())  # padding anywhere: real tokens see real tokens
    return mask


class UniLMModel(BertModel):
    """BERT with a `mode` argument (and `source_lengths` for seq2seq)."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                mode: str = "bidirectional", source_lengths=None, mask: Optional[AttentionMask] = None) -> Output:
        if mask is None:
            mask = unilm_mask(mode, attention_mask, lengths, source_lengths)
        return super().forward(input_ids, token_type_ids=token_type_ids, position_ids=position_ids, mask=mask)


class UniLMForMaskedLM(BertForMaskedLM):
    """The UniLM pre-training model: BERT's MLM head under any of the three masks. `from_hf` takes a
    transformers BertForMaskedLM (UniLM starts from BERT's weights). With labels: the loss only, logits=None
    (heads.MaskedLM)."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *, lengths=None,
                mode: str = "bidirectional", source_lengths=None, mask: Optional[AttentionMask] = None,
                labels=None) -> Output:
        if mask is None:
            mask = unilm_mask(mode, attention_mask, lengths, source_lengths)
        return super().forward(input_ids, token_type_ids=token_type_ids, position_ids=position_ids, mask=mask,
                               labels=labels)
