"""Relative-position attention (Transformer-XL / XLNet), forward and backward, as Triton kernels.

The interface (arguments, results, semantics) is `ptm_kernels.reference_relative` (relative_attention_fwd/bwd,
two_stream_attention_fwd/bwd). Layout [B, H, L, D], unit stride in D, any other strides; r [B, H, R, D]
(stride 0 on B when shared).

Position term without a rel-shift copy: row i (at position p_i) and key j use r row
t = r_offset - (p_i + Lk - q_len - j) = base_i + j (rows outside [0, R) give a 0 term); no [Lq, Lk] or [Lq, R]
tensor in memory. Two forms, chosen per stream by a constexpr flag:
- band (rows consecutive: positions None, row i at position i): t = c - i + j with c = r_offset - (Lk - q_len),
  so a (row tile m0.., key tile n0..) pair uses only the BLOCK_M + BLOCK_N - 1 consecutive rows of r from
  t_lo = c - (m0 + BLOCK_M - 1) + n0. The kernel loads that band (BAND rows, a power of two), computes
  PB = qv_tile . band^T [BLOCK_M, BAND] on tensor cores and selects pos[i, j] = PB[i, (m0 + BLOCK_M - 1 - i) +
  (j - n0)] with tl.gather; the backward forms the band image of dS the same way (DPB[i, c] = dS[i, c - (m0 +
  BLOCK_M - 1 - i)]) and takes dqv += DPB . band, dr[band] += DPB^T . qv_tile: two dots and BAND x D atomics per
  tile instead of BLOCK_M x BLOCK_N x D loads and atomics.
- gather (arbitrary rows: the query stream of XLNet with target_mapping): for each row, the BLOCK_N rows of r it
  needs (r[base_i + j0 + n], a [BLOCK_M, BLOCK_N, D_CHUNK] gather over D chunks), reduced in registers. On a GPU
  it is also the fallback of every stream when the band kernel does not fit in shared memory (_launch).

Forward: one program per (row tile, b * h, stream); online softmax in base 2, float32 accumulation; the two streams
of two_stream_attention_fwd run in one launch (grid axis 2 = stream). Backward: one program per (row tile, b * h,
stream) recomputes the probabilities from lse, accumulates dqu, dseg and (band form) dqv in registers (the gather
form adds dqv chunks into its float32 buffer) and adds dk, dv, dr into float32 buffers with atomics (both streams
in one launch, so their sums land in the same buffers). Dropout: attention's (_common.dropout_keep) with Lr rows,
the query stream with seed + 1; deterministic per seed (its own mask, not the reference's).

Precision: q.k^T, dO.v^T and qv.band^T take the inputs' dtype; the probabilities and dS (and DPB) stay float32 in
their dots (tf32 on a GPU for 16-bit inputs, "ieee" or tf32 for float32 per torch.backends.cuda.matmul.allow_tf32):
the position and bias gradients sum dS over many rows, and rounding dS to bfloat16 (as FlashAttention does) tripled
their error against the float64 truth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common as C
from ._common import LN2, LOG2E, SUPPORTED_DTYPES, analytic_visible, dot, dropout_keep

# device-code copies: a compiled (non-interpreted) kernel may read only constexpr globals
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)


# =============================================================================================== device code
@triton.jit
def _pos_gather(QV_row, R_bh, s_rt, base, offs_n, row_ok, col_ok, R, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
                D: tl.constexpr):
    """Position term for rows at arbitrary positions: row m, key n uses r[base_m + n], loaded per (row, key)
    over D chunks and reduced in registers (float32). QV_row: pointers to qv[row, 0] ([BLOCK_M, 1])."""
    t = base[:, None] + offs_n[None, :]  # int64 [BLOCK_M, BLOCK_N]
    t_ok = (t >= 0) & (t < R) & row_ok[:, None] & col_ok[None, :]
    dc = tl.arange(0, D_CHUNK)
    pos = tl.zeros(t.shape, dtype=tl.float32)
    for d0 in range(0, BLOCK_D, D_CHUNK):
        dmask = (d0 + dc) < D
        qv_c = tl.load(QV_row + (d0 + dc)[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
        r3 = tl.load(R_bh + t[:, :, None] * s_rt + (d0 + dc)[None, None, :],
                     mask=t_ok[:, :, None] & dmask[None, None, :], other=0.0)
        pos += tl.sum(qv_c.to(tl.float32)[:, None, :] * r3.to(tl.float32), axis=2)
    return pos


@triton.jit
def _band_rows(R_bh, s_rt, t_band, R, offs_d, D: tl.constexpr):
    """r[t_band] ([BAND, BLOCK_D], input dtype) and which rows exist; rows outside [0, R) read as 0, so the
    position term of an invalid t is 0."""
    band_ok = (t_band >= 0) & (t_band < R)
    r_band = tl.load(R_bh + t_band[:, None] * s_rt + offs_d[None, :], mask=band_ok[:, None] & (offs_d < D)[None, :],
                     other=0.0)
    return r_band, band_ok


@triton.jit
def _pos_band(qv, r_band, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Position term for consecutive rows: local row m, key n uses band row (BLOCK_M - 1 - m) + n. One dot
    against the band (tensor cores), then the diagonal select."""
    pb = dot(qv, tl.trans(r_band), None, PREC, UPCAST)  # [BLOCK_M, BAND]
    idx = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] + tl.arange(0, BLOCK_N)[None, :]
    return tl.gather(pb, idx, axis=1)


@triton.jit
def _band_grad(g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """The transpose of _pos_band's select: dpb[m, c] = g[m, c - (BLOCK_M - 1 - m)] where that key index is in
    [0, BLOCK_N), else 0 ([BLOCK_M, BAND], float32)."""
    n = tl.arange(0, BAND)[None, :] - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]
    n_ok = (n >= 0) & (n < BLOCK_N)
    return tl.where(n_ok, tl.gather(g, tl.where(n_ok, n, 0), axis=1), 0.0)


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


@triton.jit
def _stream_fwd(pid_m, bh, QU, QV, SEG, QIDS, POS, QSEG, KLEN, PLEN, DM, O, LSE,
                s_qub, s_quh, s_qum, s_qvb, s_qvh, s_qvm, s_dmb, s_dmh, s_dmm, s_dmn, s_ob, s_oh, s_om,
                Lr, wl, wr, seed,
                K, V, R, KIDS, KSEG, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                H, Lk, R_len, q_len, r_offset, scale2, drop_thr, rdrop,
                CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, GATHER: tl.constexpr, HAS_SEG: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_VSEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if pid_m * BLOCK_M < Lr:
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        bh64 = bh.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Lr
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        rows64 = rows.to(tl.int64)
        qu = tl.load(QU + b64 * s_qub + h64 * s_quh + rows64[:, None] * s_qum + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        QV_row = QV + b64 * s_qvb + h64 * s_qvh + rows64[:, None] * s_qvm
        if not GATHER:
            qv = tl.load(QV_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        ip, base, t_last, seg0, seg1, qid, klen, plen = _row_terms(
            POS, SEG, QIDS, KLEN, PLEN, pid_m, b, b64, bh64, rows, rows64, row_ok, Lr, Lk, q_len, r_offset,
            HAS_POS, HAS_SEG, HAS_KLEN, HAS_PREFIX, BLOCK_M)
        K_bh = K + b64 * s_kb + h64 * s_kh
        V_bh = V + b64 * s_vb + h64 * s_vh
        R_bh = R + b64 * s_rb + h64 * s_rh
        KIDS_b = KIDS + b64 * Lk
        QSEG_b = QSEG + b64 * Lr
        KSEG_b = KSEG + b64 * Lk
        DM_bh = DM + b64 * s_dmb + h64 * s_dmh
        # key range: causal (without prefix) ends after the last row's position; a left window starts late
        hi = Lk
        if CAUSAL:
            if not HAS_PREFIX:
                hi = tl.minimum(Lk, (tl.max(tl.where(row_ok, ip, -1)) + 1).to(tl.int32))
        lo_w = tl.maximum(tl.min(tl.where(row_ok, ip, Lk + wl)) - wl, 0).to(tl.int32)
        lo = tl.where(wl >= 0, (lo_w // BLOCK_N) * BLOCK_N, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            if GATHER:  # arbitrary row positions (XLNet's query stream): r[t] per (row, key)
                pos = _pos_gather(QV_row, R_bh, s_rt, base, offs_n, row_ok, col_ok, R_len, BLOCK_D, D_CHUNK, D)
            else:  # consecutive rows: the tile needs only the band r[t_last + start_n + c], c < BAND
                r_band, band_ok = _band_rows(R_bh, s_rt, t_last + start_n + tl.arange(0, BAND), R_len, offs_d, D)
                pos = _pos_band(qv, r_band, BLOCK_M, BLOCK_N, PREC, UPCAST)
            s, k = _scores(qu, pos, K_bh, s_kn, KIDS_b, seg0, seg1, qid, offs_n, col_ok, scale2, HAS_SEG, BLOCK_D, D,
                           PREC, UPCAST)
            vis = _visible(rows, ip, offs_n, row_ok, col_ok, b64, h64, klen, plen, wl, wr, QSEG_b, KSEG_b, DM_bh,
                           s_dmm, s_dmn, CAUSAL, HAS_KLEN, HAS_PREFIX, HAS_VSEG, HAS_DENSE)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            pr = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(pr, 1)
            if DROPOUT:
                keep = dropout_keep(seed, bh64, rows, start_n, Lr, Lk, drop_thr, BLOCK_N)
                pr = tl.where(keep, pr * rdrop, 0.0)
            v = tl.load(V_bh + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + dot(pr, v.to(tl.float32), None, PREC, UPCAST)
            m_i = m_new
        seen = l_i != 0.0  # l_i is 0 only for a row with no visible key; NaN (a NaN or +inf score) propagates
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
        tl.store(O + b64 * s_ob + h64 * s_oh + rows64[:, None] * s_om + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh64 * Lr + rows, lse, mask=row_ok)


@triton.jit
def _rel_fwd_kernel(
        QU0, QV0, SEG0, QIDS0, POS0, QSEG0, KLEN0, PLEN0, DM0, O0, LSE0,
        s0_qub, s0_quh, s0_qum, s0_qvb, s0_qvh, s0_qvm, s0_dmb, s0_dmh, s0_dmm, s0_dmn, s0_ob, s0_oh, s0_om,
        Lr0, wl0, wr0,
        QU1, QV1, SEG1, QIDS1, POS1, QSEG1, KLEN1, PLEN1, DM1, O1, LSE1,
        s1_qub, s1_quh, s1_qum, s1_qvb, s1_qvh, s1_qvm, s1_dmb, s1_dmh, s1_dmm, s1_dmn, s1_ob, s1_oh, s1_om,
        Lr1, wl1, wr1,
        K, V, R, KIDS, KSEG, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
        H, Lk, R_len, q_len, r_offset, scale2, drop_thr, rdrop, seed,
        CAUSAL0: tl.constexpr, HAS_POS0: tl.constexpr, HAS_SEG0: tl.constexpr, HAS_KLEN0: tl.constexpr, HAS_PREFIX0: tl.constexpr,
        HAS_VSEG0: tl.constexpr, HAS_DENSE0: tl.constexpr,
        CAUSAL1: tl.constexpr, HAS_POS1: tl.constexpr, HAS_SEG1: tl.constexpr, HAS_KLEN1: tl.constexpr, HAS_PREFIX1: tl.constexpr,
        HAS_VSEG1: tl.constexpr, HAS_DENSE1: tl.constexpr, DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
        D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    stream = tl.program_id(2)
    if stream == 0:
        _stream_fwd(pid_m, bh, QU0, QV0, SEG0, QIDS0, POS0, QSEG0, KLEN0, PLEN0, DM0, O0, LSE0,
                    s0_qub, s0_quh, s0_qum, s0_qvb, s0_qvh, s0_qvm, s0_dmb, s0_dmh, s0_dmm, s0_dmn, s0_ob, s0_oh,
                    s0_om, Lr0, wl0, wr0, seed,
                    K, V, R, KIDS, KSEG, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                    H, Lk, R_len, q_len, r_offset, scale2, drop_thr, rdrop,
                    CAUSAL0, HAS_POS0, HAS_POS0 or BAND == 0, HAS_SEG0, HAS_KLEN0, HAS_PREFIX0, HAS_VSEG0,
                    HAS_DENSE0, DROPOUT,
                    BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)
    else:
        _stream_fwd(pid_m, bh, QU1, QV1, SEG1, QIDS1, POS1, QSEG1, KLEN1, PLEN1, DM1, O1, LSE1,
                    s1_qub, s1_quh, s1_qum, s1_qvb, s1_qvh, s1_qvm, s1_dmb, s1_dmh, s1_dmm, s1_dmn, s1_ob, s1_oh,
                    s1_om, Lr1, wl1, wr1, seed + 1,
                    K, V, R, KIDS, KSEG, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                    H, Lk, R_len, q_len, r_offset, scale2, drop_thr, rdrop,
                    CAUSAL1, HAS_POS1, HAS_POS1 or BAND == 0, HAS_SEG1, HAS_KLEN1, HAS_PREFIX1, HAS_VSEG1,
                    HAS_DENSE1, DROPOUT,
                    BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)


@triton.jit
def _stream_bwd(pid_m, bh, QU, QV, SEG, QIDS, POS, QSEG, KLEN, PLEN, DM, DO, LSE, DELTA, DQU, DQV, DSEG,
                s_qub, s_quh, s_qum, s_qvb, s_qvh, s_qvm, s_dmb, s_dmh, s_dmm, s_dmn, s_dob, s_doh, s_dom,
                Lr, wl, wr, seed,
                K, V, R, KIDS, KSEG, DK, DV, DR, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                H, Lk, R_len, q_len, r_offset, scale2, scale, drop_thr, rdrop,
                CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, GATHER: tl.constexpr, HAS_SEG: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_VSEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if pid_m * BLOCK_M < Lr:
        b = bh // H
        h = bh % H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        bh64 = bh.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Lr
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        rows64 = rows.to(tl.int64)
        rd_ok = row_ok[:, None] & d_ok[None, :]
        qu = tl.load(QU + b64 * s_qub + h64 * s_quh + rows64[:, None] * s_qum + offs_d[None, :], mask=rd_ok,
                     other=0.0)
        QV_row = QV + b64 * s_qvb + h64 * s_qvh + rows64[:, None] * s_qvm
        if not GATHER:
            qv = tl.load(QV_row + offs_d[None, :], mask=rd_ok, other=0.0)
        do = tl.load(DO + b64 * s_dob + h64 * s_doh + rows64[:, None] * s_dom + offs_d[None, :], mask=rd_ok,
                     other=0.0)
        lse = tl.load(LSE + bh64 * Lr + rows, mask=row_ok, other=float("-inf")) * _LOG2E
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
        delta = tl.load(DELTA + bh64 * Lr + rows, mask=row_ok, other=0.0)
        ip, base, t_last, seg0, seg1, qid, klen, plen = _row_terms(
            POS, SEG, QIDS, KLEN, PLEN, pid_m, b, b64, bh64, rows, rows64, row_ok, Lr, Lk, q_len, r_offset,
            HAS_POS, HAS_SEG, HAS_KLEN, HAS_PREFIX, BLOCK_M)
        K_bh = K + b64 * s_kb + h64 * s_kh
        V_bh = V + b64 * s_vb + h64 * s_vh
        R_bh = R + b64 * s_rb + h64 * s_rh
        DK_bh = DK + bh64 * Lk * D  # float32 contiguous buffers
        DV_bh = DV + bh64 * Lk * D
        DR_bh = DR + bh64 * R_len * D
        KIDS_b = KIDS + b64 * Lk
        QSEG_b = QSEG + b64 * Lr
        KSEG_b = KSEG + b64 * Lk
        DM_bh = DM + b64 * s_dmb + h64 * s_dmh
        # key range: causal (without prefix) ends after the last row's position; a left window starts late
        hi = Lk
        if CAUSAL:
            if not HAS_PREFIX:
                hi = tl.minimum(Lk, (tl.max(tl.where(row_ok, ip, -1)) + 1).to(tl.int32))
        lo_w = tl.maximum(tl.min(tl.where(row_ok, ip, Lk + wl)) - wl, 0).to(tl.int32)
        lo = tl.where(wl >= 0, (lo_w // BLOCK_N) * BLOCK_N, 0)
        dqu = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dqv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # band path (the gather path adds into DQV)
        DQV_bh = DQV + bh64 * Lr * D  # float32, zero-initialised
        dseg0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dseg1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dc = tl.arange(0, D_CHUNK)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            if GATHER:
                pos = _pos_gather(QV_row, R_bh, s_rt, base, offs_n, row_ok, col_ok, R_len, BLOCK_D, D_CHUNK, D)
            else:
                t_band = t_last + start_n + tl.arange(0, BAND)
                r_band, band_ok = _band_rows(R_bh, s_rt, t_band, R_len, offs_d, D)
                pos = _pos_band(qv, r_band, BLOCK_M, BLOCK_N, PREC, UPCAST)
            s, k = _scores(qu, pos, K_bh, s_kn, KIDS_b, seg0, seg1, qid, offs_n, col_ok, scale2, HAS_SEG, BLOCK_D, D,
                           PREC, UPCAST)
            vis = _visible(rows, ip, offs_n, row_ok, col_ok, b64, h64, klen, plen, wl, wr, QSEG_b, KSEG_b, DM_bh,
                           s_dmm, s_dmn, CAUSAL, HAS_KLEN, HAS_PREFIX, HAS_VSEG, HAS_DENSE)
            pr = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            kv_ok = col_ok[:, None] & d_ok[None, :]
            v = tl.load(V_bh + offs_n[:, None].to(tl.int64) * s_vn + offs_d[None, :], mask=kv_ok, other=0.0)
            dp = dot(do, tl.trans(v), None, PREC, UPCAST)
            if DROPOUT:
                keep = dropout_keep(seed, bh64, rows, start_n, Lr, Lk, drop_thr, BLOCK_N)
                pd = tl.where(keep, pr * rdrop, 0.0)
                dp = tl.where(keep, dp * rdrop, 0.0)
            else:
                pd = pr
            # gradient of the unscaled score sum; 0 at hidden entries and columns past Lk even in a NaN row (where
            # delta is NaN), so that the band products do not carry it to rows of r no pair of the row uses
            g = tl.where(vis, pr * (dp - delta[:, None]) * scale, 0.0)
            # dv += pd^T do, dk += g^T qu (float32 atomics: rows of other programs land there too)
            dv_t = dot(tl.trans(pd), do.to(tl.float32), None, PREC, UPCAST)
            dk_t = dot(tl.trans(g), qu.to(tl.float32), None, PREC, UPCAST)
            kd_ptr = offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
            tl.atomic_add(DV_bh + kd_ptr, dv_t, mask=kv_ok)
            tl.atomic_add(DK_bh + kd_ptr, dk_t, mask=kv_ok)
            dqu += dot(g, k.to(tl.float32), None, PREC, UPCAST)
            if HAS_SEG:
                kid = tl.load(KIDS_b + offs_n, mask=col_ok, other=0)
                same = qid[:, None] == kid[None, :]
                dseg0 += tl.sum(tl.where(same, g, 0.0), 1)
                dseg1 += tl.sum(tl.where(same, 0.0, g), 1)
            # position term: dqv_m += sum_n g r[t], dr[t] += g qv_m
            if GATHER:  # per (row, key), over D chunks
                t = base[:, None] + offs_n[None, :]
                t_ok = (t >= 0) & (t < R_len) & row_ok[:, None] & col_ok[None, :]
                for d0 in range(0, BLOCK_D, D_CHUNK):
                    dmask = (d0 + dc) < D
                    m3 = t_ok[:, :, None] & dmask[None, None, :]
                    r3 = tl.load(R_bh + t[:, :, None] * s_rt + (d0 + dc)[None, None, :], mask=m3, other=0.0)
                    part = tl.sum(g[:, :, None] * r3.to(tl.float32), axis=1)  # [BLOCK_M, D_CHUNK]
                    # dqv (float32 [B, H, Lr, D], rows owned by this program): read, add, write the chunk
                    dqv_ptr = DQV_bh + rows64[:, None] * D + (d0 + dc)[None, :]
                    cmask = row_ok[:, None] & dmask[None, :]
                    tl.store(dqv_ptr, tl.load(dqv_ptr, mask=cmask, other=0.0) + part, mask=cmask)
                    qv_c = tl.load(QV_row + (d0 + dc)[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
                    tl.atomic_add(DR_bh + t[:, :, None] * D + (d0 + dc)[None, None, :],
                                  g[:, :, None] * qv_c.to(tl.float32)[:, None, :], mask=m3)
            else:  # band form of g: dqv += dpb r_band, dr[t_band] += dpb^T qv (two dots, BAND x D atomics)
                dpb = _band_grad(g, BLOCK_M, BLOCK_N, BAND)
                dqv += dot(dpb, r_band.to(tl.float32), None, PREC, UPCAST)
                dr_t = dot(tl.trans(dpb), qv.to(tl.float32), None, PREC, UPCAST)  # [BAND, BLOCK_D]
                tl.atomic_add(DR_bh + t_band[:, None] * D + offs_d[None, :], dr_t,
                              mask=band_ok[:, None] & d_ok[None, :])
        if not GATHER:
            tl.store(DQV_bh + rows64[:, None] * D + offs_d[None, :], dqv, mask=rd_ok)
        tl.store(DQU + b64 * s_qub + h64 * s_quh + rows64[:, None] * s_qum + offs_d[None, :],
                 dqu.to(DQU.dtype.element_ty), mask=rd_ok)
        if HAS_SEG:
            dseg_ptr = DSEG + (bh64 * Lr + rows64) * 2
            tl.store(dseg_ptr, dseg0, mask=row_ok)
            tl.store(dseg_ptr + 1, dseg1, mask=row_ok)


@triton.jit
def _rel_bwd_kernel(
        QU0, QV0, SEG0, QIDS0, POS0, QSEG0, KLEN0, PLEN0, DM0, DO0, LSE0, DELTA0, DQU0, DQV0, DSEG0,
        s0_qub, s0_quh, s0_qum, s0_qvb, s0_qvh, s0_qvm, s0_dmb, s0_dmh, s0_dmm, s0_dmn, s0_dob, s0_doh, s0_dom,
        Lr0, wl0, wr0,
        QU1, QV1, SEG1, QIDS1, POS1, QSEG1, KLEN1, PLEN1, DM1, DO1, LSE1, DELTA1, DQU1, DQV1, DSEG1,
        s1_qub, s1_quh, s1_qum, s1_qvb, s1_qvh, s1_qvm, s1_dmb, s1_dmh, s1_dmm, s1_dmn, s1_dob, s1_doh, s1_dom,
        Lr1, wl1, wr1,
        K, V, R, KIDS, KSEG, DK, DV, DR, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
        H, Lk, R_len, q_len, r_offset, scale2, scale, drop_thr, rdrop, seed,
        CAUSAL0: tl.constexpr, HAS_POS0: tl.constexpr, HAS_SEG0: tl.constexpr, HAS_KLEN0: tl.constexpr, HAS_PREFIX0: tl.constexpr,
        HAS_VSEG0: tl.constexpr, HAS_DENSE0: tl.constexpr,
        CAUSAL1: tl.constexpr, HAS_POS1: tl.constexpr, HAS_SEG1: tl.constexpr, HAS_KLEN1: tl.constexpr, HAS_PREFIX1: tl.constexpr,
        HAS_VSEG1: tl.constexpr, HAS_DENSE1: tl.constexpr, DROPOUT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
        D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    stream = tl.program_id(2)
    if stream == 0:
        _stream_bwd(pid_m, bh, QU0, QV0, SEG0, QIDS0, POS0, QSEG0, KLEN0, PLEN0, DM0, DO0, LSE0, DELTA0, DQU0, DQV0,
                    DSEG0, s0_qub, s0_quh, s0_qum, s0_qvb, s0_qvh, s0_qvm, s0_dmb, s0_dmh, s0_dmm, s0_dmn, s0_dob,
                    s0_doh, s0_dom, Lr0, wl0, wr0, seed,
                    K, V, R, KIDS, KSEG, DK, DV, DR, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                    H, Lk, R_len, q_len, r_offset, scale2, scale, drop_thr, rdrop,
                    CAUSAL0, HAS_POS0, HAS_POS0 or BAND == 0, HAS_SEG0, HAS_KLEN0, HAS_PREFIX0, HAS_VSEG0,
                    HAS_DENSE0, DROPOUT,
                    BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)
    else:
        _stream_bwd(pid_m, bh, QU1, QV1, SEG1, QIDS1, POS1, QSEG1, KLEN1, PLEN1, DM1, DO1, LSE1, DELTA1, DQU1, DQV1,
                    DSEG1, s1_qub, s1_quh, s1_qum, s1_qvb, s1_qvh, s1_qvm, s1_dmb, s1_dmh, s1_dmm, s1_dmn, s1_dob,
                    s1_doh, s1_dom, Lr1, wl1, wr1, seed + 1,
                    K, V, R, KIDS, KSEG, DK, DV, DR, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt,
                    H, Lk, R_len, q_len, r_offset, scale2, scale, drop_thr, rdrop,
                    CAUSAL1, HAS_POS1, HAS_POS1 or BAND == 0, HAS_SEG1, HAS_KLEN1, HAS_PREFIX1, HAS_VSEG1,
                    HAS_DENSE1, DROPOUT,
                    BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)


# ================================================================================================ launchers


def _config(D: int, dtype, device):
    block_d = max(16, triton.next_power_of_2(D))
    if C.interpreted(device):
        cfg, warps = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, D_CHUNK=min(block_d, 16)), 4
    else:
        cfg, warps = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, D_CHUNK=8), 8
    # rows of r one (row tile, key tile) pair uses when its rows are consecutive: BLOCK_M + BLOCK_N - 1
    cfg["BAND"] = triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"])
    return cfg, warps


# GPU launch options (band path?, num_stages), fastest first. The band path keeps r_band and more dot operands in
# shared memory, and software pipelining multiplies the loads' buffers. Compiled for sm_90 (triton 3.6 and 3.7)
# with 3 stages, 16-bit inputs need 64 / 128 KB (forward) and 100 / 205 KB (backward) at D = 64 / 128, float32
# up to twice that; an H100 / H200 block may have 227 KB, so float32 at D = 128 runs with 2 stages (forward) or
# 1 (backward with tf32x3), D = 256 with 1 or 2 stages or (float32 backward) the gather path. A kernel that does
# not fit raises OutOfResources when it is loaded, before it runs (nothing written yet), and the next option is
# tried; the choice is kept per specialisation. Last resort: every stream on the gather path (BAND = 0), the
# form that needs the least shared memory. GPUs with less shared memory per block step down the same way.
_GPU_OPTIONS = ((True, 3), (True, 2), (True, 1), (False, 3), (False, 1))
_GPU_CHOICE: dict = {}


def _launch(kernel, grid, device, cfg, warps, *args, **kw):
    if C.interpreted(device):  # the interpreter: no resource limits
        kernel[grid](*args, num_warps=warps, **cfg, **kw)
        return
    key = (kernel.fn.__name__, device.index, *sorted(kw.items()), *sorted(cfg.items()), warps,
           *(a.dtype for a in args if isinstance(a, Tensor)))

    def launch(option):
        band, stages = option
        kernel[grid](*args, num_warps=warps, num_stages=stages, **dict(cfg, BAND=cfg["BAND"] if band else 0), **kw)

    C.first_that_fits(_GPU_CHOICE, key, _GPU_OPTIONS, launch)


class _Stream:
    """One stream's tensors, placeholders for the absent ones, strides and flags, in kernel order."""

    def __init__(self, qu, qv, seg, q_ids, positions, causal, wl, wr, kl, pl, qs, ks, dense):
        dummy = qu.new_zeros(1)
        i64 = torch.zeros(1, dtype=torch.int64, device=qu.device)
        self.qu, self.qv = qu, qv
        self.Lr = qu.shape[2]
        self.seg = seg.float().contiguous() if seg is not None else dummy.float()
        self.q_ids = q_ids.contiguous() if q_ids is not None else i64
        self.pos = positions.contiguous() if positions is not None else i64
        self.qs = qs.contiguous() if qs is not None else i64
        self.ks = ks.contiguous() if ks is not None else i64
        self.kl = kl if kl is not None else i64
        self.pl = pl if pl is not None else i64
        self.dense = dense.view(torch.uint8) if dense is not None else torch.zeros(1, 1, 1, 1, dtype=torch.uint8,
                                                                                    device=qu.device)
        self.dm_strides = tuple(self.dense.stride()) if dense is not None else (0, 0, 0, 0)
        self.causal, self.wl, self.wr = bool(causal), int(wl), int(wr)
        self.flags = (bool(causal), positions is not None, seg is not None, kl is not None, pl is not None, qs is not None,
                      dense is not None)


def _stream_args(s: _Stream, out, lse):
    return [s.qu, s.qv, s.seg, s.q_ids, s.pos, s.qs, s.kl, s.pl, s.dense, out, lse,
            *s.qu.stride()[:3], *s.qv.stride()[:3], *s.dm_strides, *out.stride()[:3],
            s.Lr, s.wl, s.wr]


def _flag_kwargs(s0: _Stream, s1: _Stream):
    kw = {}
    for i, s in ((0, s0), (1, s1)):
        for name, f in zip(("CAUSAL", "HAS_POS", "HAS_SEG", "HAS_KLEN", "HAS_PREFIX", "HAS_VSEG", "HAS_DENSE"), s.flags):
            kw[f"{name}{i}"] = f
    return kw


def _dropout_args(p, seed):
    """(drop_thr, rdrop, seed) of the kernels; the query stream uses seed + 1 (in-kernel)."""
    p = float(p)
    return C.dropout_threshold(p), (1.0 / (1.0 - p) if p < 1.0 else 0.0), C.dropout_seed(seed)


def _check(*ts):
    for t in ts:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton: relative attention supports float32, float16, bfloat16, "
                             f"got {t.dtype}")


def _shared_args(k, v, r, k_ids, ks):
    B, H, Lk, D = k.shape
    kids = k_ids.contiguous() if k_ids is not None else torch.zeros(1, dtype=torch.int64, device=k.device)
    kseg = ks.contiguous() if ks is not None else torch.zeros(1, dtype=torch.int64, device=k.device)
    return [k, v, r, kids, kseg]


def _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, streams):
    _check(k, v, r, streams[0].qu)
    B, H, Lk, D = k.shape
    s0 = streams[0]
    s1 = streams[1] if len(streams) > 1 else streams[0]
    cfg, warps = _config(D, k.dtype, k.device)
    outs = []
    for s in streams:
        outs.append((torch.empty(B, H, s.Lr, D, dtype=s.qu.dtype, device=k.device),
                     torch.empty(B, H, s.Lr, dtype=torch.float32, device=k.device)))
    o0, l0 = outs[0]
    o1, l1 = outs[1] if len(streams) > 1 else outs[0]
    # the visibility segment ids of the keys: the stream's own (ks may differ per stream)
    ks0 = s0.ks
    grid = (triton.cdiv(max(s.Lr for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    kseg = ks0 if len(streams) == 1 or s1.flags[5] is False else ks0
    if len(streams) > 1 and s0.flags[5] and s1.flags[5] and not torch.equal(s0.ks, s1.ks):
        raise NotImplementedError("ptm_kernels.triton: the two streams' segments() parts must share key ids")
    if len(streams) > 1 and s1.flags[5] and not s0.flags[5]:
        kseg = s1.ks
    _launch(_rel_fwd_kernel, grid, k.device, cfg, warps,
        *_stream_args(s0, o0, l0), *_stream_args(s1, o1, l1),
        k, v, r, (k_ids.contiguous() if k_ids is not None else s0.q_ids), kseg,
        *k.stride()[:3], *v.stride()[:3], *r.stride()[:3],
        H, Lk, r.shape[2], q_len, r_offset, scale * LOG2E, *_dropout_args(dropout_p, seed),
        **_flag_kwargs(s0, s1), DROPOUT=dropout_p > 0, D=D, PREC=C.precision(k.dtype, k.device),
        UPCAST=C.upcast(k.dtype, k.device))
    return outs


def _bwd(douts, outs_lses, k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, streams):
    B, H, Lk, D = k.shape
    R = r.shape[2]
    cfg, warps = _config(D, k.dtype, k.device)
    dk = torch.zeros(B, H, Lk, D, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    dr = torch.zeros(B, H, R, D, dtype=torch.float32, device=k.device)
    per = []
    for s, do, (out, lse) in zip(streams, douts, outs_lses):
        do = do.contiguous() if do.stride(-1) != 1 else do
        delta = (do.float() * out.float()).sum(-1).contiguous()
        dqu = torch.empty_like(s.qu, memory_format=torch.contiguous_format)
        dqv = torch.zeros(s.qv.shape, dtype=torch.float32, device=k.device)
        dseg = torch.zeros(B, H, s.Lr, 2, dtype=torch.float32, device=k.device) if s.flags[2] else s.qu.new_empty(0)
        per.append((s, do, lse.contiguous(), delta, dqu, dqv, dseg))

    def args(p):
        s, do, lse, delta, dqu, dqv, dseg = p
        return [s.qu, s.qv, s.seg, s.q_ids, s.pos, s.qs, s.kl, s.pl, s.dense, do, lse, delta, dqu, dqv,
                dseg if dseg.numel() else s.seg,
                *s.qu.stride()[:3], *s.qv.stride()[:3], *s.dm_strides, *do.stride()[:3],
                s.Lr, s.wl, s.wr]

    # dqu / dqv are written with qu's / qv's strides: make the inputs contiguous for the backward
    fixed = []
    for (s, do, lse, delta, dqu, dqv, dseg) in per:
        s.qu, s.qv = s.qu.contiguous(), s.qv.contiguous()
        fixed.append((s, do, lse, delta, dqu, dqv, dseg))
    p0 = fixed[0]
    p1 = fixed[1] if len(fixed) > 1 else fixed[0]
    kseg = p0[0].ks if p0[0].flags[5] or len(fixed) == 1 else p1[0].ks
    grid = (triton.cdiv(max(s.Lr for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    _launch(_rel_bwd_kernel, grid, k.device, cfg, warps,
        *args(p0), *args(p1),
        k, v, r, (k_ids.contiguous() if k_ids is not None else p0[0].q_ids), kseg, dk, dv, dr,
        *k.stride()[:3], *v.stride()[:3], *r.stride()[:3],
        H, Lk, R, q_len, r_offset, scale * LOG2E, scale, *_dropout_args(dropout_p, seed),
        **_flag_kwargs(p0[0], p1[0]), DROPOUT=dropout_p > 0, D=D, PREC=C.precision(k.dtype, k.device),
        UPCAST=C.upcast(k.dtype, k.device))
    res = [(dqu, dqv.to(s.qv.dtype), dseg) for (s, _, _, _, dqu, dqv, dseg) in fixed]
    return res, dk.to(k.dtype), dv.to(v.dtype), dr


# ============================================================================ the kernel interface (Python)


def relative_attention_fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, qu, qv, seg, q_ids, positions,
                           causal, window_left, window_right, key_lengths, prefix_lengths, q_segments, k_segments,
                           dense_mask):
    s = _Stream(qu, qv, seg, q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                q_segments, k_segments, dense_mask)
    (out, lse), = _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [s])
    return out, lse


def relative_attention_bwd(dout, out, lse, k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, qu, qv, seg,
                           q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                           q_segments, k_segments, dense_mask):
    s = _Stream(qu, qv, seg, q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                q_segments, k_segments, dense_mask)
    res, dk, dv, dr = _bwd([dout], [(out, lse)], k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [s])
    dqu, dqv, dseg = res[0]
    return dqu, dqv, dk, dv, dr, dseg


def two_stream_attention_fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, *streams):
    sc, sg = _Stream(*streams[:13]), _Stream(*streams[13:])
    (oc, lc), (og, lg) = _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [sc, sg])
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, k_ids, scale, r_offset, q_len,
                             dropout_p, seed, *streams):
    sc, sg = _Stream(*streams[:13]), _Stream(*streams[13:])
    res, dk, dv, dr = _bwd([dout_c, dout_g], [(out_c, lse_c), (out_g, lse_g)], k, v, r, k_ids, scale, r_offset,
                           q_len, dropout_p, seed, [sc, sg])
    (dqu_c, dqv_c, dseg_c), (dqu_g, dqv_g, dseg_g) = res
    return dqu_c, dqv_c, dseg_c, dqu_g, dqv_g, dseg_g, dk, dv, dr
