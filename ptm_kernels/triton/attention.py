"""Fused attention with composable masks, forward and backward (FlashAttention-2 style), as Triton kernels.

The interface (arguments, results, dtypes, mask semantics) is `ptm_kernels.reference_kernels.attention_*`:

    attention_fwd(q, k, v, scale, causal, window_left, window_right, key_lengths, prefix_lengths, q_segments,
                  k_segments, dense_mask, bias, toeplitz, block_map, block_m, block_n, dropout_p, seed)
        -> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32, natural log, -inf for empty rows)
    attention_bwd(dout, q, k, v, out, lse, <same mask arguments>, bias_requires_grad, toeplitz_requires_grad)
        -> (dq, dk, dv, dbias float32 [B, H, Lq, Lk] or empty, dtoeplitz float32 [H, Lq + Lk - 1] or empty)
    attention_dropout_mask(seed, dropout_p, B, H, Lq, Lk, device) -> bool [B, H, Lq, Lk] keep-mask
    attention_tile(head_dim, dtype, device) -> (block_m, block_n) the forward tile, for the block map

Layout [B, H, L, D] with any strides (unit stride in D); k/v may have Hk | H heads (head h reads kv head
h // (H // Hk)); D from 16 to 256 (padded to a power of two, masked); Lq != Lk allowed.

Forward. One program per (query tile, b, h) (and per key split, see decoding below); q stays in registers,
K/V tiles stream through, online softmax in base 2 (log2(e) folded into the scale), float32 accumulation.
Which key tiles a program visits:
  * analytic parts only (causal, window, key lengths, prefix-LM): the visible key range of the query tile is
    computed in closed form, split into [masked | full | masked] sub-ranges; "full" tiles run with no
    per-element mask work at all (three loops, like the tutorial's STAGE split).
  * element-wise parts (segment ids, dense bool mask) with a usable block map: the map is converted once
    (torch, cached) into per-row lists of partial tiles and of full tiles (FlexAttention's kv_indices /
    full_kv_indices): skipped tiles are never visited, full tiles skip mask work. A map built at another tile
    size is converted conservatively (a tile is skipped only if every map tile it overlaps is 0, full only if
    every one is 2), so any (block_m, block_n) is accepted.
  * element-wise parts without a map: every tile of the analytic range, masked.
Additive bias ([B|1, H|1, Lq, Lk] strided, stride 0 on broadcast dims) and the Toeplitz table
(table[h, i - j + Lk - 1]) are added to the scaled scores in-kernel. A row with no visible key (or whose
every score is -inf) gives out = 0, lse = -inf, never NaN.

Dropout: _common.dropout_keep (one Philox call per 16 keys of a row, an 8-bit threshold per key, so p is
rounded to a multiple of 1/256; kept values are scaled by 1 / (1 - p)). The forward, both backward kernels
and attention_dropout_mask() compute the same bits, so the mask can be replayed through the reference.

Decoding (few query tiles, long keys): the key tiles are split across programs (flash-decoding); each split
writes a float32 partial output and its lse, and a combine kernel merges them.

Backward (FlashAttention-2): a preprocess kernel (delta = rowsum(dO * O)), a dK/dV kernel (one program per
key tile; loops over the query tiles, and over the query heads that share the kv head for GQA, so dk/dv are
summed in registers; when that gives too few programs the group is split and float32 partials are summed
by torch), and a dQ kernel (one program per query tile, looping over key tiles). Deterministic except for
dtoeplitz. dbias: the dQ kernel writes float32 dS into a [B, H, Lq, Lk] buffer (only when requested).
dtoeplitz: per-diagonal sums of dS, accumulated by the dQ kernel with tl.atomic_add into the float32
[H, Lq + Lk - 1] table (float atomics: the summation order, hence the last bits, may vary run to run).

Precision: 16-bit inputs use tensor-core dots with float32 accumulation (P and dS are rounded to the input
dtype before their dots, as FlashAttention does). float32 inputs on a GPU use input_precision="tf32x3"
(each operand split into two tf32 parts, three tensor-core products: ~1e-6 relative error, float32-level;
plain "ieee" FMA dots replicate operands in registers and spill heavily), or "tf32" when
torch.backends.cuda.matmul.allow_tf32 is True; under the interpreter they are exact float32. The
interpreter multiplies bfloat16 tiles as raw bits, so there (only) bfloat16 operands are widened first.

Tiles / warps / stages per head dim, dtype and "heaviness" of the mask are in _fwd_configs / _bwd_configs,
picked by compiling for sm_90 offline (no spills, shared memory in budget) around FlexAttention's sm90
defaults and the tutorial's; a config that runs out of resources on the device falls back to the next,
smaller one. No autotuning. Under TRITON_INTERPRET=1 (CPU tensors) one small config is used.

Tile classification invariant: a tile on the unmasked ("full") path lies entirely inside [0, Lq) x [0, Lk),
so its loads carry no bounds masks; ragged last tiles always take the masked path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from ._common import LOG2E, SUPPORTED_DTYPES, analytic_visible, block_d, dot, dropout_keep, load

# Test hooks (not API): force the number of key splits of the forward / of GQA group splits of dK/dV,
# and override the tile configs.
_FORCE_SPLITS: Optional[int] = None
_FORCE_GROUP_SPLITS: Optional[int] = None
_CONFIG_OVERRIDE: dict = {}


# =============================================================================================== device code
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


# ------------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, it_lo, it_hi, IDX,
               offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
               b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
               QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn,
               DMASK, s_db, s_dh, s_dm, s_dn,
               BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
               MASK: tl.constexpr, SPARSE: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    for it in range(it_lo, it_hi):
        if SPARSE:
            start_n = tl.load(IDX + it) * BLOCK_N
        else:
            start_n = it * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        # A tile on the unmasked path lies inside [0, Lk) (see _key_tile_range / _convert_map): no bounds mask.
        if MASK:
            if EVEN_D:
                kv_mask = cols[:, None] < Lk
            else:
                kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
        else:
            kv_mask = offs_d[None, :] < D  # (unused when EVEN_D)
        k = load(K_bh + start_n.to(tl.int64) * s_kn + k_offs, kv_mask, MASK or not EVEN_D)
        s = dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale
        s = _mod_scores(s, offs_m[:, None], cols[None, :], b64, h64, Lq, Lk, klen, plen, wl, wr,
                        QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                        BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th,
                        MASK, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                        HAS_BIAS, HAS_TOEP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh64, offs_m, start_n, Lq, Lk, drop_thr, BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = load(V_bh + start_n.to(tl.int64) * s_vn + v_offs, kv_mask, MASK or not EVEN_D)
        acc = dot(p.to(v.dtype), v, acc, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KLEN, PLEN, QSEG, KSEG, DMASK, BIAS, TOEP, CNT1, IDX1, CNT2, IDX2,
    qk_scale, seed, drop_thr, rdrop,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn,
    s_ob, s_oh, s_om, s_os, s_ls,
    s_qsb, s_qsm, s_ksb, s_ksn, s_db, s_dh, s_dm, s_dn, s_bb, s_bh, s_bm, s_bn, s_th,
    s_lb, s_lh, n_list,
    H, G, Lq, Lk, D, wl, wr, n_split,
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr, ELEMWISE: tl.constexpr, SPARSE: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = num_m - 1 - pid % num_m  # heaviest (last, for causal) query tiles first
    bh = pid // num_m
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    hk64 = (h // G).to(tl.int64)
    Q_bh = Q + b64 * s_qb + h64 * s_qh
    K_bh = K + b64 * s_kb + hk64 * s_kh
    V_bh = V + b64 * s_vb + hk64 * s_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        q_mask = offs_m[:, None] < Lq
    else:
        q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q_bh + offs_m[:, None].to(tl.int64) * s_qm + offs_d[None, :], mask=q_mask, other=0.0)
    k_offs = offs_n[:, None] * s_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * s_vn + offs_d[None, :]

    klen = Lk
    plen = 0
    if HAS_KLEN:
        klen = tl.load(KLEN + b).to(tl.int32)
    if HAS_PREFIX:
        plen = tl.load(PLEN + b).to(tl.int32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if SPARSE:
        lrow = b64 * s_lb + h64 * s_lh + pid_m
        n1 = tl.load(CNT1 + lrow)
        n2 = tl.load(CNT2 + lrow)
        lo1 = n1 * 0
        hi1 = n1
        lo2 = n2 * 0
        hi2 = n2
        if SPLIT:
            per1 = tl.cdiv(n1, n_split)
            lo1 = tl.minimum(split * per1, n1)
            hi1 = tl.minimum(lo1 + per1, n1)
            per2 = tl.cdiv(n2, n_split)
            lo2 = tl.minimum(split * per2, n2)
            hi2 = tl.minimum(lo2 + per2, n2)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, lo1, hi1, IDX1 + lrow * n_list,
                                   offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
                                   b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                   QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                   BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                   True, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG,
                                   HAS_DENSE, HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_N, EVEN_D, PREC, UPCAST)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, lo2, hi2, IDX2 + lrow * n_list,
                                   offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
                                   b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                   QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                   BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                   False, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG,
                                   HAS_DENSE, HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_N, EVEN_D, PREC, UPCAST)
    else:
        A, F0, F1, Z = _key_tile_range(m0, Lq, Lk, klen, plen, wl, wr, BLOCK_M, BLOCK_N, CAUSAL, HAS_PREFIX,
                                       HAS_WINDOW, HAS_KLEN, ELEMWISE)
        if SPLIT:
            per = tl.cdiv(Z - A, n_split)
            c0 = A + split * per
            c1 = tl.minimum(c0 + per, Z)
            A = tl.maximum(A, c0)
            F0 = tl.minimum(tl.maximum(F0, c0), c1)
            F1 = tl.minimum(tl.maximum(F1, c0), c1)
            Z = tl.minimum(Z, c1)
        # [A, F0) and [F1, Z): masked tiles; [F0, F1): tiles every query of this tile fully sees.
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, A, F0, IDX1,
                                   offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
                                   b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                   QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                   BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                   True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG,
                                   HAS_DENSE, HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_N, EVEN_D, PREC, UPCAST)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, F0, F1, IDX1,
                                   offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
                                   b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                   QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                   BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                   False, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG,
                                   HAS_DENSE, HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_N, EVEN_D, PREC, UPCAST)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_bh, V_bh, k_offs, v_offs, F1, Z, IDX1,
                                   offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale,
                                   b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                   QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                   BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                   True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG,
                                   HAS_DENSE, HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_N, EVEN_D, PREC, UPCAST)

    # Epilogue. l_i == 0 exactly when the row saw no visible key (the row maximum contributes exp2(0) = 1).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * rdrop
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_ok = offs_m < Lq
    o_ptrs = O + split.to(tl.int64) * s_os + b64 * s_ob + h64 * s_oh + offs_m[:, None].to(tl.int64) * s_om \
        + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + split.to(tl.int64) * s_ls + bh64 * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_combine_kernel(OP, LP, O, LSE, s_os, s_ls, s_ob, s_oh, s_om, H, Lq, D, n_split,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Merge the key splits: out = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    bh64 = bh.to(tl.int64)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    if EVEN_D:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d[None, :] < D)
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lp = LP + bh64 * Lq + offs_m  # pointers advance by the split strides (64-bit pointer arithmetic)
    for s in range(0, n_split):
        ls = tl.load(lp, mask=row_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, ls)
        lp += s_ls
    m_use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lp = LP + bh64 * Lq + offs_m
    op = OP + (bh64 * Lq + offs_m[:, None]) * D + offs_d[None, :]
    for s in range(0, n_split):
        ls = tl.load(lp, mask=row_ok, other=float("-inf"))
        w = tl.exp(ls - m_use)
        o = tl.load(op, mask=mask, other=0.0)
        acc += w[:, None] * o
        wsum += w
        lp += s_ls
        op += s_os
    empty = wsum == 0.0
    out = acc / tl.where(empty, 1.0, wsum)[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, wsum)))
    tl.store(O + b64 * s_ob + h64 * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bh64 * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _dropout_mask_kernel(OUT, seed, drop_thr, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Lk, BLOCK_N)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    bh64 = (pid // (num_n * num_m)).to(tl.int64)
    keep = dropout_keep(seed, bh64, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N, Lq, Lk, drop_thr,
                        BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(OUT + (bh64 * Lq + rows) * Lk + cols, keep.to(tl.int8), mask=(rows < Lq) & (cols < Lk))


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_dob, s_doh, s_dom, H, Lq, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    bh64 = bh.to(tl.int64)
    b64 = (bh // H).to(tl.int64)
    h64 = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        mask = offs_m[:, None] < Lq
    else:
        mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    rows64 = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b64 * s_ob + h64 * s_oh + rows64 * s_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * s_dob + h64 * s_doh + rows64 * s_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh64 * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, it_lo, it_hi, IDX,
              offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
              b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
              QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn,
              DMASK, s_db, s_dh, s_dm, s_dn,
              BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
              MASK: tl.constexpr, SPARSE: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              HAS_DBIAS: tl.constexpr, HAS_DTOEP: tl.constexpr,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    for it in range(it_lo, it_hi):
        if SPARSE:
            start_n = tl.load(IDX + it) * BLOCK_N
        else:
            start_n = it * BLOCK_N
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASK:
            if EVEN_D:
                kv_mask = cols[:, None] < Lk
            else:
                kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
        else:  # in bounds (see _fwd_tiles)
            kv_mask = offs_d[None, :] < D
        k = load(K_bh + start_n.to(tl.int64) * s_kn + k_offs, kv_mask, MASK or not EVEN_D)
        v = load(V_bh + start_n.to(tl.int64) * s_vn + v_offs, kv_mask, MASK or not EVEN_D)
        s = dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale
        s = _mod_scores(s, offs_m[:, None], cols[None, :], b64, h64, Lq, Lk, klen, plen, wl, wr,
                        QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                        BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th,
                        MASK, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                        HAS_BIAS, HAS_TOEP)
        p = tl.math.exp2(s - lse2[:, None])
        dp = dot(do, tl.trans(v), None, PREC, UPCAST)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, bh64, offs_m, start_n, Lq, Lk, drop_thr, BLOCK_N)
            dp = tl.where(keep, dp * rdrop, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, PREC, UPCAST)
        if HAS_DBIAS:
            ok = (offs_m[:, None] < Lq) & (cols[None, :] < Lk)
            tl.store(DB_bh + offs_m[:, None].to(tl.int64) * Lk + cols[None, :], ds, mask=ok)
        if HAS_DTOEP:
            ok = (offs_m[:, None] < Lq) & (cols[None, :] < Lk)
            tl.atomic_add(DT_h + (offs_m[:, None] - cols[None, :] + (Lk - 1)), ds, mask=ok, sem="relaxed")
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DB, DT,
    KLEN, PLEN, QSEG, KSEG, DMASK, BIAS, TOEP, CNT1, IDX1, CNT2, IDX2,
    qk_scale, sm_scale, seed, drop_thr, rdrop,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_dom,
    s_dqb, s_dqh, s_dqm, s_dth,
    s_qsb, s_qsm, s_ksb, s_ksn, s_db, s_dh, s_dm, s_dn, s_bb, s_bh, s_bm, s_bn, s_th,
    s_lb, s_lh, n_list,
    H, G, Lq, Lk, D, wl, wr,
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DBIAS: tl.constexpr, HAS_DTOEP: tl.constexpr,
    ELEMWISE: tl.constexpr, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = num_m - 1 - pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = bh.to(tl.int64)
    hk64 = (h // G).to(tl.int64)
    K_bh = K + b64 * s_kb + hk64 * s_kh
    V_bh = V + b64 * s_vb + hk64 * s_vh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    if EVEN_D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    rows64 = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b64 * s_qb + h64 * s_qh + rows64 * s_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * s_dob + h64 * s_doh + rows64 * s_dom + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh64 * Lq + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
    delta = tl.load(DELTA + bh64 * Lq + offs_m, mask=row_ok, other=0.0)
    k_offs = offs_n[:, None] * s_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * s_vn + offs_d[None, :]
    DB_bh = DB + bh64 * Lq * Lk
    DT_h = DT + h64 * s_dth

    klen = Lk
    plen = 0
    if HAS_KLEN:
        klen = tl.load(KLEN + b).to(tl.int32)
    if HAS_PREFIX:
        plen = tl.load(PLEN + b).to(tl.int32)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPARSE:
        lrow = b64 * s_lb + h64 * s_lh + pid_m
        n1 = tl.load(CNT1 + lrow)
        n2 = tl.load(CNT2 + lrow)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, 0, n1, IDX1 + lrow * n_list,
                       offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
                       b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                       QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                       BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                       True, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                       HAS_BIAS, HAS_TOEP, HAS_DROPOUT, HAS_DBIAS, HAS_DTOEP, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, 0, n2, IDX2 + lrow * n_list,
                       offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
                       b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                       QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                       BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                       False, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                       HAS_BIAS, HAS_TOEP, HAS_DROPOUT, HAS_DBIAS, HAS_DTOEP, BLOCK_N, EVEN_D, PREC, UPCAST)
    else:
        A, F0, F1, Z = _key_tile_range(m0, Lq, Lk, klen, plen, wl, wr, BLOCK_M, BLOCK_N, CAUSAL, HAS_PREFIX,
                                       HAS_WINDOW, HAS_KLEN, ELEMWISE)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, A, F0, IDX1,
                       offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
                       b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                       QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                       BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                       True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                       HAS_BIAS, HAS_TOEP, HAS_DROPOUT, HAS_DBIAS, HAS_DTOEP, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, F0, F1, IDX1,
                       offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
                       b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                       QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                       BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                       False, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                       HAS_BIAS, HAS_TOEP, HAS_DROPOUT, HAS_DBIAS, HAS_DTOEP, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_bh, V_bh, k_offs, v_offs, F1, Z, IDX1,
                       offs_m, offs_n, offs_d, D, s_kn, s_vn, qk_scale, rdrop, DB_bh, DT_h,
                       b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                       QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                       BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                       True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                       HAS_BIAS, HAS_TOEP, HAS_DROPOUT, HAS_DBIAS, HAS_DTOEP, BLOCK_N, EVEN_D, PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b64 * s_dqb + h64 * s_dqh + rows64 * s_dqm + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, it_lo, it_hi, IDX,
                offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn,
                DMASK, s_db, s_dh, s_dm, s_dn,
                BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                MASK: tl.constexpr, SPARSE: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    cols = n0 + tl.arange(0, BLOCK_N)
    for it in range(it_lo, it_hi):
        if SPARSE:
            start_m = tl.load(IDX + it) * BLOCK_M
        else:
            start_m = it * BLOCK_M
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_mb
        rows64 = rows[:, None].to(tl.int64)
        if MASK:
            row_ok = rows < Lq
            if EVEN_D:
                q_mask = row_ok[:, None]
            else:
                q_mask = row_ok[:, None] & (offs_d[None, :] < D)
            lse = tl.load(LSE_bh + rows, mask=row_ok, other=float("inf"))  # rows past Lq: p = 0
            delta = tl.load(DELTA_bh + rows, mask=row_ok, other=0.0)
        else:  # a full query tile lies inside [0, Lq) (see _query_tile_range / _convert_map)
            q_mask = offs_d[None, :] < D
            lse = tl.load(LSE_bh + rows)
            delta = tl.load(DELTA_bh + rows)
        q = load(Q_bh + rows64 * s_qm + offs_d[None, :], q_mask, MASK or not EVEN_D)
        do = load(DO_bh + rows64 * s_dom + offs_d[None, :], q_mask, MASK or not EVEN_D)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        # Transposed scores: [keys, queries].
        sT = dot(k, tl.trans(q), None, PREC, UPCAST) * qk_scale
        sT = _mod_scores(sT, rows[None, :], cols[:, None], b64, h64, Lq, Lk, klen, plen, wl, wr,
                         QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                         BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th,
                         MASK, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                         HAS_BIAS, HAS_TOEP)
        pT = tl.math.exp2(sT - lse2[None, :])
        dpT = dot(v, tl.trans(do), None, PREC, UPCAST)
        if HAS_DROPOUT:
            keepT = tl.trans(dropout_keep(seed, bh64, rows, n0, Lq, Lk, drop_thr, BLOCK_N))
            pdT = tl.where(keepT, pT * rdrop, 0.0)
            dpT = tl.where(keepT, dpT * rdrop, 0.0)
        else:
            pdT = pT
        dv = dot(pdT.to(do.dtype), do, dv, PREC, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        dk = dot(dsT.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    KLEN, PLEN, QSEG, KSEG, DMASK, BIAS, TOEP, CNT1, IDX1, CNT2, IDX2,
    qk_scale, sm_scale, seed, drop_thr, rdrop,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_dob, s_doh, s_dom,
    s_dkb, s_dkh, s_dks, s_dkn, s_dvb, s_dvh, s_dvs, s_dvn,
    s_qsb, s_qsm, s_ksb, s_ksn, s_db, s_dh, s_dm, s_dn, s_bb, s_bh, s_bm, s_bn, s_th,
    s_lb, s_lh, n_list,
    H, Hk, G, GS, NS, Lq, Lk, D, wl, wr,
    CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KLEN: tl.constexpr, HAS_SEG: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_TOEP: tl.constexpr, HAS_DROPOUT: tl.constexpr, ELEMWISE: tl.constexpr,
    SPARSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Lk, BLOCK_N)
    pid_n = pid % num_n
    rest = pid // num_n  # ((b * Hk + hk) * NS + split)
    gsplit = rest % NS
    bhk = rest // NS
    b = bhk // Hk
    hk = bhk % Hk
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)

    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        kv_mask = cols[:, None] < Lk
    else:
        kv_mask = (cols[:, None] < Lk) & (offs_d[None, :] < D)
    cols64 = cols[:, None].to(tl.int64)
    k = tl.load(K + b64 * s_kb + hk64 * s_kh + cols64 * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * s_vb + hk64 * s_vh + cols64 * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)

    klen = Lk
    plen = 0
    if HAS_KLEN:
        klen = tl.load(KLEN + b).to(tl.int32)
    if HAS_PREFIX:
        plen = tl.load(PLEN + b).to(tl.int32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if not SPARSE:
        A, F0, F1, Z = _query_tile_range(n0, Lq, Lk, klen, plen, wl, wr, BLOCK_M, BLOCK_N, CAUSAL, HAS_PREFIX,
                                         HAS_WINDOW, HAS_KLEN, ELEMWISE)
    for gi in range(0, GS):  # the query heads sharing this kv head (this split's share of them)
        h = hk * G + gsplit * GS + gi
        h64 = h.to(tl.int64)
        bh64 = b64 * H + h64
        Q_bh = Q + b64 * s_qb + h64 * s_qh
        DO_bh = DO + b64 * s_dob + h64 * s_doh
        LSE_bh = LSE + bh64 * Lq
        DELTA_bh = DELTA + bh64 * Lq
        if SPARSE:
            lrow = b64 * s_lb + h64 * s_lh + pid_n
            n1 = tl.load(CNT1 + lrow)
            n2 = tl.load(CNT2 + lrow)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, 0, n1, IDX1 + lrow * n_list,
                                 offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                                 b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                 QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                 BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                 True, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                                 HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, 0, n2, IDX2 + lrow * n_list,
                                 offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                                 b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                 QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                 BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                 False, True, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                                 HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
        else:
            dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, A, F0, IDX1,
                                 offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                                 b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                 QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                 BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                 True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                                 HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, F0, F1, IDX1,
                                 offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                                 b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                 QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                 BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                 False, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                                 HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, DELTA_bh, F1, Z, IDX1,
                                 offs_mb, n0, offs_d, D, s_qm, s_dom, qk_scale, rdrop,
                                 b64, h64, bh64, Lq, Lk, klen, plen, wl, wr,
                                 QSEG, KSEG, s_qsb, s_qsm, s_ksb, s_ksn, DMASK, s_db, s_dh, s_dm, s_dn,
                                 BIAS, s_bb, s_bh, s_bm, s_bn, TOEP, s_th, seed, drop_thr,
                                 True, False, CAUSAL, HAS_PREFIX, HAS_WINDOW, HAS_KLEN, HAS_SEG, HAS_DENSE,
                                 HAS_BIAS, HAS_TOEP, HAS_DROPOUT, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
    dk = dk * sm_scale
    gs64 = gsplit.to(tl.int64)
    tl.store(DK + b64 * s_dkb + hk64 * s_dkh + gs64 * s_dks + cols64 * s_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * s_dvb + hk64 * s_dvh + gs64 * s_dvs + cols64 * s_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# ================================================================================================= host code
# Config tables, chosen by compiling for sm_90 offline (ptxas register / spill / shared-memory reports) among
# FlexAttention's and the Triton tutorial's known-good points; "heavy" variants (additive bias, Toeplitz,
# dense mask or dropout: extra per-element loads, multi-buffered in shared memory, or philox registers) use
# fewer pipeline stages and thinner backward tiles so they fit without spills. Forward tiles of a heavy variant
# equal the light ones (the block map is built at attention_tile()). Not yet timed on a GPU: see the report.
def _fwd_configs(D: int, dtype: torch.dtype, device, heavy: bool = False) -> list:
    """Forward configs (BLOCK_M, BLOCK_N, num_warps, num_stages), best first; later ones use less memory."""
    bd = block_d(D)
    key = ("fwd", bd, dtype, heavy)
    if key in _CONFIG_OVERRIDE:
        return list(_CONFIG_OVERRIDE[key])
    if C.interpreted(device):  # small enough that short test sequences span several tiles
        return [(64, 32, 4, 1)]
    cap = C.capability(device)
    if dtype == torch.float32:  # tf32x3 dots: operands twice as large, three products each
        if bd <= 64:
            cfgs = [(128, 64, 8, 2), (64, 64, 4, 2)]
        elif bd <= 128:
            cfgs = [(64, 32, 4, 2), (32, 32, 4, 2)]
        else:
            cfgs = [(32, 32, 4, 2), (32, 16, 4, 1)]
    elif cap[0] >= 9:  # Hopper
        if bd <= 64:
            cfgs = [(128, 64, 8, 2)] if heavy else [(128, 64, 4, 3)]
        elif bd <= 128:
            cfgs = [(128, 64, 8, 2)] if heavy else [(128, 64, 8, 3)]
        else:
            cfgs = [(64, 32, 8, 2)] if heavy else [(64, 32, 4, 3)]
    else:  # Ampere and others (FlexAttention's A100 defaults)
        if bd <= 64:
            cfgs = [(128, 64, 4, 2)] if heavy else [(128, 64, 4, 3)]
        elif bd <= 128:
            cfgs = [(128, 64, 8, 2)] if heavy else [(128, 64, 8, 3)]
        else:
            cfgs = [(64, 32, 8, 2)] if heavy else [(64, 32, 4, 2)]
    # Fallbacks for devices with less shared memory / registers.
    return cfgs + [c for c in ((64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1)) if c not in cfgs]


def _bwd_configs(D: int, dtype: torch.dtype, device, heavy: bool = False) -> list:
    """Backward configs ((BLOCK_M1, BLOCK_N1, warps, stages) for dK/dV, (BLOCK_M2, BLOCK_N2, warps, stages) for
    dQ), best first. BLOCK_M1 is the query step of the dK/dV kernel, BLOCK_N1 its key tile."""
    bd = block_d(D)
    key = ("bwd", bd, dtype, heavy)
    if key in _CONFIG_OVERRIDE:
        return list(_CONFIG_OVERRIDE[key])
    if C.interpreted(device):  # differs from the forward tile: exercises the block-map conversion
        return [((32, 32, 4, 1), (32, 32, 4, 1))]
    cap = C.capability(device)
    if dtype == torch.float32:
        if bd <= 64:
            cfgs = [((16, 64, 4, 2), (64, 32, 4, 2))]
        elif bd <= 128:
            cfgs = [((32, 32, 4, 2), (32, 32, 4, 2))]
        else:
            cfgs = [((16, 32, 4, 1), (32, 16, 4, 1))]
    elif cap[0] >= 9:  # Hopper (light: FlexAttention's sm90 defaults)
        if heavy and bd <= 128:
            cfgs = [((32, 128, 8, 2), (128, 32, 8, 2))]
        elif bd < 64:
            cfgs = [((64, 64, 4, 3), (64, 64, 4, 3))]
        elif bd <= 128:
            cfgs = [((64, 128, 8, 3), (128, 64, 8, 3))]
        else:
            cfgs = [((16, 64, 8, 2), (64, 32, 8, 2))]
    else:  # Ampere and others
        if heavy and bd <= 128:
            cfgs = [((32, 64, 4, 2), (64, 32, 4, 2))]
        elif bd < 64:
            cfgs = [((32, 128, 4, 3), (128, 32, 4, 3))]
        elif bd <= 128:
            cfgs = [((64, 64, 4, 2), (64, 64, 4, 2))]
        else:
            cfgs = [((16, 64, 8, 2), (64, 32, 8, 2))]
    fallbacks = (((32, 64, 4, 2), (64, 32, 4, 2)), ((16, 32, 4, 1), (32, 16, 4, 1)), ((16, 16, 4, 1), (16, 16, 4, 1)))
    return cfgs + [c for c in fallbacks if c not in cfgs]


def attention_tile(head_dim: int, dtype: torch.dtype, device) -> tuple:
    """(block_m, block_n): the tile the forward kernel uses, so the block map should be built at it."""
    bm, bn, _, _ = _fwd_configs(head_dim, dtype, device)[0]
    return bm, bn


_FALLBACK: dict = {}


def _shrink(block: int, L: int) -> int:
    """A tile no larger than needed for L (>= 16, the smallest tl.dot size)."""
    return max(16, min(block, triton.next_power_of_2(max(L, 1))))


# ------------------------------------------------------------------------------------------- block maps
_LIST_CACHE: "OrderedDict" = OrderedDict()
_LIST_CACHE_SIZE = 64


def _convert_map(block_map: Tensor, src_bm: int, src_bn: int, dst_bm: int, dst_bn: int, Lq: int, Lk: int) -> Tensor:
    """The block map at tile (dst_bm, dst_bn), conservatively, with the broadcast B/H dims kept at size 1."""
    bmap = block_map
    if bmap.shape[0] > 1 and bmap.stride(0) == 0:
        bmap = bmap[:1]
    if bmap.shape[1] > 1 and bmap.stride(1) == 0:
        bmap = bmap[:, :1]
    bmap = bmap.to(torch.int8)
    nMt, nNt = triton.cdiv(Lq, dst_bm), triton.cdiv(Lk, dst_bn)
    if (src_bm, src_bn) == (dst_bm, dst_bn):
        t = bmap.clone()
    else:
        nMs, nNs = bmap.shape[2], bmap.shape[3]
        dev = bmap.device

        def ranges(n_t, dst, src, L, n_s):
            i = torch.arange(n_t, device=dev)
            lo = (i * dst) // src
            hi = ((torch.clamp((i + 1) * dst, max=L) - 1) // src + 1).clamp(max=n_s)
            return lo, hi

        r0, r1 = ranges(nMt, dst_bm, src_bm, Lq, nMs)
        c0, c1 = ranges(nNt, dst_bn, src_bn, Lk, nNs)

        def rect(x):  # sums of x over each target tile's source range (2-D prefix sums)
            p = torch.nn.functional.pad(x.to(torch.int32).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
            return (p[..., r1[:, None], c1[None, :]] - p[..., r0[:, None], c1[None, :]]
                    - p[..., r1[:, None], c0[None, :]] + p[..., r0[:, None], c0[None, :]])

        area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        any_vis = rect(bmap != 0) > 0
        all_full = rect(bmap == 2) == area
        t = torch.where(all_full & any_vis, 2, torch.where(any_vis, 1, 0)).to(torch.int8)
    # A ragged last tile (keys past Lk, queries past Lq) is never "full": full tiles are loaded without bounds
    # masks, and the forward must mask keys past Lk.
    if Lk % dst_bn:
        t[..., -1] = torch.clamp(t[..., -1], max=1)
    if Lq % dst_bm:
        t[..., -1, :] = torch.clamp(t[..., -1, :], max=1)
    return t


def _tile_lists(block_map: Tensor, src_bm: int, src_bn: int, dst_bm: int, dst_bn: int, Lq: int, Lk: int,
                transpose: bool):
    """-> (cnt_partial, idx_partial, cnt_full, idx_full) int32 lists per (b, h, row tile) (per key tile when
    transpose), broadcast dims of size 1; cached while the map is alive and unmodified."""
    try:
        version = block_map._version
    except Exception:  # inference tensors have no version counter: no caching
        version = None
    key = (block_map.data_ptr(), tuple(block_map.shape), tuple(block_map.stride()), version, str(block_map.device),
           src_bm, src_bn, dst_bm, dst_bn, Lq, Lk, transpose)
    if version is not None and key in _LIST_CACHE:
        ref, lists = _LIST_CACHE[key]
        _LIST_CACHE.move_to_end(key)
        return lists
    t = _convert_map(block_map, src_bm, src_bn, dst_bm, dst_bn, Lq, Lk)
    if transpose:
        t = t.transpose(-1, -2)
    lists = []
    for val in (1, 2):
        sel = t == val
        cnt = sel.sum(-1, dtype=torch.int32).contiguous()
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
        lists += [cnt, idx]
    lists = tuple(lists)
    if version is not None:
        # Holding the map keeps its memory from being reused by another map while the entry lives.
        _LIST_CACHE[key] = (block_map, lists)
        if len(_LIST_CACHE) > _LIST_CACHE_SIZE:
            _LIST_CACHE.popitem(last=False)
    return lists


def _map_usable(block_map, B, H, Lq, Lk, block_m, block_n) -> bool:
    if block_map is None or block_m is None or block_n is None or block_m <= 0 or block_n <= 0:
        return False
    return (block_map.dim() == 4 and block_map.shape[0] in (1, B) and block_map.shape[1] in (1, H)
            and tuple(block_map.shape[2:]) == (triton.cdiv(Lq, block_m), triton.cdiv(Lk, block_n)))


# --------------------------------------------------------------------------------------- argument packing
class _Masks:
    """The mask parts as kernel arguments (dummy pointers and zero strides for absent parts)."""

    def __init__(self, q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths,
                 q_segments, k_segments, dense_mask, bias, toeplitz, dropout_p, seed):
        dummy = q
        self.causal = bool(causal)
        self.has_prefix = self.causal and prefix_lengths is not None
        wl = int(window_left) if window_left is not None else -1
        wr = int(window_right) if window_right is not None else -1
        # A bound that no (query, key) pair can exceed is no bound (also keeps the index math in int32):
        # i + Lk - Lq - j <= Lk - 1 and j - (i + Lk - Lq) <= Lq - 1 always; Lq + Lk stands for "unbounded".
        has_wl = 0 <= wl < Lk - 1
        has_wr = 0 <= wr < Lq - 1
        self.has_window = has_wl or has_wr
        self.wl = wl if has_wl else Lq + Lk
        self.wr = wr if has_wr else Lq + Lk
        self.has_klen = key_lengths is not None
        self.klen = key_lengths.clamp(0, Lk).to(torch.int32).contiguous() if self.has_klen else dummy
        self.plen = prefix_lengths.clamp(0, Lk).to(torch.int32).contiguous() if self.has_prefix else dummy
        self.has_seg = q_segments is not None and k_segments is not None
        if self.has_seg:
            self.qseg, self.kseg = q_segments, k_segments
            self.s_qs = (q_segments.stride(0), q_segments.stride(1))
            self.s_ks = (k_segments.stride(0), k_segments.stride(1))
        else:
            self.qseg = self.kseg = dummy
            self.s_qs = self.s_ks = (0, 0)
        self.has_dense = dense_mask is not None
        if self.has_dense:
            dm = dense_mask.expand(B, H, Lq, Lk)
            self.dmask = dm.view(torch.uint8) if dm.dtype == torch.bool else (dm != 0).view(torch.uint8)
            self.s_d = tuple(self.dmask.stride())
        else:
            self.dmask, self.s_d = dummy, (0, 0, 0, 0)
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = bias.expand(B, H, Lq, Lk)
            self.s_b = tuple(self.bias.stride())
        else:
            self.bias, self.s_b = dummy, (0, 0, 0, 0)
        self.has_toep = toeplitz is not None
        if self.has_toep:
            self.toep = toeplitz.to(torch.float32).contiguous()
            self.s_t = self.toep.stride(0)
        else:
            self.toep, self.s_t = dummy, 0
        self.p = float(dropout_p)
        self.has_dropout = self.p > 0.0
        self.rdrop = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0
        self.threshold = C.dropout_threshold(self.p)
        self.seed = C.dropout_seed(seed) if self.has_dropout else 0

    @property
    def elementwise(self) -> bool:
        return self.has_seg or self.has_dense

    @property
    def heavy(self) -> bool:
        return self.has_bias or self.has_toep or self.has_dense or self.has_dropout

    def tensors(self):
        return (self.klen, self.plen, self.qseg, self.kseg, self.dmask, self.bias, self.toep)

    def strides(self):
        return (*self.s_qs, *self.s_ks, *self.s_d, *self.s_b, self.s_t)

    def flags(self) -> dict:
        return dict(CAUSAL=self.causal, HAS_PREFIX=self.has_prefix, HAS_WINDOW=self.has_window,
                    HAS_KLEN=self.has_klen, HAS_SEG=self.has_seg, HAS_DENSE=self.has_dense,
                    HAS_BIAS=self.has_bias, HAS_TOEP=self.has_toep, HAS_DROPOUT=self.has_dropout,
                    ELEMWISE=self.elementwise)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton.attention: {name} has dtype {t.dtype}; "
                             "supported: float32, float16, bfloat16")
        if t.dim() != 4:
            raise ValueError(f"ptm_kernels.triton.attention: {name} must be [B, H, L, D], got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("ptm_kernels.triton.attention: q, k, v must share a dtype")
    if q.shape[-1] > 256 or q.shape[-1] < 1:
        raise ValueError(f"ptm_kernels.triton.attention: head dim {q.shape[-1]} not in [1, 256]")


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------ forward
def attention_fwd(q, k, v, scale: float, causal: bool, window_left: int, window_right: int, key_lengths,
                  prefix_lengths, q_segments, k_segments, dense_mask, bias, toeplitz, block_map,
                  block_m: int, block_n: int, dropout_p: float, seed: int):
    """-> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    mk = _Masks(q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths, q_segments,
                k_segments, dense_mask, bias, toeplitz, dropout_p, seed)
    use_map = mk.elementwise and _map_usable(block_map, B, H, Lq, Lk, block_m, block_n)
    cfgs = _fwd_configs(D, q.dtype, q.device, mk.heavy)

    def run(cfg):
        BM, BN, warps, stages = cfg
        BM, BN = _shrink(BM, Lq), _shrink(BN, Lk)
        if BM <= 32:  # decoding-sized query tiles: fewer warps
            warps = min(warps, 4)
        return _fwd_launch(q, k, v, out, lse, float(scale), mk, block_map if use_map else None, block_m,
                           block_n, BM, BN, warps, stages)

    C.first_that_fits(_FALLBACK, ("fwd", block_d(D), q.dtype, str(q.device), mk.heavy), cfgs, run)
    return out, lse


def _fwd_launch(q, k, v, out, lse, scale, mk: _Masks, block_map, map_bm, map_bn, BM, BN, warps, stages):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    BD = block_d(D)
    num_m = triton.cdiv(Lq, BM)
    if block_map is not None:
        lists = _tile_lists(block_map, map_bm, map_bn, BM, BN, Lq, Lk, transpose=False)
        cnt1 = lists[0]
        s_lb = cnt1.stride(0) if cnt1.shape[0] > 1 else 0
        s_lh = cnt1.stride(1) if cnt1.shape[1] > 1 else 0
        n_list = lists[1].shape[-1]
    else:
        lists = (lse, lse, lse, lse)  # dummies
        s_lb = s_lh = n_list = 0

    # Split the keys across programs when the query tiles alone cannot fill the device (decoding).
    programs = num_m * B * H
    n_kt = triton.cdiv(Lk, BN)
    n_sms = C.num_sms(q.device)
    if _FORCE_SPLITS is not None:
        n_split = max(1, min(_FORCE_SPLITS, n_kt))
    elif programs < n_sms and n_kt >= 4:
        n_split = max(1, min(triton.cdiv(2 * n_sms, programs), n_kt // 2, 128))
    else:
        n_split = 1
    split = n_split > 1
    if split:
        o_buf = torch.empty((n_split, B, H, Lq, D), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((n_split, B, H, Lq), dtype=torch.float32, device=q.device)
        o_strides = (o_buf.stride(1), o_buf.stride(2), o_buf.stride(3), o_buf.stride(0))
        l_split_stride = l_buf.stride(0)
    else:
        o_buf, l_buf = out, lse
        o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
        l_split_stride = 0

    _attn_fwd_kernel[(programs, n_split)](
        q, k, v, o_buf, l_buf, *mk.tensors(), *lists,
        scale * LOG2E, mk.seed, mk.threshold, mk.rdrop,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *o_strides, l_split_stride,
        *mk.strides(),
        s_lb, s_lh, n_list,
        H, H // Hk, Lq, Lk, D, mk.wl, mk.wr, n_split,
        **mk.flags(), SPARSE=block_map is not None, SPLIT=split,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, EVEN_D=(D == BD), PREC=C.precision(q.dtype, q.device),
        UPCAST=C.upcast(q.dtype, q.device),
        num_warps=warps, num_stages=stages,
    )
    if split:
        BMC = _shrink(32 if BD <= 128 else 16, Lq)
        _attn_combine_kernel[(triton.cdiv(Lq, BMC) * B * H,)](
            o_buf, l_buf, out, lse, o_buf.stride(0), l_buf.stride(0),
            out.stride(0), out.stride(1), out.stride(2), H, Lq, D, n_split,
            BLOCK_M=BMC, BLOCK_D=BD, EVEN_D=(D == BD), num_warps=4,
        )
    return None


def attention_dropout_mask(seed: int, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device) -> Tensor:
    """This backend's dropout keep-mask (bool [B, H, Lq, Lk]) for `seed`, as the kernels compute it."""
    out = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.view(torch.bool)
    BM, BN = 32, 64
    grid = (triton.cdiv(Lq, BM) * triton.cdiv(Lk, BN) * B * H,)
    _dropout_mask_kernel[grid](out, C.dropout_seed(seed), C.dropout_threshold(dropout_p), Lq, Lk, BLOCK_M=BM,
                               BLOCK_N=BN, num_warps=4)
    return out.view(torch.bool)


# ----------------------------------------------------------------------------------------------- backward
def attention_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, window_left: int, window_right: int,
                  key_lengths, prefix_lengths, q_segments, k_segments, dense_mask, bias, toeplitz, block_map,
                  block_m: int, block_n: int, dropout_p: float, seed: int, bias_requires_grad: bool,
                  toeplitz_requires_grad: bool):
    """-> (dq, dk, dv, dbias, dtoeplitz); see reference_kernels.attention_bwd."""
    _check(q, k, v)
    q, k, v, dout, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout), _unit_last(out)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    dev = q.device
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hk, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hk, Lk, D), dtype=v.dtype, device=dev)
    dbias = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=dev) if bias_requires_grad else q.new_empty(0)
    dtoep = (torch.zeros((H, Lq + Lk - 1), dtype=torch.float32, device=dev) if toeplitz_requires_grad
             else q.new_empty(0))
    if B * H == 0 or Lq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dbias, dtoep
    lse = lse.to(torch.float32).contiguous()
    mk = _Masks(q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths, q_segments,
                k_segments, dense_mask, bias, toeplitz, dropout_p, seed)
    use_map = mk.elementwise and _map_usable(block_map, B, H, Lq, Lk, block_m, block_n)
    BD = block_d(D)

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    BMP = _shrink(64, Lq)
    _bwd_preprocess_kernel[(triton.cdiv(Lq, BMP) * B * H,)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), H, Lq, D,
        BLOCK_M=BMP, BLOCK_D=BD, EVEN_D=(D == BD), num_warps=4,
    )

    def run(cfg):
        if toeplitz_requires_grad:
            dtoep.zero_()  # a retried config starts over (the dQ kernel accumulates into it)
        _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, dbias, dtoep, float(scale), mk,
                    block_map if use_map else None, block_m, block_n, cfg, bias_requires_grad,
                    toeplitz_requires_grad)

    C.first_that_fits(_FALLBACK, ("bwd", BD, q.dtype, str(dev), mk.heavy), _bwd_configs(D, q.dtype, dev, mk.heavy), run)
    return dq, dk, dv, dbias, dtoep


def _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, dbias, dtoep, scale, mk: _Masks, block_map, map_bm, map_bn,
                cfg, has_dbias, has_dtoep):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    G = H // Hk
    BD = block_d(D)
    (BM1, BN1, w1, st1), (BM2, BN2, w2, st2) = cfg
    BM1, BN1 = _shrink(BM1, Lq), _shrink(BN1, Lk)
    BM2, BN2 = _shrink(BM2, Lq), _shrink(BN2, Lk)
    if BN1 <= 32:  # tiny tiles (short sequences): fewer warps
        w1 = min(w1, 4)
    if BM2 <= 32:
        w2 = min(w2, 4)
    prec = C.precision(q.dtype, q.device)
    flags = mk.flags()
    common_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))

    def lists_for(bm, bn, transpose):
        if block_map is None:
            return (lse, lse, lse, lse), 0, 0, 0
        ls = _tile_lists(block_map, map_bm, map_bn, bm, bn, Lq, Lk, transpose)
        cnt = ls[0]
        return ls, (cnt.stride(0) if cnt.shape[0] > 1 else 0), (cnt.stride(1) if cnt.shape[1] > 1 else 0), \
            ls[1].shape[-1]

    # dK / dV: one program per (key tile, b, kv head, group split).
    num_n = triton.cdiv(Lk, BN1)
    base_programs = num_n * B * Hk
    if _FORCE_GROUP_SPLITS is not None:
        ns = _FORCE_GROUP_SPLITS
    elif G > 1 and base_programs < C.num_sms(q.device):
        ns = min(G, triton.cdiv(2 * C.num_sms(q.device), base_programs))
    else:
        ns = 1
    while G % ns:
        ns -= 1
    if ns > 1:
        dk_buf = torch.empty((B, Hk, ns, Lk, D), dtype=torch.float32, device=q.device)
        dv_buf = torch.empty((B, Hk, ns, Lk, D), dtype=torch.float32, device=q.device)
        dk_str = (dk_buf.stride(0), dk_buf.stride(1), dk_buf.stride(2), dk_buf.stride(3))
        dv_str = (dv_buf.stride(0), dv_buf.stride(1), dv_buf.stride(2), dv_buf.stride(3))
    else:
        dk_buf, dv_buf = dk, dv
        dk_str = (dk.stride(0), dk.stride(1), 0, dk.stride(2))
        dv_str = (dv.stride(0), dv.stride(1), 0, dv.stride(2))
    ls1, s_lb1, s_lh1, n_list1 = lists_for(BM1, BN1, True)
    _attn_bwd_dkdv_kernel[(base_programs * ns,)](
        q, k, v, dout, lse, delta, dk_buf, dv_buf, *mk.tensors(), *ls1,
        scale * LOG2E, scale, mk.seed, mk.threshold, mk.rdrop,
        *common_strides, *dk_str, *dv_str, *mk.strides(),
        s_lb1, s_lh1, n_list1,
        H, Hk, G, G // ns, ns, Lq, Lk, D, mk.wl, mk.wr,
        **flags, SPARSE=block_map is not None, BLOCK_M=BM1, BLOCK_N=BN1, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device), num_warps=w1, num_stages=st1,
    )
    if ns > 1:
        dk.copy_(dk_buf.sum(2))
        dv.copy_(dv_buf.sum(2))

    # dQ (and dS for the bias / Toeplitz gradients): one program per (query tile, b, h).
    ls2, s_lb2, s_lh2, n_list2 = lists_for(BM2, BN2, False)
    _attn_bwd_dq_kernel[(triton.cdiv(Lq, BM2) * B * H,)](
        q, k, v, dout, lse, delta, dq, dbias if has_dbias else lse, dtoep if has_dtoep else lse,
        *mk.tensors(), *ls2,
        scale * LOG2E, scale, mk.seed, mk.threshold, mk.rdrop,
        *common_strides, dq.stride(0), dq.stride(1), dq.stride(2), (dtoep.stride(0) if has_dtoep else 0),
        *mk.strides(),
        s_lb2, s_lh2, n_list2,
        H, G, Lq, Lk, D, mk.wl, mk.wr,
        **flags, HAS_DBIAS=bool(has_dbias), HAS_DTOEP=bool(has_dtoep),
        SPARSE=block_map is not None, BLOCK_M=BM2, BLOCK_N=BN2, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device), num_warps=w2, num_stages=st2,
    )
