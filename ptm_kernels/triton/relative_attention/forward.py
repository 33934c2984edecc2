"""Relative attention forward kernel: one program per (row tile, b * h, stream), online softmax in base 2."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import LN2, dot, dropout_keep
from .position import _band, _pos_band, _pos_gather
from .scores import _for_stream, _key_range, _key_tile, _row_terms, _scores, _visible

_LN2 = tl.constexpr(LN2)  # device-code copy: a compiled kernel may read only constexpr globals


@triton.jit
def _stream_fwd(pid_m, bh, S, out, keys, dims, drop, stream, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One row tile of stream S (args.StreamArgs) -> out (args.StreamOut). The gather form where the rows
    have positions or the band does not fit (BAND == 0)."""
    GATHER: tl.constexpr = S.positions is not None or BAND == 0
    Lr = S.Lr
    Lk = keys.Lk
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
        row = _row_terms(S, keys, dims, pid_m, b, b64, bh64, rows, rows64, row_ok, BLOCK_M)
        ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
        R_bh = keys.r.ptr + b64 * keys.r.s_b + h64 * keys.r.s_h
        lo, hi = _key_range(S, row, row_ok, Lk, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
            if GATHER:  # arbitrary row positions (XLNet's query stream): r[t] per (row, key)
                pos = _pos_gather(QV_row, R_bh, keys.r.s_l, base, offs_n, row_ok, col_ok, keys.R, BLOCK_D, D_CHUNK,
                                  D)
            else:  # consecutive rows: the tile needs only the band r[t_last + start_n + c], c < BAND
                band = _band(keys, b64, h64, R_bh, t_last + start_n, offs_d, D, BAND)
                pos = _pos_band(qv, band, BLOCK_M, BLOCK_N, PREC, UPCAST)
            k = _key_tile(keys.k, b64, h64, start_n, offs_n, col_ok, BLOCK_D, D)
            s = _scores(qu, pos, k, keys, b64, row, offs_n, col_ok, dims.scale2, S.seg is not None, PREC, UPCAST)
            vis = _visible(S, rows, row, offs_n, row_ok, col_ok, b64, h64, Lk)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            pr = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(pr, 1)
            if drop is not None:
                # query_seed computed here, in int64 (sm_90, fp16 two-stream at D = 128: 12 / 8 spill bytes
                # reading query_seed, 0 so; the dq kernel the other way round: 20 / 12 against 12 / 8)
                seed = (tl.to_tensor(drop.seed).to(tl.int64) + stream) & 0x7FFFFFFFFFFFFFFF
                keep = dropout_keep(seed, bh64, rows, start_n, Lr, Lk, drop.threshold, BLOCK_N)
                pr = tl.where(keep, pr * drop.scale, 0.0)
            v = _key_tile(keys.v, b64, h64, start_n, offs_n, col_ok, BLOCK_D, D)
            # P.V on the inputs' dtype (16-bit: wgmma with bf16 / fp16 operands, as FlashAttention)
            acc = acc * alpha[:, None] + dot(pr.to(v.dtype), v, None, PREC, UPCAST)
            m_i = m_new
        seen = l_i != 0.0  # l_i is 0 only for a row with no visible key; NaN (a NaN or +inf score) propagates
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
        O = out.o
        tl.store(O.ptr + b64 * O.s_b + h64 * O.s_h + rows64[:, None] * O.s_l + offs_d[None, :],
                 o.to(O.ptr.dtype.element_ty), mask=rd_ok)
        tl.store(out.lse + bh64 * Lr + rows, lse, mask=row_ok)


@triton.jit
def _rel_fwd_kernel(S0, S1, O0, O1, keys, dims, drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (row tiles, B * H, streams). S0 / S1: the streams (args.StreamArgs; S1 None for one stream), O0 /
    O1 their results (args.StreamOut), keys: args.Keys, dims: args.Dims, drop: args.DropoutArgs or None."""
    _for_stream(_stream_fwd, S0, S1, O0, O1, keys, dims, drop, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC,
                UPCAST)
