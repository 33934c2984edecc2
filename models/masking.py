"""Input corruption for encoder pre-training: what to mask, and what to put there.

Selection (which positions are predicted), each returning a bool [B, L]:
    mlm_select          each non-special token with probability 0.15 (BERT, RoBERTa)
    whole_word_select   whole words with probability 0.15 (BERT-wwm)
    ngram_select        whole n-grams of words, n ~ 1/n up to max_n (ERNIE / ALBERT n-gram masking)
    span_select         SpanBERT: spans of words, length ~ Geometric(0.2) clipped at 10, until 15% of tokens
Replacement: `mask_tokens` (80% [MASK], 10% random token, 10% unchanged; per token, or per span via groups).
Pairs: `nsp_pairs` (BERT: 50% the next segment, 50% a random one) and `sop_pairs` (ALBERT: 50% swapped).
ELECTRA: `electra_replace` samples the generator's predictions into the masked positions and labels which
tokens were replaced (a sample equal to the original counts as original, as in the paper).

`word_ids` [B, L] gives each token's word index in its sequence (-1 for special tokens and padding); the
selections never pick a position whose word id is -1 (or, for mlm_select, a special token).
All randomness comes from a torch.Generator when one is given.
"""

from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

IGNORE = -100  # label of positions that are not predicted (cross_entropy's ignore_index)


# ------------------------------------------------------------------------------------------- selection


def special_tokens_mask(input_ids: Tensor, special_ids: Sequence[int]) -> Tensor:
    """True where the token is one of special_ids ([CLS], [SEP], [PAD], ...)."""
    return torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))


def mlm_select(input_ids: Tensor, special_mask: Tensor, prob: float = 0.15,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Each non-special token independently with probability `prob`."""
    r = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return (r < prob) & ~special_mask


def whole_word_select(word_ids: Tensor, prob: float = 0.15, generator: Optional[torch.Generator] = None) -> Tensor:
    """Each word with probability `prob`; a chosen word is selected with all its sub-word tokens."""
    B, L = word_ids.shape
    r = torch.rand(B, L + 1, generator=generator, device=word_ids.device)  # one draw per word index
    return (r.gather(1, word_ids.clamp(min=0)) < prob) & (word_ids >= 0)


def _word_spans(word_ids_row: Tensor) -> List[Tuple[int, int]]:
    """(first token, end token) of each word of one sequence, in order (word ids must be increasing)."""
    ids = word_ids_row.tolist()
    spans, start = [], None
    for t, w in enumerate(ids + [-2]):
        if start is not None and w != ids[start]:
            spans.append((start, t))
            start = None
        if start is None and 0 <= w:
            start = t
    return spans


def _select_spans(word_ids: Tensor, budget_prob: float, sample_len, rng: random.Random):
    """Shared loop: spans of consecutive words, lengths from sample_len(), random non-overlapping starts, until
    budget_prob of the tokens are selected. Returns (selected [B, L], spans [N, 3] of (b, start, end))."""
    B, L = word_ids.shape
    selected = torch.zeros(B, L, dtype=torch.bool)
    spans = []
    for b in range(B):
        words = _word_spans(word_ids[b].cpu())
        n_tokens = sum(e - s for s, e in words)
        budget = max(1, round(budget_prob * n_tokens)) if words else 0
        used = [False] * len(words)
        count, tries = 0, 0
        while count < budget and tries < 100 + 10 * len(words):
            tries += 1
            n = sample_len()
            free = [i for i in range(len(words) - n + 1) if not any(used[i:i + n])]
            if not free:  # no room for this length: draw another
                continue
            start = rng.choice(free)
            end = start + n
            while end - start > 1 and count + words[end - 1][1] - words[start][0] > budget:
                end -= 1  # the last span stops at the budget (as SpanBERT's implementation does)
            used[start:end] = [True] * (end - start)
            selected[b, words[start][0]:words[end - 1][1]] = True
            spans.append((b, words[start][0], words[end - 1][1]))
            count += words[end - 1][1] - words[start][0]
    spans = torch.tensor(spans, dtype=torch.long).view(-1, 3)
    return selected.to(word_ids.device), spans.to(word_ids.device)


def ngram_select(word_ids: Tensor, prob: float = 0.15, max_n: int = 3, seed: Optional[int] = None):
    """N-gram masking over whole words: n in 1..max_n with p(n) proportional to 1/n (ALBERT's recipe),
    until `prob` of the tokens are selected. Returns (selected [B, L], spans [N, 3] of (b, start, end))."""
    rng = random.Random(seed)
    weights = [1.0 / n for n in range(1, max_n + 1)]
    return _select_spans(word_ids, prob, lambda: rng.choices(range(1, max_n + 1), weights)[0], rng)


def geometric_span_lengths(p: float = 0.2, max_len: int = 10) -> List[float]:
    """SpanBERT's span-length distribution: Geometric(p) on 1..max_len, renormalised (mean 3.8 for 0.2, 10)."""
    w = [p * (1 - p) ** (n - 1) for n in range(1, max_len + 1)]
    return [x / sum(w) for x in w]


def span_select(word_ids: Tensor, prob: float = 0.15, p: float = 0.2, max_len: int = 10,
                seed: Optional[int] = None):
    """SpanBERT span masking: span lengths (in words) ~ Geometric(p) clipped at max_len, random starts on
    word boundaries, until `prob` of the tokens are selected. Returns (selected [B, L], spans [N, 3])."""
    rng = random.Random(seed)
    dist = geometric_span_lengths(p, max_len)
    return _select_spans(word_ids, prob, lambda: rng.choices(range(1, max_len + 1), dist)[0], rng)


# ----------------------------------------------------------------------------------------- replacement


def mask_tokens(input_ids: Tensor, selected: Tensor, mask_token_id: int, vocab_size: int,
                mask_prob: float = 0.8, random_prob: float = 0.1, groups: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """BERT's replacement of the selected positions: `mask_prob` [MASK], `random_prob` a random token, the
    rest unchanged. With `groups` ([B, L] ints in [0, L], e.g. a span index), tokens of one group share the
    decision (SpanBERT replaces whole spans). Returns (corrupted ids, labels: the original ids at the selected
    positions, IGNORE elsewhere)."""
    B, L = input_ids.shape
    dev = input_ids.device
    r = torch.rand(B, L + 1, generator=generator, device=dev)
    r = r[:, :L] if groups is None else r.gather(1, groups)
    to_mask = selected & (r < mask_prob)
    to_random = selected & (r >= mask_prob) & (r < mask_prob + random_prob)
    rand = torch.randint(vocab_size, (B, L), generator=generator, device=dev)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, rand, corrupted)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    return corrupted, labels


def span_groups(spans: Tensor, B: int, L: int) -> Tensor:
    """[B, L] group ids for mask_tokens: 1 + the span's index within its row (0 outside spans)."""
    groups = torch.zeros(B, L, dtype=torch.long, device=spans.device)
    for k, (b, s, e) in enumerate(spans.tolist()):
        groups[b, s:e] = 1 + k % L  # ids only need to differ between neighbouring spans of one row
    return groups


def mlm_corrupt(input_ids: Tensor, mask_token_id: int, vocab_size: int, special_ids: Sequence[int],
                prob: float = 0.15, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """BERT/RoBERTa MLM in one call: mlm_select + mask_tokens (80/10/10)."""
    selected = mlm_select(input_ids, special_tokens_mask(input_ids, special_ids), prob, generator)
    return mask_tokens(input_ids, selected, mask_token_id, vocab_size, generator=generator)


# --------------------------------------------------------------------------------------- sentence pairs


def nsp_pairs(documents: Sequence[Sequence[Sequence[int]]], seed: Optional[int] = None):
    """Next sentence prediction pairs from documents (lists of sentences of token ids): for each pair of
    consecutive sentences (a, b), keep b with probability 1/2 (label 0, "is next") or replace it with a
    sentence of another document (label 1), as transformers' BertForPreTraining labels them."""
    rng = random.Random(seed)
    out = []
    for d, doc in enumerate(documents):
        for a, b in zip(doc[:-1], doc[1:]):
            if rng.random() < 0.5 or len(documents) < 2:
                out.append((list(a), list(b), 0))
            else:
                other = rng.choice([i for i in range(len(documents)) if i != d])
                out.append((list(a), list(rng.choice(documents[other])), 1))
    return out


def sop_pairs(documents: Sequence[Sequence[Sequence[int]]], seed: Optional[int] = None):
    """ALBERT's sentence order prediction: consecutive segments (a, b) in order (label 0) or swapped (label 1),
    each with probability 1/2; both segments always come from the same document."""
    rng = random.Random(seed)
    out = []
    for doc in documents:
        for a, b in zip(doc[:-1], doc[1:]):
            out.append((list(a), list(b), 0) if rng.random() < 0.5 else (list(b), list(a), 1))
    return out


# --------------------------------------------------------------------------------------------- ELECTRA


def electra_replace(generator_logits: Tensor, input_ids: Tensor, selected: Tensor, temperature: float = 1.0,
                    generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Replaced-token detection inputs: at the selected positions, a token sampled from the generator's
    softmax(logits / temperature) (no gradient flows through the sample); elsewhere the original.
    generator_logits: [B, L, V], or [N, V] at the selected positions only (in row-major order).
    Returns (discriminator input ids, is_replaced labels [B, L] long: 1 where the token differs)."""
    with torch.no_grad():
        rows = generator_logits if generator_logits.dim() == 2 else generator_logits[selected]
        logits = rows.float() / temperature
        probs = torch.softmax(logits, -1)
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1) if probs.numel() else \
            input_ids.new_empty(0)
        disc = input_ids.clone()
        disc[selected] = sampled.to(input_ids.dtype)
        return disc, (disc != input_ids).long()
