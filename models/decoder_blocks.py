"""The causal-LM stack every decoder-only model here shares: embeddings, models.blocks.Block's, a final norm,
the LM head, the loss, and the static-shape decode step.

A model file (gpt.py, gpt2.py, gpt3.py, llama.py) composes its Blocks (models.blocks: Attention, MLP) from its
config and maps its config and weights to and from transformers (DecoderLM is a convert.HFTwin).

    masks    an AttentionMask per layer kind (causal, key padding, sliding window), shared by the layers; the
             decode step builds additive [B, 1, 1, max_len] biases from tensors instead (no mask objects)
    cache    a preallocated KVCache: growing for prefill, static (written at a tensor index) for decode steps
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels.attention_mask import AttentionMask
from ptm_kernels.nn import Linear

from .blocks import MLP, Attention, Block, finish
from .convert import HFTwin
from .kv_cache import KVCache


# the blocks live in models.blocks; the old per-family names stay as aliases
CausalSelfAttention = Attention
DecoderBlock = Block


def HFGatedMLP(hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False) -> MLP:
    """LLaMA's gated MLP: the one MLP, gated (kept for the old name)."""
    return MLP(hidden_size, intermediate_size, act, gated=True, bias=bias)


@dataclass
class LMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


def lm_loss(logits: Tensor, labels: Tensor, input_mask: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy: logits at t predict labels at t + 1; labels == -100 (padding) are ignored,
    and so are predictions made at padded inputs (input_mask 0: the first token of a left-padded row)."""
    targets = labels[:, 1:]
    if input_mask is not None:
        targets = targets.masked_fill(~input_mask[:, :-1].bool(), ignore_index)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def causal_masks(windows: Sequence[Optional[int]], attention_mask: Optional[Tensor], Lk: int) -> List[AttentionMask]:
    """Per layer: causal & key padding (from a [B, Lk] 1 = token / 0 = padding mask), & a sliding window of
    `w` keys (the query and w - 1 before it) where windows[i] = w; one mask object per kind, shared by layers."""
    mask = AttentionMask.causal()
    if attention_mask is not None and not bool(attention_mask[:, :Lk].all()):
        mask = mask & AttentionMask.key_padding(mask=attention_mask[:, :Lk].bool())
    kinds = {w: mask if w is None else mask & AttentionMask.sliding_window(w - 1, 0) for w in set(windows)}
    return [kinds[w] for w in windows]


class DecoderLM(HFTwin, nn.Module):
    """Token (+ learned position) embeddings, DecoderBlocks, a final norm (pre-norm models), an LM head.

    `forward(input_ids, attention_mask=None, position_ids=None, labels=None, cache=None)` -> LMOutput.
    attention_mask [B, past + L] (1 = token, 0 = padding, transformers' convention) covers the cache too;
    position_ids default to past + arange(L), as in transformers (left-padded rows: pass them, as
    `generate` does). Subclasses build the parts from their config and call `__init__`.
    """

    def __init__(self, vocab_size: int, hidden_size: int, blocks: Sequence[DecoderBlock],
                 final_norm: Optional[nn.Module], max_positions: Optional[int] = None, embed_dropout: float = 0.0,
                 tie_embeddings: bool = True, windows: Optional[Sequence[Optional[int]]] = None,
                 padding_idx: Optional[int] = None):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx)  # padding row: no gradient
        self.wpe = nn.Embedding(max_positions, hidden_size) if max_positions else None  # learned positions
        self.drop = nn.Dropout(embed_dropout)
        self.blocks = nn.ModuleList(blocks)
        self.norm = final_norm
        self.lm_head = Linear(hidden_size, vocab_size, bias=False)  # ops.linear: the decode step's fast GEMV
        if tie_embeddings:  # one Parameter for both, the embedding's values (its init)
            self.lm_head.weight = self.wte.weight
        self.windows = list(windows) if windows is not None else [None] * len(self.blocks)

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.wte(input_ids)  # [B, L, d]
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        return self.drop(x)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, num_logits_to_keep: int = 0) -> LMOutput:
        """num_logits_to_keep=n > 0: the LM head runs on the last n positions only (prefill needs one)."""
        L = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=input_ids.device) + past).unsqueeze(0)
        x = self.embed(input_ids, position_ids)
        masks = causal_masks(self.windows, attention_mask, past + L)
        residual = None
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, masks[i], position_ids, cache, i)
        if cache is not None:
            cache.advance(L)
        if num_logits_to_keep:
            x, residual = x[:, -num_logits_to_keep:], (residual[:, -num_logits_to_keep:]
                                                       if residual is not None else None)
        logits = self.lm_head(finish(x, residual, self.norm))  # [B, L, V]
        if labels is None:
            return LMOutput(logits)
        input_mask = attention_mask[:, past:past + L] if attention_mask is not None else None
        return LMOutput(logits, lm_loss(logits, labels, input_mask))

    def decode_step(self, input_ids: Tensor, position_ids: Tensor, cache: KVCache,
                    key_mask: Optional[Tensor]) -> Tensor:
        """One decode step: next-token logits [B, V] after input_ids [B, 1] at position_ids [B, 1].

        The token is written to cache column `cache.index` ([1] long); key_mask [B, max_len] (bool) marks the
        columns that hold tokens (False: left padding), None when no row is padded. Two ways to attend:
        - static (cache.filled None): over all max_len columns, those after the index, and outside a layer's
          sliding window, hidden by additive biases built here from tensors: no Python ints change between
          steps, nothing is allocated outside the graph, so torch.compile(fullgraph=True) captures it once;
        - eager (cache.filled = index + 1, a Python int the generate loop sets): over the filled columns only,
          through the fused attention op; a mask only where padding or a window hides some of them.
        """
        x = self.embed(input_ids, position_ids)
        masks = self._step_masks(cache, key_mask)
        residual = None
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, masks[self.windows[i]], position_ids, cache, i)
        return self.lm_head(finish(x, residual, self.norm))[:, -1]

    def _step_masks(self, cache: KVCache, key_mask: Optional[Tensor]) -> dict:
        """decode_step's masks per window size (None: no window), see its docstring."""
        n = cache.filled
        if n is not None:  # eager: the query is the last filled column, every earlier one is a candidate
            cols, last = torch.arange(n, device=cache.k.device), n - 1
            seen = key_mask[:, :n] if key_mask is not None else None
        else:  # static: the columns after the index are not written yet
            cols, last = torch.arange(cache.max_len, device=cache.k.device), cache.index
            seen = cols <= last if key_mask is None else key_mask & (cols <= last)
        masks = {}
        for w in set(self.windows):
            keep = seen
            if w is not None and (n is None or n > w):
                inside = cols > last - w
                keep = inside if keep is None else keep & inside
            if keep is None:
                masks[w] = None
                continue
            bias = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill(~keep, float("-inf"))
            bias = bias.view(-1, 1, 1, keep.shape[-1])  # [B or 1, 1, 1, columns]
            masks[w] = bias if n is None else AttentionMask.bias(bias)
        return masks

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        attn = self.blocks[0].attn
        p = self.wte.weight
        return KVCache(len(self.blocks), batch_size, attn.num_kv_heads, max_len, attn.head_dim, p.dtype, p.device)

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See models.generation.generate."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)
