"""Relative attention forward kernel: one program per (row tile, b * h, stream), online softmax in base 2."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import LN2, dot, dropout_keep
from .position import _band_rows, _pos_band, _pos_gather
from .scores import _row_terms, _scores, _visible

_LN2 = tl.constexpr(LN2)  # device-code copy: a compiled kernel may read only constexpr globals


@triton.jit
def _stream_fwd(pid_m, bh, S, KV, dims, drop,
                CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, GATHER: tl.constexpr, HAS_SEG: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_VSEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One stream's row tile. S: the stream's tensors, strides, row count and window (launch._stream_args);
    KV: the keys, values, r and key ids (and gradient buffers) shared by the streams, with their strides;
    dims: (H, Lk, R_len, q_len, r_offset, scale2); drop: (seed, threshold, scale)."""
    (QU, QV, SEG, QIDS, POS, QSEG, KLEN, PLEN, DM, O, LSE, s_qub, s_quh, s_qum, s_qvb, s_qvh, s_qvm, s_dmb, s_dmh,
     s_dmm, s_dmn, s_ob, s_oh, s_om, Lr, wl, wr) = S
    K, V, R, KIDS, KSEG, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt = KV
    H, Lk, R_len, q_len, r_offset, scale2 = dims
    seed, drop_thr, rdrop = drop
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
def _rel_fwd_kernel(S0, S1, KV, dims, drop, F0: tl.constexpr, F1: tl.constexpr, DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Both streams in one launch (grid axis 2); F0 / F1: each stream's flags (CAUSAL, HAS_POS, HAS_SEG,
    HAS_KLEN, HAS_PREFIX, HAS_VSEG, HAS_DENSE); the second stream draws its dropout with seed + 1."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    stream = tl.program_id(2)
    if stream == 0:
        _stream_fwd(pid_m, bh, S0, KV, dims, drop, F0[0], F0[1], F0[1] or BAND == 0, F0[2], F0[3], F0[4], F0[5],
                    F0[6], DROPOUT, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)
    else:
        _stream_fwd(pid_m, bh, S1, KV, dims, (drop[0] + 1, drop[1], drop[2]), F1[0], F1[1], F1[1] or BAND == 0,
                    F1[2], F1[3], F1[4], F1[5], F1[6], DROPOUT, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC,
                    UPCAST)
