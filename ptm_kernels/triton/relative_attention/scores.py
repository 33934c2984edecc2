"""Relative attention scores in device code: the content + position + segment terms of a tile, the
visibility of its (row, key) pairs, and the per-row terms shared by forward and backward."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import analytic_visible, dot


@triton.jit
def _scores(qu, pos, K_bh, s_kn, KIDS_b, seg0, seg1, qid, offs_n, col_ok, scale2, HAS_SEG: tl.constexpr,
            BLOCK_D: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled scores (base 2) of a row tile against the keys offs_n, before the mask, and the key tile k;
    pos: the position term (_pos_gather or _pos_band)."""
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(K_bh + offs_n[:, None].to(tl.int64) * s_kn + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    s = dot(qu, tl.trans(k), None, PREC, UPCAST) + pos
    if HAS_SEG:
        kid = tl.load(KIDS_b + offs_n, mask=col_ok, other=0)
        same = qid[:, None] == kid[None, :]
        s += tl.where(same, seg0[:, None], seg1[:, None])
    return s * scale2, k


@triton.jit
def _visible(rows, ip, offs_n, row_ok, col_ok, b64, h64, klen, plen, wl, wr, QSEG_b, KSEG_b, DM_bh, s_dm, s_dn,
             CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_VSEG: tl.constexpr,
             HAS_DENSE: tl.constexpr):
    # a negative window bound is no bound (the launcher passes -1): one no (row, key) distance exceeds
    no_bound = 1 << 62
    vis = analytic_visible(row_ok[:, None] & col_ok[None, :], ip[:, None], offs_n[None, :], klen, plen,
                           tl.where(wl >= 0, wl, no_bound), tl.where(wr >= 0, wr, no_bound),
                           CAUSAL, HAS_PREFIX, True, HAS_KLEN)
    if HAS_VSEG:
        qs = tl.load(QSEG_b + rows, mask=row_ok, other=0)
        ks = tl.load(KSEG_b + offs_n, mask=col_ok, other=0)
        vis = vis & (qs[:, None] == ks[None, :])
    if HAS_DENSE:
        dm = tl.load(DM_bh + rows[:, None].to(tl.int64) * s_dm + offs_n[None, :].to(tl.int64) * s_dn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0)
        vis = vis & (dm != 0)
    return vis


@triton.jit
def _row_terms(POS, SEG, QIDS, KLEN, PLEN, pid_m, b, b64, bh64, rows, rows64, row_ok, Lr, Lk, q_len, r_offset,
               HAS_POS: tl.constexpr, HAS_SEG: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """What a row tile needs besides its q rows, the same for forward and backward: -> (ip: the rows'
    positions among the keys, base: r row t = base + j, t_last: the band start (consecutive rows: the tile's
    last row meets key 0 at r row t_last), seg0, seg1, qid: the segment term, klen, plen: this batch row's
    key length and prefix length)."""
    if HAS_POS:
        p = tl.load(POS + b64 * Lr + rows, mask=row_ok, other=0).to(tl.int64)
    else:
        p = rows64
    ip = p + (Lk - q_len)
    base = r_offset - ip
    t_last = r_offset - (pid_m * BLOCK_M + BLOCK_M - 1 + Lk - q_len).to(tl.int64)
    seg0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    seg1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    qid = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_SEG:
        seg_ptr = SEG + (bh64 * Lr + rows64) * 2
        seg0 = tl.load(seg_ptr, mask=row_ok, other=0.0)
        seg1 = tl.load(seg_ptr + 1, mask=row_ok, other=0.0)
        qid = tl.load(QIDS + b64 * Lr + rows, mask=row_ok, other=0)
    klen = 0
    if HAS_KLEN:
        klen = tl.load(KLEN + b)
    plen = 0
    if HAS_PREFIX:
        plen = tl.load(PLEN + b)
    return ip, base, t_last, seg0, seg1, qid, klen, plen


