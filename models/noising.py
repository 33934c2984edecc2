"""The corruptions encoder-decoder models pre-train on, one token sequence (1-D LongTensor) at a time:

    t5_span_corruption     T5: 15% of the tokens in spans of mean length 3; each span becomes one sentinel in
                           the input, and the target lists sentinel + span for every span
    bart_text_infilling    BART: spans with Poisson(3) lengths cover 30% of the tokens; each span, including
                           zero-length ones (an insertion), becomes a single mask token
    bart_sentence_permutation   BART: the sentences (split after each end-of-sentence token) in random order
    mass_fragment_mask     MASS: one contiguous fragment (50%) masked in the encoder input, predicted by the decoder

Randomness comes from a torch.Generator, so a seed reproduces a corruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------------- T5


def _random_segmentation(n_items: int, n_segments: int, generator=None) -> Tensor:
    """Lengths of a uniformly random split of n_items into n_segments positive parts."""
    cuts = torch.randperm(n_items - 1, generator=generator)[: n_segments - 1].sort().values + 1
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_items])])
    return bounds.diff()


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """T5's noise mask (t5.data.preprocessors.random_spans_noise_mask): bool [length] with
    round(length * noise_density) noisy tokens in round(noisy / mean_span_length) spans; noise and non-noise
    lengths are random segmentations, interleaved starting with non-noise."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)
    noise = _random_segmentation(n_noise, n_spans, generator)
    keep = _random_segmentation(length - n_noise, n_spans, generator)
    mask = torch.zeros(length, dtype=torch.bool)
    pos = 0
    for k, nz in zip(keep.tolist(), noise.tolist()):
        pos += k
        mask[pos:pos + nz] = True
        pos += nz
    return mask


def sentinel_id(i: int, vocab_size: int) -> int:
    """T5's i-th sentinel <extra_id_i>: vocab_size - 1 - i (extra_id_0 is the last id of the vocabulary)."""
    return vocab_size - 1 - i


def t5_span_corruption(tokens: Tensor, vocab_size: int, noise_density: float = 0.15,
                       mean_span_length: float = 3.0, eos_token_id: Optional[int] = 1,
                       generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """(inputs, targets): each noise span replaced by the next sentinel in the input; the target is
    sentinel_0 span_0 sentinel_1 span_1 ...; both end with eos (unless eos_token_id is None).

    vocab_size is the tokenizer's (32100 for T5: <extra_id_0> = 32099), not the padded embedding size."""
    mask = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, generator)
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])  # the first token of each noise span
    span = starts.long().cumsum(0) - 1  # the span of each noise token
    sentinels = (vocab_size - 1 - span).to(tokens.dtype)
    inputs = torch.where(starts, sentinels, tokens)[~mask | starts]  # a span -> its sentinel
    # targets: each span's sentinel, then its tokens (row-major over (sentinel, token) pairs of noise tokens,
    # keeping the sentinel only before a span's first token)
    pairs = torch.stack([sentinels, tokens], 1)[mask]
    keep = torch.stack([starts, mask], 1)[mask]
    targets = pairs[keep]
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id], dtype=tokens.dtype)
        inputs, targets = torch.cat([inputs, eos]), torch.cat([targets, eos])
    return inputs.to(tokens.dtype), targets.to(tokens.dtype)


# -------------------------------------------------------------------------------------------------- BART


@dataclass
class Infilling:
    tokens: Tensor  # the corrupted sequence
    spans: List[Tuple[int, int]]  # (start in the original, length) of every span, zero-length ones included


def bart_text_infilling(tokens: Tensor, mask_token_id: int, mask_ratio: float = 0.3, poisson_lambda: float = 3.0,
                        generator: Optional[torch.Generator] = None) -> Infilling:
    """Spans with Poisson(poisson_lambda) lengths drawn until they cover ceil(mask_ratio * n) tokens (the last
    one cut to fit), placed at random without overlapping; each becomes one mask token. A zero-length span
    inserts a mask token. Spans may touch (their masks then sit side by side)."""
    n = len(tokens)
    budget = math.ceil(n * mask_ratio)
    rate = torch.tensor([poisson_lambda])
    lengths: List[int] = []
    while sum(lengths) < budget:
        lengths.append(int(torch.poisson(rate, generator=generator).item()))
    if lengths:
        lengths[-1] -= sum(lengths) - budget
    # place the spans in the gaps around the n - budget kept tokens: gap g precedes kept token g
    n_keep = n - budget
    gaps = torch.randint(0, n_keep + 1, (len(lengths),), generator=generator).sort().values.tolist()
    out, spans, pos, s = [], [], 0, 0
    for g in range(n_keep + 1):
        while s < len(lengths) and gaps[s] == g:
            spans.append((pos, lengths[s]))
            out.append(mask_token_id)
            pos += lengths[s]
            s += 1
        if g < n_keep:
            out.append(int(tokens[pos]))
            pos += 1
    return Infilling(torch.tensor(out, dtype=tokens.dtype), spans)


def bart_sentence_permutation(tokens: Tensor, end_token_ids: Sequence[int],
                              generator: Optional[torch.Generator] = None) -> Tensor:
    """The sentences of `tokens` (each ends after a token in end_token_ids; a trailing part without one is a
    sentence too) in a random order."""
    ends = torch.isin(tokens, torch.tensor(list(end_token_ids), dtype=tokens.dtype)).nonzero().flatten() + 1
    bounds = [0] + ends.tolist()
    if bounds[-1] != len(tokens):
        bounds.append(len(tokens))
    sentences = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    order = torch.randperm(len(sentences), generator=generator).tolist()
    return torch.cat([sentences[i] for i in order]) if sentences else tokens


# -------------------------------------------------------------------------------------------------- MASS


@dataclass
class MassExample:
    encoder_input: Tensor  # the sentence, fragment masked
    decoder_input: Tensor  # [mask] + fragment[:-1]
    decoder_positions: Tensor  # the fragment's positions in the sentence
    labels: Tensor  # the fragment
    start: int


def mass_fragment_mask(tokens: Tensor, mask_token_id: int, vocab_size: int, fragment_ratio: float = 0.5,
                       mask_prob: float = 0.8, random_prob: float = 0.1,
                       generator: Optional[torch.Generator] = None) -> MassExample:
    """MASS (Song et al., 2019): a random contiguous fragment of round(n * fragment_ratio) tokens; in the
    encoder input its tokens become the mask token (mask_prob), a random token (random_prob) or stay; the
    decoder sees the fragment shifted right behind a mask token, at the fragment's positions, and predicts it."""
    n = len(tokens)
    k = min(max(int(round(n * fragment_ratio)), 1), n)
    start = int(torch.randint(0, n - k + 1, (1,), generator=generator))
    frag = tokens[start:start + k]
    r = torch.rand(k, generator=generator)
    random_tokens = torch.randint(0, vocab_size, (k,), generator=generator, dtype=tokens.dtype)
    noised = torch.where(r < mask_prob, torch.full_like(frag, mask_token_id),
                         torch.where(r < mask_prob + random_prob, random_tokens, frag))
    enc = tokens.clone()
    enc[start:start + k] = noised
    dec = torch.cat([tokens.new_tensor([mask_token_id]), frag[:-1]])
    return MassExample(enc, dec, torch.arange(start, start + k), frag.clone(), start)
