"""Incremental decoding with a preallocated KV cache: greedy, or sampling with temperature / top-k / top-p.

The prompt runs once (Lq = prompt length) and fills the cache; each new token then runs with Lq = 1 against
the cache, through the same fused attention (its bottom-right causal mask needs no offset). Prompts of
different lengths are left padded: padded keys are hidden by a key-padding mask and each row's positions
count its own tokens only, so every row decodes as it would alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def left_pad(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int = 0):
    """Move each row's tokens (attention_mask 1) to the right end, in order: the batch becomes left padded."""
    order = attention_mask.int().sort(dim=1, stable=True).indices  # padding first, then the tokens in order
    mask = attention_mask.gather(1, order)
    return input_ids.gather(1, order), mask


def sample_next(logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token of each row from logits [B, V]: argmax, or a draw after temperature, top-k, top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, attention_mask: Optional[Tensor] = None, *,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None, pad_token_id: int = 0,
             generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
    """Continue each prompt by max_new_tokens tokens; returns [B, P + max_new_tokens] (prompts left padded).

    attention_mask [B, P]: 1 = token, 0 = padding (left or right: right padding is moved left first).
    Rows that emitted eos_token_id continue with pad_token_id. `use_cache=False` recomputes the whole
    sequence at every step (the check that cached decoding changes nothing).
    """
    B, P = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    input_ids, prompt_mask = left_pad(input_ids, attention_mask.bool(), pad_token_id)
    total = P + max_new_tokens
    mask = torch.ones(B, total, dtype=torch.bool, device=input_ids.device)
    mask[:, :P] = prompt_mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # each row counts its own tokens
    tokens = torch.full((B, total), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    tokens[:, :P] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)

    cache = model.new_cache(B, total) if use_cache else None
    start = 0
    for t in range(P, total):
        # with a cache, feed only what it has not seen; without, the whole sequence so far
        s = start if use_cache else 0
        logits = model(tokens[:, s:t], attention_mask=mask[:, :t], position_ids=positions[:, s:t],
                       cache=cache).logits[:, -1]
        start = t
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(finished, pad_token_id)
            finished |= nxt == eos_token_id
        tokens[:, t] = nxt
        if eos_token_id is not None and bool(finished.all()):
            return tokens[:, : t + 1]
    return tokens
