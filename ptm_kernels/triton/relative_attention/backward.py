"""Relative attention backward kernel: one program per (row tile, b * h, stream) recomputes the probabilities
from lse; dqu, dseg (and the band form's dqv) in registers, dk, dv, dr with float32 atomics."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import LOG2E, dot, dropout_keep
from .position import _band_grad, _band_rows, _pos_band, _pos_gather
from .scores import _row_terms, _scores, _visible

_LOG2E = tl.constexpr(LOG2E)  # device-code copy: a compiled kernel may read only constexpr globals


@triton.jit
def _stream_bwd(pid_m, bh, S, KV, dims, drop,
                CAUSAL: tl.constexpr, HAS_POS: tl.constexpr, GATHER: tl.constexpr, HAS_SEG: tl.constexpr,
                HAS_KLEN: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_VSEG: tl.constexpr, HAS_DENSE: tl.constexpr,
                DROPOUT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One stream's row tile. S: the stream's tensors, strides, row count and window (launch._stream_args);
    KV: the keys, values, r and key ids (and gradient buffers) shared by the streams, with their strides;
    dims: (H, Lk, R_len, q_len, r_offset, scale2, scale); drop: (seed, threshold, scale)."""
    (QU, QV, SEG, QIDS, POS, QSEG, KLEN, PLEN, DM, DO, LSE, DELTA, DQU, DQV, DSEG, s_qub, s_quh, s_qum, s_qvb, s_qvh,
     s_qvm, s_dmb, s_dmh, s_dmm, s_dmn, s_dob, s_doh, s_dom, Lr, wl, wr) = S
    K, V, R, KIDS, KSEG, DK, DV, DR, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_rb, s_rh, s_rt = KV
    H, Lk, R_len, q_len, r_offset, scale2, scale = dims
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
def _rel_bwd_kernel(S0, S1, KV, dims, drop, F0: tl.constexpr, F1: tl.constexpr, DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Both streams in one launch (grid axis 2); F0 / F1: each stream's flags (CAUSAL, HAS_POS, HAS_SEG,
    HAS_KLEN, HAS_PREFIX, HAS_VSEG, HAS_DENSE); the second stream draws its dropout with seed + 1."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    stream = tl.program_id(2)
    if stream == 0:
        _stream_bwd(pid_m, bh, S0, KV, dims, drop, F0[0], F0[1], F0[1] or BAND == 0, F0[2], F0[3], F0[4], F0[5],
                    F0[6], DROPOUT, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)
    else:
        _stream_bwd(pid_m, bh, S1, KV, dims, (drop[0] + 1, drop[1], drop[2]), F1[0], F1[1], F1[1] or BAND == 0,
                    F1[2], F1[3], F1[4], F1[5], F1[6], DROPOUT, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC,
                    UPCAST)
