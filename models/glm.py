"""GLM (Du et al., 2021): autoregressive blank infilling with one Transformer.

Spans of the text are blanked out: part A is the corrupted text (each span replaced by one [MASK]); part B
holds the spans in a random order, each opened by [START] ([S]) and predicted token by token, the last
target being [END] ([E]). Part A attends bidirectionally within A; part B attends to all of A and causally
to B: exactly a prefix-LM mask with prefix |A|, `AttentionMask.prefix_lm(|A|)` (never a dense mask).

2D positional encoding: every token gets (its position in the corrupted text A, its position inside its
span): part A tokens (i, 0); the tokens of a span blanked at A's [MASK] position p get (p, 1), (p, 2), ...
Two learned embeddings of these are added to the token embedding.

The network is GLM's: pre-norm LayerNorm blocks (the paper's rearranged norm/residual order), GELU MLP,
a final LayerNorm, and output logits through the word embeddings (tied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask
from ptm_kernels.nn import LayerNorm

from .decoder_blocks import MLP, CausalSelfAttention, DecoderBlock, LMOutput
from .generation import sample_next
from .kv_cache import KVCache


@dataclass
class GLMConfig:
    vocab_size: int = 30592
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: Optional[int] = None  # 4 * hidden_size
    max_sequence_length: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"  # GLM uses Megatron's tanh GELU (a name of models.activations)


class GLM(nn.Module):
    """`forward(input_ids, position_ids, prefix_lengths, labels=None)`: input_ids [B, L]; position_ids
    [B, 2, L] (position in A, position in span); prefix_lengths [B] = |A| per row (padding after part B
    needs no mask: no real token sees keys after itself in part B). labels [B, L] are aligned with the
    inputs (the token to predict at each part-B position; -100 elsewhere); with labels the output layer runs
    on the labelled rows only, fused with the loss (ptm_kernels.linear_cross_entropy), and logits is None."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        c = self.config = config
        d = c.hidden_size
        self.wte = nn.Embedding(c.vocab_size, d)
        self.wpe = nn.Embedding(c.max_sequence_length, d)  # position in the corrupted text
        self.wbpe = nn.Embedding(c.max_sequence_length, d)  # position inside the span (block position)
        self.drop = nn.Dropout(c.hidden_dropout)
        self.blocks = nn.ModuleList(DecoderBlock(
            CausalSelfAttention(d, c.num_heads, dropout=c.attention_dropout),
            MLP(d, c.intermediate_size or 4 * d, c.activation),
            LayerNorm(d, c.layer_norm_epsilon), LayerNorm(d, c.layer_norm_epsilon),
            pre_norm=True, resid_dropout=c.hidden_dropout) for _ in range(c.num_layers))
        self.norm = LayerNorm(d, c.layer_norm_epsilon)

    def forward(self, input_ids: Tensor, position_ids: Tensor, prefix_lengths: Tensor,
                labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                cache: Optional[KVCache] = None) -> LMOutput:
        L = input_ids.shape[1]
        Lk = L + (cache.length if cache is not None else 0)
        x = self.wte(input_ids) + self.wpe(position_ids[:, 0]) + self.wbpe(position_ids[:, 1])
        x = self.drop(x)
        mask = AttentionMask.prefix_lm(prefix_lengths)  # with a cache, bottom-right: new queries are last
        if attention_mask is not None and not bool(attention_mask[:, :Lk].all()):  # left-padded part A
            mask = mask & AttentionMask.key_padding(mask=attention_mask[:, :Lk].bool())
        residual = None
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, mask, None, cache, i)
        x, _ = self.norm(x, residual=residual)
        if cache is not None:
            cache.advance(L)
        if labels is not None:  # the tied output layer on the labelled (part B) rows only, fused with the loss
            labelled = labels != -100
            return LMOutput(None, pk.linear_cross_entropy(x[labelled], self.wte.weight, labels[labelled]))
        return LMOutput(F.linear(x, self.wte.weight), None)  # tied output layer

    @torch.no_grad()
    def fill_blank(self, input_ids: Tensor, mask_positions: Tensor, max_new_tokens: int, sop_id: int,
                   eop_id: Optional[int] = None, attention_mask: Optional[Tensor] = None, pad_token_id: int = 0,
                   use_cache: bool = True, **sampling) -> Tensor:
        """Generate the span of one blank per row: part A input_ids [B, P] (left padded, attention_mask 1 =
        token), mask_positions [B] the [MASK]'s position in each row's text (padding not counted). Decodes
        part B = [S] x1 x2 ... with 2D positions (mask position, 1, 2, ...) until eop_id or max_new_tokens;
        returns the span tokens [B, max_new_tokens] (pad_token_id after eop). `sampling`: see sample_next.
        """
        B, P = input_ids.shape
        dev = input_ids.device
        total = P + 1 + max_new_tokens
        mask = torch.ones(B, total, dtype=torch.bool, device=dev)
        if attention_mask is not None:
            mask[:, :P] = attention_mask.bool()
        tokens = torch.full((B, total), pad_token_id, dtype=input_ids.dtype, device=dev)
        tokens[:, :P], tokens[:, P] = input_ids, sop_id
        pos = torch.zeros(B, 2, total, dtype=torch.long, device=dev)
        pos[:, 0, :P] = (mask[:, :P].long().cumsum(-1) - 1).clamp(min=0)
        pos[:, 0, P:] = mask_positions.view(B, 1)
        pos[:, 1, P:] = torch.arange(1, total - P + 1, device=dev)
        prefix = torch.full((B,), P, dtype=torch.long, device=dev)
        cache = KVCache(len(self.blocks), B, self.config.num_heads, total, self.config.hidden_size //
                        self.config.num_heads, self.wte.weight.dtype, dev) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        start = 0
        for t in range(P + 1, total):
            s = start if use_cache else 0
            logits = self(tokens[:, s:t], pos[:, :, s:t], prefix, attention_mask=mask[:, :t],
                          cache=cache).logits[:, -1]
            start = t
            nxt = sample_next(logits, **sampling).masked_fill(finished, pad_token_id)
            if eop_id is not None:
                finished |= nxt == eop_id
            tokens[:, t] = nxt
            if bool(finished.all()):
                break
        return tokens[:, P + 1:]


# ------------------------------------------------------------------------------ blank-infilling corruption


def sample_spans(n: int, mask_ratio: float = 0.15, poisson_lambda: float = 3.0,
                 generator: Optional[torch.Generator] = None) -> List[tuple]:
    """Non-overlapping spans [(start, end)] of a text of n tokens: lengths drawn from Poisson(lambda)
    (at least 1) until they cover mask_ratio of the text, placed uniformly at random, sorted."""
    budget = max(1, round(mask_ratio * n))
    lengths = []
    while sum(lengths) < budget:
        length = max(1, int(torch.poisson(torch.tensor(float(poisson_lambda)), generator=generator)))
        lengths.append(min(length, budget - sum(lengths)))  # the last span stops at the budget
    order = torch.randperm(len(lengths), generator=generator).tolist()
    lengths = [lengths[i] for i in order]
    # stars and bars: choose where the spans go among the n - covered unmasked tokens
    free = n - sum(lengths)
    slots = sorted(torch.randperm(free + len(lengths), generator=generator)[: len(lengths)].tolist())
    spans, covered = [], 0
    for k, (slot, length) in enumerate(zip(slots, lengths)):
        start = slot - k + covered  # slot - k unmasked tokens and `covered` span tokens come before
        spans.append((start, start + length))
        covered += length
    return spans


def blank_infilling(tokens: Sequence[int], mask_id: int, sop_id: int, eop_id: int, mask_ratio: float = 0.15,
                    poisson_lambda: float = 3.0, generator: Optional[torch.Generator] = None,
                    spans: Optional[List[tuple]] = None) -> Dict[str, Tensor]:
    """One training example: {input_ids [L], position_ids [2, L], labels [L], prefix_length}.

    input_ids = part A (text with each span replaced by mask_id) + part B (for each span, shuffled:
    sop_id and the span's tokens); labels = -100 on part A, on part B the span's tokens then eop_id.
    """
    tokens = [int(t) for t in tokens]
    if spans is None:
        spans = sample_spans(len(tokens), mask_ratio, poisson_lambda, generator)
    part_a, mask_positions, prev = [], [], 0
    for start, end in spans:
        part_a += tokens[prev:start]
        mask_positions.append(len(part_a))
        part_a.append(mask_id)
        prev = end
    part_a += tokens[prev:]

    ids, pos, block_pos, labels = list(part_a), list(range(len(part_a))), [0] * len(part_a), [-100] * len(part_a)
    for k in torch.randperm(len(spans), generator=generator).tolist():  # part B: spans in a random order
        start, end = spans[k]
        span = tokens[start:end]
        ids += [sop_id] + span
        labels += span + [eop_id]
        pos += [mask_positions[k]] * (len(span) + 1)
        block_pos += list(range(1, len(span) + 2))
    return dict(input_ids=torch.tensor(ids), position_ids=torch.tensor([pos, block_pos]),
                labels=torch.tensor(labels), prefix_length=len(part_a))


def collate(examples: Sequence[Dict[str, Tensor]], pad_id: int = 0) -> Dict[str, Tensor]:
    """Right-pad examples into a batch: input_ids [B, L], position_ids [B, 2, L], labels, prefix_lengths [B]."""
    L = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    pos = torch.zeros(B, 2, L, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], pos[b, :, :n], labels[b, :n] = e["input_ids"], e["position_ids"], e["labels"]
    return dict(input_ids=ids, position_ids=pos, labels=labels,
                prefix_lengths=torch.tensor([e["prefix_length"] for e in examples]))
