"""Rotary position embedding of x [B, H, L, D] (stride 1 in D, any other strides).

One program per (b, l): it loads that position's cos/sin once and rotates every head, BLOCK_H heads at a
time. Pairs are (i, i + R/2) in the rotate-half layout (LLaMA, GPT-NeoX) and (2i, 2i + 1) interleaved
(GPT-J); dimensions from R = rotary_dim up to D are copied. inverse=True rotates by minus the angle,
which is the backward.

The interface (arguments, results, dtypes, rounding) is `ptm_kernels.reference_kernels.rope_fwd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import ELEMENTWISE_TILE, cast_to, check_dtype


@triton.jit
def _rope_kernel(
    OUT, X, COS, SIN, POS,
    L, H, D, HALF,  # HALF = rotary_dim // 2
    stride_xb, stride_xh, stride_xl,
    stride_ob, stride_oh, stride_ol,
    stride_pb, stride_pl, stride_cos, stride_sin,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // L).to(tl.int64)
    l = (pid % L).to(tl.int64)
    x_row = X + b * stride_xb + l * stride_xl  # int64 offsets: strides times indices may pass 2**31
    o_row = OUT + b * stride_ob + l * stride_ol

    # cos/sin of this position, shared by all heads.
    pos = tl.load(POS + b * stride_pb + l * stride_pl).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    mask_i = i < HALF
    c = tl.load(COS + pos * stride_cos + i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + pos * stride_sin + i, mask=mask_i, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        s = -s
    if INTERLEAVED:
        d1 = 2 * i
        d2 = 2 * i + 1
    else:
        d1 = i
        d2 = i + HALF

    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask_h = heads < H
        x_heads = x_row + heads.to(tl.int64)[:, None] * stride_xh
        o_heads = o_row + heads.to(tl.int64)[:, None] * stride_oh
        mask = mask_h[:, None] & mask_i[None, :]
        x1 = tl.load(x_heads + d1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_heads + d2[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_heads + d1[None, :], cast_to(x1 * c - x2 * s, OUT.dtype.element_ty), mask=mask)
        tl.store(o_heads + d2[None, :], cast_to(x2 * c + x1 * s, OUT.dtype.element_ty), mask=mask)
        if HAS_PASS:
            # Partial rotary: dimensions [2 * HALF, D) pass through unchanged.
            j = 2 * HALF + tl.arange(0, BLOCK_PASS)
            mask_j = mask_h[:, None] & (j < D)[None, :]
            tl.store(o_heads + j[None, :], tl.load(x_heads + j[None, :], mask=mask_j), mask=mask_j)


def rope_fwd(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, rotary_dim: int,
             inverse: bool) -> Tensor:
    """-> x rotated, in a new tensor with x's strides; see `reference_kernels.rope_fwd`."""
    check_dtype("x", x)
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"rope_fwd: x must be [B, H, L, D] with stride 1 in D, got {tuple(x.shape)} "
                         f"with strides {x.stride()}")
    B, H, L, D = x.shape
    R = int(rotary_dim)
    if R % 2 != 0 or not 0 <= R <= D:
        raise ValueError(f"rope_fwd: rotary_dim must be even and in [0, {D}], got {R}")
    if positions.dim() != 2 or positions.shape[0] not in (1, B) or positions.shape[1] != L:
        raise ValueError(f"rope_fwd: positions must be [{B}, {L}] or [1, {L}], got {tuple(positions.shape)}")
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    # cos/sin rows are read with stride 1; a [1, L] positions row is shared by the batch (stride 0).
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    stride_pb = 0 if positions.shape[0] == 1 else positions.stride(0)

    half = R // 2
    BLOCK_HALF = max(16, triton.next_power_of_2(half))
    BLOCK_PASS = max(16, triton.next_power_of_2(D - R))
    # About 1024 elements per half-tile: x1 and x2 together are then an ELEMENTWISE_TILE.
    BLOCK_H = max(1, min(triton.next_power_of_2(H), (ELEMENTWISE_TILE // 2) // max(BLOCK_HALF, BLOCK_PASS)))
    _rope_kernel[(B * L,)](
        out, x, cos, sin, positions,
        L, H, D, half,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_pb, positions.stride(1), cos.stride(0), sin.stride(0),
        INTERLEAVED=bool(interleaved), INVERSE=bool(inverse), HAS_PASS=R < D,
        BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, BLOCK_PASS=BLOCK_PASS,
        num_warps=4,
    )
    return out
