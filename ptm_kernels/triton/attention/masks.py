"""Attention masks in device code: the visibility of a score tile (analytic parts, segment ids, dense mask),
its additive bias / Toeplitz terms, and which key (query) tiles a query (key) tile must visit."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import analytic_visible


@triton.jit
def _mod_scores(s, rows, cols, b64, h64, Lq, Lk, klen, plen, wl, wr,
                QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn,
                DMASK, s_db, s_dh, s_dm, s_dn,
                BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_TOEP: tl.constexpr):
    """Add bias/Toeplitz (times log2 e) to base-2 scores s and, if MASK, set invisible entries to -inf.

    rows (query indices) and cols (key indices) are broadcastable 2-D index blocks ([M, 1] x [1, N] in the
    forward / dQ orientation, [1, M] x [N, 1] in the dK/dV one)."""
    row_ok = rows < Lq
    col_ok = cols < Lk
    if HAS_BIAS:
        bias = tl.load(BIAS + b64 * s_bb + h64 * s_bh + rows.to(tl.int64) * s_bm + cols.to(tl.int64) * s_bn,
                       mask=row_ok & col_ok, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if HAS_TOEP:
        t = tl.load(TOEP + h64 * s_th + (rows - cols + (Lk - 1)), mask=row_ok & col_ok, other=0.0)
        s += t.to(tl.float32) * 1.4426950408889634
    if MASK:
        qi = rows + (Lk - Lq)  # query index in key coordinates (bottom-right alignment)
        vis = analytic_visible(row_ok & col_ok, qi, cols, klen, plen, wl, wr, CAUSAL, HAS_PREFIX, HAS_WINDOW,
                               HAS_KLEN)
        if HAS_SEG:
            qs = tl.load(QSEG + b64 * s_qsb + rows * s_qsm, mask=row_ok, other=0)
            ks = tl.load(KSEG + b64 * s_ksb + cols * s_ksn, mask=col_ok, other=0)
            vis = vis & (qs == ks)
        if HAS_DENSE:
            dm = tl.load(DMASK + b64 * s_db + h64 * s_dh + rows.to(tl.int64) * s_dm + cols.to(tl.int64) * s_dn,
                         mask=row_ok & col_ok, other=0)
            vis = vis & (dm != 0)
        s = tl.where(vis, s, float("-inf"))
    return s


@triton.jit
def _key_tile_range(m0, Lq, Lk, klen, plen, wl, wr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_KLEN: tl.constexpr, ELEMWISE: tl.constexpr):
    """Key tiles a query tile [m0, m0 + BLOCK_M) must visit: [A, Z), of which [F0, F1) need no mask (and lie
    inside [0, Lk))."""
    off = Lk - Lq
    m_last = tl.minimum(m0 + BLOCK_M, Lq) - 1  # last valid query row of the tile
    lo = m0 * 0
    hi = lo + Lk
    full_lo = lo
    full_hi = hi
    if HAS_KLEN:
        hi = tl.minimum(hi, klen)
        full_hi = tl.minimum(full_hi, klen)
    if CAUSAL:
        c_hi = m_last + off + 1
        c_full = m0 + off + 1
        if HAS_PREFIX:
            c_hi = tl.maximum(c_hi, plen)
            c_full = tl.maximum(c_full, plen)
        hi = tl.minimum(hi, c_hi)
        full_hi = tl.minimum(full_hi, c_full)
    if HAS_WINDOW:
        hi = tl.minimum(hi, m_last + off + wr + 1)
        full_hi = tl.minimum(full_hi, m0 + off + wr + 1)
        lo = tl.maximum(lo, m0 + off - wl)
        full_lo = tl.maximum(full_lo, m_last + off - wl)
    if ELEMWISE:
        full_hi = full_hi * 0
    lo = tl.maximum(lo, 0)
    A = lo // BLOCK_N
    Z = tl.where(hi > lo, tl.cdiv(tl.maximum(hi, 0), BLOCK_N), A)
    F0 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK_N), A), Z)
    F1 = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_N, F0), Z)
    return A, F0, F1, Z


@triton.jit
def _query_tile_range(n0, Lq, Lk, klen, plen, wl, wr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      HAS_KLEN: tl.constexpr, ELEMWISE: tl.constexpr):
    """Query tiles a key tile [n0, n0 + BLOCK_N) must visit: [A, Z), of which [F0, F1) need no mask (and lie
    inside [0, Lq))."""
    off = Lk - Lq
    n_last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    lo = n0 * 0
    hi = lo + Lq
    full_lo = lo
    full_hi = lo + (Lq // BLOCK_M) * BLOCK_M  # full tiles lie inside [0, Lq) (unmasked loads)
    full_hi = tl.where(n0 + BLOCK_N <= Lk, full_hi, 0)
    if HAS_KLEN:
        hi = tl.where(n0 < klen, hi, 0)
        full_hi = tl.where(n0 + BLOCK_N <= klen, full_hi, 0)
    if CAUSAL:
        c_lo = n0 - off
        c_full = n0 + BLOCK_N - 1 - off
        if HAS_PREFIX:
            c_lo = tl.where(n0 < plen, 0, c_lo)
            c_full = tl.where(n0 + BLOCK_N <= plen, 0, c_full)
        lo = tl.maximum(lo, c_lo)
        full_lo = tl.maximum(full_lo, c_full)
    if HAS_WINDOW:
        lo = tl.maximum(lo, n0 - wr - off)
        full_lo = tl.maximum(full_lo, n0 + BLOCK_N - 1 - wr - off)
        hi = tl.minimum(hi, n_last + wl - off + 1)
        full_hi = tl.minimum(full_hi, n0 + wl - off + 1)
    if ELEMWISE:
        full_hi = full_hi * 0
    lo = tl.maximum(lo, 0)
    A = lo // BLOCK_M
    Z = tl.where(hi > lo, tl.cdiv(tl.maximum(hi, 0), BLOCK_M), A)
    F0 = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo, 0), BLOCK_M), A), Z)
    F1 = tl.minimum(tl.maximum(tl.maximum(full_hi, 0) // BLOCK_M, F0), Z)
    return A, F0, F1, Z

