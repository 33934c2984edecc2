"""Tile bookkeeping shared by the attention kernels: which row tile and (batch, head) a program owns, the bounds
mask of a [rows, head dim] tile, where the it-th tile of a loop starts, and the load of a [rows, head dim] tile
(through a TMA descriptor on Hopper, else by pointers)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import load


@triton.jit
def _row_program(pid, L, H, BLOCK: tl.constexpr, HEAVY_FIRST: tl.constexpr):
    """Program pid of a grid of cdiv(L, BLOCK) * B * H programs, row tiles fastest -> (pid_m: its row tile, b, h,
    offs: its rows, row_ok: offs < L). HEAVY_FIRST: the last row tile first (the heaviest under a causal mask)."""
    num_m = tl.cdiv(L, BLOCK)
    pid_m = pid % num_m
    if HEAVY_FIRST:
        pid_m = num_m - 1 - pid_m
    bh = pid // num_m
    offs = pid_m * BLOCK + tl.arange(0, BLOCK)
    return pid_m, bh // H, bh % H, offs, offs < L


@triton.jit
def _tile_mask(row_ok, offs_d, D, EVEN_D: tl.constexpr):
    """The bounds mask of a [rows, head dim] tile: its rows' row_ok and, unless EVEN_D, the head dim's padding."""
    if EVEN_D:
        m = row_ok[:, None]
    else:
        m = row_ok[:, None] & (offs_d[None, :] < D)
    return m


@triton.jit
def _tile_start(it, IDX, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """The first index of the it-th tile of a loop: tile it, or the it-th entry of the tile list IDX when
    SPARSE."""
    if SPARSE:
        start = tl.load(IDX + it) * BLOCK
    else:
        start = it * BLOCK
    return tl.multiple_of(start, BLOCK)


@triton.jit
def _rows_tile(tma, WHICH: tl.constexpr, at, start, ptrs, mask, USE_MASK: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows [start, start + ROWS) of a [B, H, L, D] operand at (b, h) = at: a TMA load through the descriptor
    tma[WHICH] (rows past L and columns past D read as zeros, as the masked pointer load), else the pointer load
    of ptrs (bounds mask `mask` where USE_MASK)."""
    if tma is not None:
        return tl.reshape(tma[WHICH].load([at[0], at[1], start, 0]), [ROWS, BLOCK_D])
    else:
        return load(ptrs, mask, USE_MASK)
