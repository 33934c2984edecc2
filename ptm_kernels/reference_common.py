"""What the reference attention kernels (reference_kernels.py, reference_relative.py) share: a mask's
visibility as a dense tensor, the dropout keep-mask, and the placeholder for an absent result."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernel_params import Visibility


def empty_stats(x: Tensor) -> Tensor:
    """The placeholder returned for a result that does not exist (custom ops cannot return None)."""
    return x.new_empty(0)


def attention_mask_dense(B: int, H: int, Lq: int, Lk: int, device, vis: Visibility,
                         rows: Optional[Tensor] = None) -> Tensor:
    """The visibility of every (b, h, i, j) as a bool [B, H, Lq, Lk] tensor (reference only: it is O(L^2)).

    rows: int [B|1, Lq], each query row's index in key coordinates; default i + Lk - Lq (relative
    attention's query stream passes the positions of its predicted tokens). The block map is not used.
    """
    if rows is None:
        rows = torch.arange(Lq, device=device).view(1, Lq) + (Lk - Lq)
    i = rows.view(rows.shape[0], 1, Lq, 1)
    j = torch.arange(Lk, device=device).view(1, 1, 1, Lk)
    visible = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=device)
    if vis.causal:
        causal_vis = j <= i
        if vis.prefix_lengths is not None:
            causal_vis = causal_vis | (j < vis.prefix_lengths.view(B, 1, 1, 1))
        visible = visible & causal_vis
    if vis.window_left >= 0:
        visible = visible & (i - j <= vis.window_left)
    if vis.window_right >= 0:
        visible = visible & (j - i <= vis.window_right)
    if vis.key_lengths is not None:
        visible = visible & (j < vis.key_lengths.view(B, 1, 1, 1))
    if vis.q_segments is not None:
        visible = visible & (vis.q_segments.view(B, 1, Lq, 1) == vis.k_segments.view(B, 1, 1, Lk))
    if vis.dense_mask is not None:
        visible = visible & vis.dense_mask
    return visible


def attention_dropout_mask(seed: int, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device) -> Tensor:
    """This backend's keep-mask (bool [B, H, Lq, Lk]) for `seed`. torch's CPU generator keeps 32 bits of a seed,
    so the high word is folded into them first (an odd multiplier: seeds that differ only there still differ)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    folded = (seed ^ ((seed >> 32) * 0x9E3779B9)) & 0xFFFFFFFF
    gen = torch.Generator(device=device).manual_seed(folded)
    return torch.rand(B, H, Lq, Lk, generator=gen, device=device) >= dropout_p
