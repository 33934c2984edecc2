"""The pieces every decoder-only model here shares: attention, MLPs, the block, and the causal-LM stack.

A model file (gpt.py, gpt2.py, gpt3.py, llama.py) picks the pieces from its config and maps its config and weights
to and from transformers (DecoderLM is a convert.HFTwin); everything that runs is here, on ptm_kernels ops:

    attention   ptm_kernels.attention with an AttentionMask (causal, key padding, sliding window), GQA, and a
                KVCache (bottom-right causal lines Lq new queries up with the end of the cache)
    norms       layer_norm / rms_norm with residual= : pre-norm blocks carry the residual stream through the
                fused "add, then normalize" (each norm returns (normalized, x + residual))
    MLPs        Linear without bias + the activation with its bias fused (GPT, GPT-2, GPT-Neo), LLaMA's gated MLP
                (swiglu / geglu); activations by transformers' name from models.activations
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask
from ptm_kernels.nn import GatedMLP

from . import activations
from .convert import HFTwin
from .kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    """One fused qkv projection, optional rotary embedding, the fused attention, an output projection.

    qkv's rows are [q heads | k heads | v heads] (num_heads + 2 * num_kv_heads heads of head_dim).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qkv_bias: bool = True, out_bias: bool = True,
                 scale: Optional[float] = None, dropout: float = 0.0, rotary: Optional[nn.Module] = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale, self.dropout = scale, dropout
        n = self.num_heads + 2 * self.num_kv_heads
        self.qkv = nn.Linear(hidden_size, n * self.head_dim, bias=qkv_bias)
        self.out = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=out_bias)
        self.rotary = rotary  # a RotaryEmbedding shared by the layers (its buffers are not in the state dict)

    def forward(self, x: Tensor, mask: AttentionMask, position_ids: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        B, L, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        # [B, L, heads, D] -> [B, heads, L, D] views with a unit last stride: the ops read them in place
        q, k, v = self.qkv(x).view(B, L, H + 2 * Hk, D).transpose(1, 2).split([H, Hk, Hk], dim=1)
        if self.rotary is not None:
            q, k = self.rotary(q, k, position_ids=position_ids)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = pk.attention(q, k, v, mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, H * D))


class MLP(nn.Module):
    """proj(act(fc(x) + fc_bias)), act by transformers' name (models.activations): fc runs without its bias,
    which the activation adds in the same pass (bias_gelu for the GELU family)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu_new"):
        super().__init__()
        self.fc = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc_bias = nn.Parameter(torch.zeros(intermediate_size))
        self.proj = nn.Linear(intermediate_size, hidden_size)
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(activations.bias_apply(self.fc(x), self.fc_bias, self.act))


class HFGatedMLP(GatedMLP):
    """LLaMA's gated MLP down(act(gate(x)) * up(x)) with any activation of models.activations by transformers'
    name (fused swiglu / geglu for SiLU / GELU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__(hidden_size, intermediate_size, bias=bias)
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(activations.gated_apply(self.gate_proj(x), self.up_proj(x), self.act))


class DecoderBlock(nn.Module):
    """attention + MLP with residuals, pre-norm (GPT-2, GPT-Neo, LLaMA) or post-norm (GPT).

    `forward(x, residual, ...)` -> (x, residual). Pre-norm: x is the last sub-layer's output not yet added to
    the residual stream; the next norm adds and normalizes in one op (None residual at the first block).
    Post-norm: x is the normalized stream and residual stays None.
    """

    def __init__(self, attn: CausalSelfAttention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module,
                 pre_norm: bool = True, resid_dropout: float = 0.0):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.pre_norm = pre_norm
        self.drop = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, residual: Optional[Tensor], mask: AttentionMask,
                position_ids: Optional[Tensor] = None, cache: Optional[KVCache] = None, layer: int = 0):
        if self.pre_norm:
            h, residual = self.norm1(x, residual=residual) if residual is not None else (self.norm1(x), x)
            h, residual = self.norm2(self.drop(self.attn(h, mask, position_ids, cache, layer)), residual=residual)
            return self.drop(self.mlp(h)), residual
        h, _ = self.norm1(self.drop(self.attn(x, mask, position_ids, cache, layer)), residual=x)
        h, _ = self.norm2(self.drop(self.mlp(h)), residual=h)
        return h, None


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
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.windows = list(windows) if windows is not None else [None] * len(self.blocks)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                cache: Optional[KVCache] = None) -> LMOutput:
        L = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=input_ids.device) + past).unsqueeze(0)
        x = self.wte(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        x = self.drop(x)
        masks = causal_masks(self.windows, attention_mask, past + L)
        residual = None
        for i, block in enumerate(self.blocks):
            x, residual = block(x, residual, masks[i], position_ids, cache, i)
        if self.norm is not None:
            x = self.norm(x, residual=residual)[0] if residual is not None else self.norm(x)
        if cache is not None:
            cache.advance(L)
        logits = self.lm_head(x)
        if labels is None:
            return LMOutput(logits)
        input_mask = attention_mask[:, past:past + L] if attention_mask is not None else None
        return LMOutput(logits, lm_loss(logits, labels, input_mask))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        attn = self.blocks[0].attn
        p = self.wte.weight
        return KVCache(len(self.blocks), batch_size, attn.num_kv_heads, max_len, attn.head_dim, p.dtype, p.device)

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See models.generation.generate."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)
