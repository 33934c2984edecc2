"""Relative attention backward kernel: one program per (row tile, b * h, stream) recomputes the probabilities
from lse; dqu, dseg (and the band form's dqv) in registers, dk, dv, dr with float32 atomics."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import LOG2E, dot, dropout_keep
from .position import _band_grad, _band_rows, _pos_band, _pos_gather
from .scores import _for_stream, _key_range, _row_terms, _scores, _visible

_LOG2E = tl.constexpr(LOG2E)  # device-code copy: a compiled kernel may read only constexpr globals


@triton.jit
def _stream_bwd(pid_m, bh, S, grads, keys, dims, drop, stream, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One row tile of stream S (args.StreamArgs); grads: its gradients and the key gradient buffers
    (args.StreamGrads)."""
    GATHER: tl.constexpr = S.positions is not None or BAND == 0
    key_grads = grads.key_grads
    Lr = S.Lr
    Lk = keys.Lk
    R_len = keys.R
    if pid_m * BLOCK_M < Lr:
        b = bh // dims.H
        h = bh % dims.H
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        bh64 = bh.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Lr
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        rows64 = rows.to(tl.int64)
        rd_ok = row_ok[:, None] & d_ok[None, :]
        qu = tl.load(S.qu.ptr + b64 * S.qu.s_b + h64 * S.qu.s_h + rows64[:, None] * S.qu.s_l + offs_d[None, :],
                     mask=rd_ok, other=0.0)
        QV_row = S.qv.ptr + b64 * S.qv.s_b + h64 * S.qv.s_h + rows64[:, None] * S.qv.s_l
        if not GATHER:
            qv = tl.load(QV_row + offs_d[None, :], mask=rd_ok, other=0.0)
        DO = grads.do
        do = tl.load(DO.ptr + b64 * DO.s_b + h64 * DO.s_h + rows64[:, None] * DO.s_l + offs_d[None, :], mask=rd_ok,
                     other=0.0)
        lse = tl.load(grads.lse + bh64 * Lr + rows, mask=row_ok, other=float("-inf")) * _LOG2E
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
        delta = tl.load(grads.delta + bh64 * Lr + rows, mask=row_ok, other=0.0)
        row = _row_terms(S, keys, dims, pid_m, b, b64, bh64, rows, rows64, row_ok, BLOCK_M)
        ip, base, t_last, seg0, seg1, qid, klen, plen = row
        K_bh = keys.k.ptr + b64 * keys.k.s_b + h64 * keys.k.s_h
        V_bh = keys.v.ptr + b64 * keys.v.s_b + h64 * keys.v.s_h
        R_bh = keys.r.ptr + b64 * keys.r.s_b + h64 * keys.r.s_h
        DK_bh = key_grads.dk + bh64 * Lk * D  # float32 contiguous buffers
        DV_bh = key_grads.dv + bh64 * Lk * D
        DR_bh = key_grads.dr + bh64 * R_len * D
        DQV_bh = grads.dqv + bh64 * Lr * D  # float32, zero-initialised
        lo, hi = _key_range(S, row, row_ok, Lk, BLOCK_N)
        dqu = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dqv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # band path (the gather path adds into DQV)
        dseg0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dseg1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dc = tl.arange(0, D_CHUNK)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            if GATHER:
                pos = _pos_gather(QV_row, R_bh, keys.r.s_l, base, offs_n, row_ok, col_ok, R_len, BLOCK_D, D_CHUNK,
                                  D)
            else:
                t_band = t_last + start_n + tl.arange(0, BAND)
                r_band, band_ok = _band_rows(R_bh, keys.r.s_l, t_band, R_len, offs_d, D)
                pos = _pos_band(qv, r_band, BLOCK_M, BLOCK_N, PREC, UPCAST)
            s, k = _scores(qu, pos, K_bh, keys.k.s_l, keys, b64, row, offs_n, col_ok, dims.scale2, S.seg is not None,
                           BLOCK_D, D, PREC, UPCAST)
            vis = _visible(S, rows, row, offs_n, row_ok, col_ok, b64, h64, Lk)
            pr = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
            kv_ok = col_ok[:, None] & d_ok[None, :]
            v = tl.load(V_bh + offs_n[:, None].to(tl.int64) * keys.v.s_l + offs_d[None, :], mask=kv_ok, other=0.0)
            dp = dot(do, tl.trans(v), None, PREC, UPCAST)
            if drop is not None:
                keep = dropout_keep(drop.seed + stream, bh64, rows, start_n, Lr, Lk, drop.threshold, BLOCK_N)
                pd = tl.where(keep, pr * drop.scale, 0.0)
                dp = tl.where(keep, dp * drop.scale, 0.0)
            else:
                pd = pr
            # gradient of the unscaled score sum; 0 at hidden entries and columns past Lk even in a NaN row (where
            # delta is NaN), so that the band products do not carry it to rows of r no pair of the row uses
            g = tl.where(vis, pr * (dp - delta[:, None]) * dims.scale, 0.0)
            # dv += pd^T do, dk += g^T qu (float32 atomics: rows of other programs land there too)
            dv_t = dot(tl.trans(pd), do.to(tl.float32), None, PREC, UPCAST)
            dk_t = dot(tl.trans(g), qu.to(tl.float32), None, PREC, UPCAST)
            kd_ptr = offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
            tl.atomic_add(DV_bh + kd_ptr, dv_t, mask=kv_ok)
            tl.atomic_add(DK_bh + kd_ptr, dk_t, mask=kv_ok)
            dqu += dot(g, k.to(tl.float32), None, PREC, UPCAST)
            if S.seg is not None:
                kid = tl.load(keys.k_ids + b64 * Lk + offs_n, mask=col_ok, other=0)
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
                    r3 = tl.load(R_bh + t[:, :, None] * keys.r.s_l + (d0 + dc)[None, None, :], mask=m3, other=0.0)
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
        DQU = grads.dqu
        tl.store(DQU.ptr + b64 * DQU.s_b + h64 * DQU.s_h + rows64[:, None] * DQU.s_l + offs_d[None, :],
                 dqu.to(DQU.ptr.dtype.element_ty), mask=rd_ok)
        if grads.dseg is not None:
            dseg_ptr = grads.dseg + (bh64 * Lr + rows64) * 2
            tl.store(dseg_ptr, dseg0, mask=row_ok)
            tl.store(dseg_ptr + 1, dseg1, mask=row_ok)


@triton.jit
def _rel_bwd_kernel(S0, S1, G0, G1, keys, dims, drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (row tiles, B * H, streams). S0 / S1: the streams (args.StreamArgs; S1 None for one stream), G0 / G1:
    their args.StreamGrads (with the same KeyGrads: both streams add into dk, dv, dr)."""
    _for_stream(_stream_bwd, S0, S1, G0, G1, keys, dims, drop, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC,
                UPCAST)
