"""Attention masks: their kernel arguments (one NamedTuple per part, None when absent, so each part's code is
compiled only where the part is present) and, in device code, the visibility of a score tile (analytic parts,
segment ids, dense mask), its additive bias / Toeplitz terms, and which key (query) tiles a query (key) tile
must visit."""

from __future__ import annotations

from typing import NamedTuple, Optional

import triton
import triton.language as tl
from torch import Tensor

from .tiles import _tile_mask, _tile_start


class Segments(NamedTuple):
    """Segment ids of the queries ([B, Lq]) and keys ([B, Lk]): visible where equal."""
    q: Tensor
    k: Tensor
    s_qb: int
    s_qm: int
    s_kb: int
    s_kn: int


class ScoreTensor(NamedTuple):
    """A [B, H, Lq, Lk] tensor read per score (dense bool mask as uint8, additive bias); stride 0 on broadcast
    dims."""
    ptr: Tensor
    s_b: int
    s_h: int
    s_m: int
    s_n: int


class Toeplitz(NamedTuple):
    """table[h, i - j + Lk - 1], float32 [H, Lq + Lk - 1]."""
    ptr: Tensor
    s_h: int


class MaskArgs(NamedTuple):
    """The mask parts of one attention call as kernel arguments (causal is the CAUSAL constexpr)."""
    key_lengths: Optional[Tensor]  # int32 [B], clamped to [0, Lk]
    prefix_lengths: Optional[Tensor]  # int32 [B] (with causal only)
    window: Optional[tuple]  # (left, right); Lq + Lk stands for an unbounded side
    segments: Optional[Segments]
    dense: Optional[ScoreTensor]
    bias: Optional[ScoreTensor]
    toeplitz: Optional[Toeplitz]


class TileCtx(NamedTuple):
    """What the mask code needs of a program's (batch row, head), built in device code by _tile_ctx and read by
    field name: its batch row and head (int64), the sequence lengths, the row's key and prefix lengths (Lk and
    0 when absent) and the window's sides (0 when absent)."""
    b64: tl.tensor
    h64: tl.tensor
    Lq: tl.tensor
    Lk: tl.tensor
    klen: tl.tensor
    plen: tl.tensor
    wl: tl.tensor
    wr: tl.tensor


@triton.jit
def _tile_ctx(mask, b, b64, h64, Lq, Lk):
    """The TileCtx of a program's (batch row b, head)."""
    klen = Lk
    plen = 0
    wl = 0
    wr = 0
    if mask.key_lengths is not None:
        klen = tl.load(mask.key_lengths + b).to(tl.int32)
    if mask.prefix_lengths is not None:
        plen = tl.load(mask.prefix_lengths + b).to(tl.int32)
    if mask.window is not None:
        wl, wr = mask.window
    return TileCtx(b64, h64, Lq, Lk, klen, plen, wl, wr)


@triton.jit
def _visible_keys(rows, ctx, mask, CAUSAL: tl.constexpr):
    """The keys the analytic mask parts leave visible to query rows `rows`: the interval [lo, hi] per row (lo = 0
    without a window; empty for rows past Lq). Each part is an interval of keys (causal: [0, qi], with a prefix
    [0, max(qi, plen - 1)]; the window [qi - wl, qi + wr]; the key length [0, klen - 1]), so is their
    intersection: a score tile is masked with one or two comparisons per element, not one per part."""
    qi = rows + (ctx.Lk - ctx.Lq)  # query index in key coordinates (bottom-right alignment)
    hi = tl.where(rows < ctx.Lq, ctx.Lk - 1, -1)
    lo = 0
    if CAUSAL:
        if mask.prefix_lengths is not None:
            hi = tl.minimum(hi, tl.maximum(qi, ctx.plen - 1))
        else:
            hi = tl.minimum(hi, qi)
    if mask.window is not None:
        lo = qi - ctx.wl
        hi = tl.minimum(hi, qi + ctx.wr)
    if mask.key_lengths is not None:
        hi = tl.minimum(hi, ctx.klen - 1)
    return lo, hi


@triton.jit
def _mod_scores(s, row0, offs_r, col0, offs_c, ctx, mask, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                TRANS: tl.constexpr = False):
    """Add bias/Toeplitz (times log2 e) to base-2 scores s and, if MASK, set invisible entries to -inf.

    The query indices row0 + offs_r and key indices col0 + offs_c (row0 / col0: scalars, the tile's first query /
    key, or 0) are broadcastable 2-D index blocks: [M, 1] x [1, N] in the forward / dQ orientation, [1, M] x
    [N, 1] in the dK/dV one (TRANS); ctx: a TileCtx. The analytic parts are one interval of keys per query
    (_visible_keys), or of queries per key when TRANS (_visible_queries), compared with the offsets less the
    tile's start: a tile needs no per-element index (fewer live registers)."""
    rows = row0 + offs_r
    cols = col0 + offs_c
    b64 = ctx.b64
    h64 = ctx.h64
    Lq = ctx.Lq
    Lk = ctx.Lk
    row_ok = rows < Lq
    col_ok = cols < Lk
    if mask.bias is not None:
        B = mask.bias
        bias = tl.load(B.ptr + b64 * B.s_b + h64 * B.s_h + rows.to(tl.int64) * B.s_m + cols.to(tl.int64) * B.s_n,
                       mask=row_ok & col_ok, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if mask.toeplitz is not None:
        T = mask.toeplitz
        t = tl.load(T.ptr + h64 * T.s_h + (rows - cols + (Lk - 1)), mask=row_ok & col_ok, other=0.0)
        s += t.to(tl.float32) * 1.4426950408889634
    if MASK:
        if not (CAUSAL or mask.window is not None or mask.key_lengths is not None):
            vis = row_ok & col_ok  # the bounds alone: a row and a column predicate (fewer registers, sm_90)
        elif TRANS:
            lo, hi = _visible_queries(cols, ctx, mask, CAUSAL)
            vis = offs_r <= hi - row0
            if CAUSAL or mask.window is not None:  # else lo = 0 <= every query
                vis = vis & (offs_r >= lo - row0)
        else:
            lo, hi = _visible_keys(rows, ctx, mask, CAUSAL)
            vis = offs_c <= hi - col0
            if mask.window is not None:  # else lo = 0 <= every key
                vis = vis & (offs_c >= lo - col0)
        if mask.segments is not None:
            S = mask.segments
            qs = tl.load(S.q + b64 * S.s_qb + rows * S.s_qm, mask=row_ok, other=0)
            ks = tl.load(S.k + b64 * S.s_kb + cols * S.s_kn, mask=col_ok, other=0)
            vis = vis & (qs == ks)
        if mask.dense is not None:
            M = mask.dense
            dm = tl.load(M.ptr + b64 * M.s_b + h64 * M.s_h + rows.to(tl.int64) * M.s_m + cols.to(tl.int64) * M.s_n,
                         mask=row_ok & col_ok, other=0)
            vis = vis & (dm != 0)
        s = tl.where(vis, s, float("-inf"))
    return s


@triton.jit
def _visible_queries(cols, ctx, mask, CAUSAL: tl.constexpr):
    """_visible_keys seen from the keys: the query rows (indices in [0, Lq)) that see keys `cols`, an interval
    [lo, hi] per key (lo = 0 without causal and window; empty for keys past Lk). With qi = row + Lk - Lq: causal
    qi >= key unless the key is in the prefix; the window key - wr <= qi <= key + wl; the key length key <
    klen."""
    off = ctx.Lk - ctx.Lq
    hi = tl.where(cols < ctx.Lk, ctx.Lq - 1, -1)
    lo = 0
    if mask.key_lengths is not None:
        hi = tl.where(cols < ctx.klen, hi, -1)
    if CAUSAL:
        if mask.prefix_lengths is not None:
            lo = tl.where(cols < ctx.plen, 0, cols - off)
        else:
            lo = cols - off
    if mask.window is not None:
        lo = tl.maximum(lo, cols - ctx.wr - off)
        hi = tl.minimum(hi, cols + ctx.wl - off)
    return lo, hi


@triton.jit
def _key_tile_range(m0, ctx, mask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    ELEMWISE: tl.constexpr):
    """Key tiles a query tile [m0, m0 + BLOCK_M) must visit: [A, Z), of which [F0, F1) need no mask (and lie
    inside [0, Lk))."""
    off = ctx.Lk - ctx.Lq
    m_last = tl.minimum(m0 + BLOCK_M, ctx.Lq) - 1  # last valid query row of the tile
    lo = m0 * 0
    hi = lo + ctx.Lk
    full_lo = lo
    full_hi = hi
    if mask.key_lengths is not None:
        hi = tl.minimum(hi, ctx.klen)
        full_hi = tl.minimum(full_hi, ctx.klen)
    if CAUSAL:
        c_hi = m_last + off + 1
        c_full = m0 + off + 1
        if mask.prefix_lengths is not None:
            c_hi = tl.maximum(c_hi, ctx.plen)
            c_full = tl.maximum(c_full, ctx.plen)
        hi = tl.minimum(hi, c_hi)
        full_hi = tl.minimum(full_hi, c_full)
    if mask.window is not None:
        hi = tl.minimum(hi, m_last + off + ctx.wr + 1)
        full_hi = tl.minimum(full_hi, m0 + off + ctx.wr + 1)
        lo = tl.maximum(lo, m0 + off - ctx.wl)
        full_lo = tl.maximum(full_lo, m_last + off - ctx.wl)
    return _tile_span(lo, hi, full_lo, full_hi, BLOCK_N, ELEMWISE)

@triton.jit
def _key_tile(it, IDX, offs_n, offs_d, Lk, D, MASK: tl.constexpr, SPARSE: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_D: tl.constexpr):
    """The it-th key tile of a forward / dQ loop (tile index it, or the it-th entry of the list IDX when SPARSE):
    -> (start_n, cols, kv_mask: the bounds mask of its K / V loads). A tile on the unmasked path (not MASK) lies
    inside [0, Lk) (see _key_tile_range / _convert_map), so it needs no bounds mask (only the head dim's)."""
    start_n = _tile_start(it, IDX, SPARSE, BLOCK_N)
    cols = start_n + offs_n
    if MASK:
        kv_mask = _tile_mask(cols < Lk, offs_d, D, EVEN_D)
    else:
        kv_mask = offs_d[None, :] < D  # (unused when EVEN_D)
    return start_n, cols, kv_mask


@triton.jit
def _query_tile_range(n0, ctx, mask, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      ELEMWISE: tl.constexpr):
    """Query tiles a key tile [n0, n0 + BLOCK_N) must visit: [A, Z), of which [F0, F1) need no mask (and lie
    inside [0, Lq))."""
    off = ctx.Lk - ctx.Lq
    n_last = tl.minimum(n0 + BLOCK_N, ctx.Lk) - 1
    lo = n0 * 0
    hi = lo + ctx.Lq
    full_lo = lo
    full_hi = lo + (ctx.Lq // BLOCK_M) * BLOCK_M  # full tiles lie inside [0, Lq) (unmasked loads)
    full_hi = tl.where(n0 + BLOCK_N <= ctx.Lk, full_hi, 0)
    if mask.key_lengths is not None:
        hi = tl.where(n0 < ctx.klen, hi, 0)
        full_hi = tl.where(n0 + BLOCK_N <= ctx.klen, full_hi, 0)
    if CAUSAL:
        c_lo = n0 - off
        c_full = n0 + BLOCK_N - 1 - off
        if mask.prefix_lengths is not None:
            c_lo = tl.where(n0 < ctx.plen, 0, c_lo)
            c_full = tl.where(n0 + BLOCK_N <= ctx.plen, 0, c_full)
        lo = tl.maximum(lo, c_lo)
        full_lo = tl.maximum(full_lo, c_full)
    if mask.window is not None:
        lo = tl.maximum(lo, n0 - ctx.wr - off)
        full_lo = tl.maximum(full_lo, n0 + BLOCK_N - 1 - ctx.wr - off)
        hi = tl.minimum(hi, n_last + ctx.wl - off + 1)
        full_hi = tl.minimum(full_hi, n0 + ctx.wl - off + 1)
    return _tile_span(lo, hi, full_lo, full_hi, BLOCK_M, ELEMWISE)


@triton.jit
def _tile_span(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr, ELEMWISE: tl.constexpr):
    """Indices [lo, hi) may be visible, [full_lo, full_hi) are (unless ELEMWISE: element-wise parts leave no tile
    surely full) -> the tiles of BLOCK to visit, [A, Z), of which [F0, F1) need no mask."""
    if ELEMWISE:
        full_hi = full_hi * 0
    lo = tl.maximum(lo, 0)
    A = lo // BLOCK
    Z = tl.where(hi > lo, tl.cdiv(tl.maximum(hi, 0), BLOCK), A)
    F0 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK), A), Z)
    F1 = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK, F0), Z)
    return A, F0, F1, Z

