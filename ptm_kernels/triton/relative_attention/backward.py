"""Relative attention backward, two kernels that recompute the probabilities from lse (as FlashAttention-2):

- _rel_bwd_dq_kernel, one program per (row tile, b * h, stream): dq = dqu + dqv (the band form in one register
  accumulator) and dseg, dr with float32 atomics; the band form also adds up the row sums of dS's band image
  (band_sums, BAND float32 atomics per band product), from which the launcher tells dqv's share of dq apart for the
  biases' gradients (the gather and chunked forms keep dqv in memory instead). On 64-row tiles one band product
  serves four 16-key steps (position._band_keys), each reading its position terms from the product in memory and
  writing dS into the band image there (a slot taken from a pool, launch._band_slots). dr stays atomic: r row t
  collects the pairs (i, j) with j - i = t - c, a diagonal of the score matrix that crosses every row tile and key
  tile, so no row-major or key-major program owns it. A diagonal-major third pass would recompute the probabilities
  once more: per 64 keys of a 64-row tile at D = 128 the scores, the band term and dO V^T again (2.10 M multiply-
  adds on top of this kernel's 4.72 M, +44%, plus the masks, exp2 and dropout bits a second time) to save BAND x D =
  16 K float32 atomic adds (64 KB). Without a GPU to weigh the two (no timing here), atomics stay.
- _rel_bwd_dkdv_kernel, one program per (key tile, b * h): walks the row tiles of both streams and owns dk and
  dv (registers, stored once, no atomics).

Every dot takes the inputs' dtype (16-bit: wgmma with bf16 / fp16 operands; the probabilities and dS are rounded
to it as in FlashAttention)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import LOG2E, dot, dropout_keep, opaque
from .position import (_band, _band_grad, _band_image_store, _band_keys, _band_major, _band_rows, _band_select,
                       _band_select_from, _pos_band, _pos_gather, _pos_row_halves, _slot_skewed, _slot_width,
                       _slot_zero)
from .scores import _cols, _for_stream, _key_range, _key_tile, _row_terms, _scores, _scores_of, _visible

_LOG2E = tl.constexpr(LOG2E)  # device-code copy: a compiled kernel may read only constexpr globals


@triton.jit
def _row_tile(S, grads, keys, dims, pid_m, bh, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
              GATHER: tl.constexpr, ROW_HALVES: tl.constexpr):
    """What the backward needs of row tile pid_m: -> (rows, row_ok, b64, h64, bh64, qu, qv (band form; with
    ROW_HALVES its two row halves, position._pos_row_halves; else 0), QV_row (pointers to qv[row, 0]), do, lse
    (base 2, +inf for empty rows), delta, row (_row_terms))."""
    b = bh // dims.H
    b64 = b.to(tl.int64)
    h64 = (bh % dims.H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    Lr = S.Lr
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lr
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rd_ok = row_ok[:, None] & (offs_d < D)[None, :]
    qu = tl.load(S.qu.ptr + b64 * S.qu.s_b + h64 * S.qu.s_h + rows64[:, None] * S.qu.s_l + offs_d[None, :],
                 mask=rd_ok, other=0.0)
    QV_row = S.qv.ptr + b64 * S.qv.s_b + h64 * S.qv.s_h + rows64[:, None] * S.qv.s_l
    qv = 0
    if not GATHER and ROW_HALVES:
        half = tl.arange(0, BLOCK_M // 2)
        qv = (_cols(S.qv, b64, h64, pid_m * BLOCK_M + half, pid_m * BLOCK_M + half < Lr, offs_d, D),
              _cols(S.qv, b64, h64, pid_m * BLOCK_M + BLOCK_M // 2 + half, pid_m * BLOCK_M + BLOCK_M // 2 + half < Lr,
                    offs_d, D))
    elif not GATHER:
        qv = tl.load(QV_row + offs_d[None, :], mask=rd_ok, other=0.0)
    DO = grads.do
    do = tl.load(DO.ptr + b64 * DO.s_b + h64 * DO.s_h + rows64[:, None] * DO.s_l + offs_d[None, :], mask=rd_ok,
                 other=0.0)
    lse = tl.load(grads.lse + bh64 * Lr + rows, mask=row_ok, other=float("-inf")) * _LOG2E
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # empty rows: p = 0
    delta = tl.load(grads.delta + bh64 * Lr + rows, mask=row_ok, other=0.0)
    row = _row_terms(S, keys, dims, pid_m, b, b64, bh64, rows, rows64, row_ok, BLOCK_M)
    return rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row


@triton.jit
def _head_dim_chunked(PREC: tl.constexpr, BLOCK_D: tl.constexpr):
    """Whether the backward runs its head-dim dots in chunks read from memory (_head_dim_dots; the dq kernel's
    dqv and dr too): float32 (tf32x3) at D >= 64."""
    return PREC == "tf32x3" and BLOCK_D >= 64


@triton.jit
def _head_dim_dots(S, DO, keys, b64, h64, rows, row_ok, offs_n, col_ok, t_band, band_ok, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr, GATHER: tl.constexpr):
    """qu k^T, qv r_band^T (band form, else 0) and dO v^T of a tile pair, each summed over 16-column chunks of the
    head dim read from memory (cached). For float32 at D >= 64: tf32x3 splits each dot operand in two tf32 parts,
    and a 16-row operand with K = 128 takes 64 registers per part; held whole, the three dots spilled (sm_90,
    D = 128, 16 x 16 tiles: dk/dv 116-588 B, dq 128-280 B; chunked, 16 x 32 tiles fit). 16 columns rather than
    32: with 32 the two-stream dq spilled 8 / 4 B at D = 64 and 60 / 28 B at D = 128, with 16 no float32 kernel
    spills (triton 3.7.1), and the dk/dv kernel needs half the shared memory (45056 -> 22528 B)."""
    CHUNK: tl.constexpr = 16
    qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    pb = 0
    if not GATHER:
        pb = tl.zeros([BLOCK_M, BAND], dtype=tl.float32)
    for d0 in range(0, BLOCK_D, CHUNK):
        offs_c = d0 + tl.arange(0, CHUNK)
        qk += dot(_cols(S.qu, b64, h64, rows, row_ok, offs_c, D),
                  tl.trans(_cols(keys.k, b64, h64, offs_n, col_ok, offs_c, D)), None, PREC, UPCAST)
        if not GATHER:
            pb += dot(_cols(S.qv, b64, h64, rows, row_ok, offs_c, D),
                      tl.trans(_cols(keys.r, b64, h64, t_band, band_ok, offs_c, D)), None, PREC, UPCAST)
        dp += dot(_cols(DO, b64, h64, rows, row_ok, offs_c, D),
                  tl.trans(_cols(keys.v, b64, h64, offs_n, col_ok, offs_c, D)), None, PREC, UPCAST)
    return qk, pb, dp


@triton.jit
def _tile_grad(S, DO, keys, dims, drop, stream, rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row,
               k, v, start_n, band_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
               BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr, GATHER: tl.constexpr, ROW_HALVES: tl.constexpr,
               RECOMPUTE_KEYS: tl.constexpr = False):
    """The probabilities of a (row tile, key tile k / v at start_n) pair recomputed, and the gradient of the
    unscaled scores: -> (pd: dropped probabilities, g: dS, offs_n, col_ok, band (position._band), t_band: the
    band's rows of r, BAND of them (band form; else 0)). DO: dO's args.Rows. band_pos: the position term where
    the caller computed it (the dq kernel's band spanning several key tiles; band is then 0), else None.
    ROW_HALVES: the band form's position term per row half (position._pos_row_halves; qv: the halves' rows; band
    is then 0). RECOMPUTE_KEYS: dropout_keep's (the dq kernel's: its key loop is where registers run out)."""
    CHUNKED: tl.constexpr = _head_dim_chunked(PREC, BLOCK_D)  # else on the whole tiles qu, qv, do, k, v
    ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
    Lk = keys.Lk
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < Lk
    offs_d = tl.arange(0, BLOCK_D)
    R_bh = keys.r.ptr + b64 * keys.r.s_b + h64 * keys.r.s_h
    t_band = 0
    band = (0, 0)
    if band_pos is not None:
        pos = band_pos
    elif GATHER:
        pos = _pos_gather(QV_row, R_bh, keys.r.s_l, base, offs_n, row_ok, col_ok, keys.R, BLOCK_D, D_CHUNK, D)
    else:
        t_band = t_last + start_n + tl.arange(0, BAND)
        if ROW_HALVES:
            pos = _pos_row_halves(qv, R_bh, keys.r.s_l, t_last + start_n, keys.R, offs_d, D, BLOCK_M, BLOCK_N, PREC,
                                  UPCAST)
        else:
            band = _band(keys, b64, h64, R_bh, t_last + start_n, offs_d, D, BAND)
            if not CHUNKED:
                pos = _pos_band(qv, band, BLOCK_M, BLOCK_N, PREC, UPCAST)
    if CHUNKED:
        qk, pb, dp = _head_dim_dots(S, DO, keys, b64, h64, rows, row_ok, offs_n, col_ok, t_band, band[1], BLOCK_M,
                                    BLOCK_N, BAND, BLOCK_D, D, PREC, UPCAST, GATHER)
        if not GATHER:
            pos = _band_select(pb, BLOCK_M, BLOCK_N)
        s = _scores_of(qk, pos, keys, b64, row, offs_n, col_ok, dims.scale2, S.seg is not None)
    else:
        s = _scores(qu, pos, k, keys, b64, row, offs_n, col_ok, dims.scale2, S.seg is not None, PREC, UPCAST)
    vis = _visible(S, rows, row, offs_n, row_ok, col_ok, b64, h64, Lk)
    pr = tl.where(vis, tl.exp2(s - lse[:, None]), 0.0)
    if not CHUNKED:
        dp = dot(do, tl.trans(v), None, PREC, UPCAST)
    if drop is not None:
        seed = drop.seed if stream == 0 else drop.query_seed
        keep = dropout_keep(seed, bh64, rows, start_n, S.Lr, Lk, drop.threshold, BLOCK_N, False, RECOMPUTE_KEYS)
        pd = tl.where(keep, pr * drop.scale, 0.0)
        dp = tl.where(keep, dp * drop.scale, 0.0)
    else:
        pd = pr
    # 0 at hidden entries and columns past Lk even in a NaN row (where delta is NaN), so that the band products
    # do not carry it to rows of r no pair of the row uses
    g = tl.where(vis, pr * (dp - delta[:, None]) * dims.scale, 0.0)
    return pd, g, offs_n, col_ok, band, t_band


@triton.jit
def _dr_chunk(d0, dpb, QV_row, row_ok, DR_bh, t_band, band_ok, D: tl.constexpr, DR_CHUNK: tl.constexpr,
              BAND_MAJOR: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dr[t_band, d0:d0 + DR_CHUNK] += dpb^T qv[:, d0:d0 + DR_CHUNK] (float32 atomics); dpb in _band_grad's
    layout."""
    offs_c = d0 + tl.arange(0, DR_CHUNK)
    c_ok = offs_c < D
    qv_c = tl.load(QV_row + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
    if BAND_MAJOR:
        dr_c = dot(dpb, qv_c, None, PREC, UPCAST)  # [BAND, DR_CHUNK]
    else:
        dr_c = dot(tl.trans(dpb), qv_c, None, PREC, UPCAST)
    tl.atomic_add(DR_bh + t_band[:, None] * D + offs_c[None, :], dr_c, mask=band_ok[:, None] & c_ok[None, :],
                  sem="relaxed")


@triton.jit
def _band_sums(BAND_SUMS_bh, dpb, t_band, band_ok, BAND_MAJOR: tl.constexpr):
    """band_sums[t_band] += the row sums of dS's band image dpb (_band_grad's layout; float32 atomics), so that the
    sum of dqv over the rows, sum_t band_sums[t] r[t], is one product on the host."""
    if BAND_MAJOR:
        sums = tl.sum(dpb.to(tl.float32), 1)
    else:
        sums = tl.sum(dpb.to(tl.float32), 0)
    tl.atomic_add(BAND_SUMS_bh + t_band, sums, mask=band_ok, sem="relaxed")


@triton.jit
def _band_grad_dots(dq, dpb, r_band, t_band, band_ok, QV_row, row_ok, DR_bh, BLOCK_D: tl.constexpr,
                    D: tl.constexpr, DR_CHUNK: tl.constexpr, BAND_MAJOR: tl.constexpr, PREC: tl.constexpr,
                    UPCAST: tl.constexpr):
    """The position gradients of dS's band image dpb (input dtype, _band_grad's layout) over the band rows t_band
    of r (r_band; band_ok: which exist): -> dq + dpb r_band (dqv's share, in _pos_band's layout: band-major tiles
    hold dq^T) and dr[t_band] += dpb^T qv (float32 atomics)."""
    dq = _band_dq_dot(dq, dpb, r_band, BAND_MAJOR, PREC, UPCAST)
    _dr_dots(dpb, t_band, band_ok, QV_row, row_ok, DR_bh, BLOCK_D, D, DR_CHUNK, BAND_MAJOR, PREC, UPCAST)
    return dq


@triton.jit
def _band_dq_dot(dq, dpb, r_band, BAND_MAJOR: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dq + dpb r_band: dqv's share of dS's band image dpb (_band_grad's layout), in _pos_band's layout (band-major
    tiles hold dq^T)."""
    if BAND_MAJOR:
        dq += dot(tl.trans(r_band), dpb, None, PREC, UPCAST)
    else:
        dq += dot(dpb, r_band, None, PREC, UPCAST)
    return dq


@triton.jit
def _dr_dots(dpb, t_band, band_ok, QV_row, row_ok, DR_bh, BLOCK_D: tl.constexpr, D: tl.constexpr,
             DR_CHUNK: tl.constexpr, BAND_MAJOR: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dr[t_band] += dpb^T qv (float32 atomics) for dS's band image dpb (_band_grad's layout)."""
    # dr in column chunks of qv (re-read, cached): a [BAND, BLOCK_D] float32 result would not fit in the registers
    # beside the accumulators at D = 128. Float32 (tf32x3) steps through the chunks in a loop: unrolled, their
    # split operands were live at once (sm_90, 16 x 16 tiles at D = 64, 4 warps: 1856 -> 136 spill bytes)
    if PREC == "tf32x3":
        for d0 in range(0, BLOCK_D, DR_CHUNK):
            _dr_chunk(d0, dpb, QV_row, row_ok, DR_bh, t_band, band_ok, D, DR_CHUNK, BAND_MAJOR, PREC, UPCAST)
    else:
        for d0 in tl.static_range(0, BLOCK_D, DR_CHUNK):
            _dr_chunk(d0, dpb, QV_row, row_ok, DR_bh, t_band, band_ok, D, DR_CHUNK, BAND_MAJOR, PREC, UPCAST)


@triton.jit
def _take_slot(LOCKS, count, first):
    """A free slot of the pool (launch._band_slots), taken for this program (its lock 0 -> 1, acquire), trying
    first, first + 1, ... modulo count. A holder waits on nothing, so the wait ends: with a slot for every program
    that can run at once, at once."""
    slot = first % count
    held = tl.atomic_cas(LOCKS + slot, 0, 1, sem="acquire")
    while held != 0:
        slot = (slot + 1) % count
        held = tl.atomic_cas(LOCKS + slot, 0, 1, sem="acquire")
    return slot


@triton.jit
def _give_slot(LOCKS, slot):
    """Give the slot back once every thread is done with it (block barrier, then release: the next holder's
    writes come after this program's)."""
    tl.debug_barrier()
    # one lane releases, as in _take_slot, but through a 1-element tensor: the scalar atomic shares _take_slot's
    # choice of that lane, which the dq kernel then held across its key loop (sm_90, bf16 D = 128, two-stream:
    # 4 / 4 spill bytes -> 0)
    one = tl.zeros([1], dtype=tl.int32)
    tl.atomic_xchg(LOCKS + slot + one, one, sem="release")


@triton.jit
def _dq_key_tile(dq, dseg, start_n, pos, SPAN_J, S, grads, keys, dims, drop, stream, tile, qu, qv, do,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr,
                 D_CHUNK: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                 GATHER: tl.constexpr, DQ_T: tl.constexpr):
    """The dq kernel's work on key tile start_n that does not involve the position term's gradient: dS recomputed
    (_tile_grad), dq += dS k and the segment term's gradient dseg = (same segment, other segment) row sums of dS.
    -> (dq, dseg, dS, offs_n, col_ok, band, t_band: _tile_grad's).

    pos: the position term where the caller has it, else None. With SPAN_J not None, pos points to a band
    product in memory that spans several key tiles (position._band_keys; _stream_dq stored it) and this tile lies
    SPAN_J keys into it: its terms are read here (position._band_select_from). tile: the row tile's (rows,
    row_ok, rows64, rd_ok, b64, h64, bh64, QV_row, lse, delta, row)."""
    rows, row_ok, rows64, rd_ok, b64, h64, bh64, QV_row, lse, delta, row = tile
    offs_d = tl.arange(0, BLOCK_D)
    ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
    if BLOCK_D <= 64:
        # qu and dO read again each step (cached) rather than held across the loop: as the A operands of chained
        # 64-row dots both warpgroups held them (sm_90, triton 3.7.1, bf16 D = 64: 32 -> 0 spill bytes with a
        # causal band, 168 -> 156 with every mask, 88 -> 44 two-stream; at D = 128 it spilled more, 212 -> 312)
        qu = _cols(S.qu, b64, h64, rows, row_ok, offs_d, D)
        do = _cols(grads.do, b64, h64, rows, row_ok, offs_d, D)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _key_tile(keys.k, b64, h64, start_n, offs_n, offs_n < keys.Lk, BLOCK_D, D)
    v = _key_tile(keys.v, b64, h64, start_n, offs_n, offs_n < keys.Lk, BLOCK_D, D)
    if SPAN_J is not None:
        pos = _band_select_from(pos, SPAN_J, BLOCK_M, BLOCK_N, BAND)
    pd, g, offs_n, col_ok, band, t_band = _tile_grad(
        S, grads.do, keys, dims, drop, stream, rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row, k,
        v, start_n, pos, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST, GATHER, False,
        RECOMPUTE_KEYS=PREC != "tf32x3" and BLOCK_D > 64)  # D = 64: no spills to save, +38 instructions a step
    # (every mask + dropout, 636 -> 674); float32: its two-stream dq at D = 128 spilled 8 / 4 B with them
    if DQ_T:
        dq += dot(tl.trans(k), tl.trans(g.to(k.dtype)), None, PREC, UPCAST)
    else:
        dq += dot(g.to(k.dtype), k, None, PREC, UPCAST)
    dseg0, dseg1 = dseg
    if S.seg is not None:
        kid = tl.load(keys.k_ids + b64 * keys.Lk + offs_n, mask=col_ok, other=0)
        same = qid[:, None] == kid[None, :]
        dseg0 += tl.sum(tl.where(same, g, 0.0), 1)
        dseg1 += tl.sum(tl.where(same, 0.0, g), 1)
    return dq, (dseg0, dseg1), g, offs_n, col_ok, band, t_band


@triton.jit
def _stream_dq(pid_m, bh, S, grads, keys, dims, drop, stream, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One row tile of stream S (args.StreamArgs): dq, dseg of its rows (args.StreamGrads), and its shares of dr
    and (band form) band_sums (_band_sums)."""
    GATHER: tl.constexpr = S.positions is not None or BAND == 0
    CHUNKED: tl.constexpr = _head_dim_chunked(PREC, BLOCK_D)
    # float32 on whole tiles: 16 columns (the three tf32x3 products of a chunk; 32: 32 / 20 B spilled two-stream at
    # D = 64); chunked with dqv (_head_dim_chunked), 32 (16: 20 / 16 B spilled with every mask at D = 128).
    # 16-bit: 32 (sm_90, bf16; band causal / every mask + dropout / two-stream spill bytes): 16 columns moved the
    # spills (D = 64 36 / 112 / 84 -> 28 / 104 / 84 B, D = 128 68 / 188 / 216 -> 52 / 196 / 200 B); 8 columns
    # spilled less (D = 128 20 / 180 / 184 B) but ran the dr dots on mma.sync (wgmma's N is at least 16 here)
    DR_CHUNK: tl.constexpr = min(BLOCK_D, 16 if PREC == "tf32x3" and not CHUNKED else 32)
    Lr = S.Lr
    R_len = keys.R
    if pid_m * BLOCK_M < Lr:
        rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row = _row_tile(
            S, grads, keys, dims, pid_m, bh, BLOCK_M, BLOCK_D, D, GATHER, False)
        ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        rd_ok = row_ok[:, None] & d_ok[None, :]
        R_bh = keys.r.ptr + b64 * keys.r.s_b + h64 * keys.r.s_h
        DR_bh = grads.dr + bh64 * R_len * D  # float32 contiguous, zeroed
        DQV_bh = 0
        if GATHER or CHUNKED:  # float32, zeroed: these forms add dqv up in memory (launch._dqv_in_memory)
            tl.static_assert(grads.dqv is not None, "the gather and chunked dq forms need a dqv buffer")
            DQV_bh = grads.dqv + bh64 * Lr * D
        BAND_SUMS_bh = 0
        if grads.band_sums is not None:
            BAND_SUMS_bh = grads.band_sums + bh64 * R_len
        lo, hi = _key_range(S, row, row_ok, keys.Lk, BLOCK_N)
        # dq = dqu + dqv (the gradient of q: q + u and q + v_bias both come from it) in one accumulator. The band
        # forms hold it in _pos_band's layout: band-major tiles hold dq^T, whose dots have M = BLOCK_D rather than
        # the BLOCK_M = 64 of a chained dot (dqu^T += k^T dS^T). The gather and chunked forms add dqv into DQV in
        # memory and it joins dq at the end
        BAND_MAJOR: tl.constexpr = _band_major(BLOCK_M)
        DQ_T: tl.constexpr = BAND_MAJOR and not GATHER and not CHUNKED
        if DQ_T:
            dq = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        else:
            dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dseg = (tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32))  # _dq_key_tile
        dc = tl.arange(0, D_CHUNK)
        # a band product that serves several key tiles (position._band_keys): computed once per SPAN keys, its
        # position terms selected per key tile, dS's band image gathered over the SPAN keys, then one band dot into
        # dq^T and one set of dr atomics per SPAN keys
        SPAN: tl.constexpr = _band_keys(BLOCK_M, BLOCK_N, BAND)
        SPANS: tl.constexpr = DQ_T  # every band-major band form (else one key tile a band product)
        tile = (rows, row_ok, rows64, rd_ok, b64, h64, bh64, QV_row, lse, delta, row)
        if SPANS:
            # The band product and dS's band image go through memory: the slot this program takes from the pool
            # (launch._band_slots; L1 / L2), the product written per span and its position terms read back per key step
            # (position._band_select_from), dS written per key step into the image (position._band_image_store)
            # and the image read back per span. With both in registers, the product's select and the image's
            # gather (tl.gather: warp shuffles, their index arithmetic and selects) made the key step 1127 SASS
            # instructions (sm_90, bf16 D = 128 band causal; 336 now), and the two held 32 + 16 registers per
            # thread across the key steps. Skewed in the slot (position._slot_skewed), each key step's terms and
            # entries are a box: vector loads and stores
            tl.static_assert(grads.band_slots is not None, "the band-major dq form needs its band slots")
            slots = grads.band_slots
            slot = _take_slot(slots.locks, slots.count, bh * tl.cdiv(Lr, BLOCK_M) + pid_m)
            # the slot: the product (float32), then the image (qv's dtype), both [BLOCK_M, BLOCK_M + BAND], skewed
            SLOT_WORDS: tl.constexpr = BLOCK_M * _slot_width(BLOCK_M, BAND) * (32 + qv.dtype.primitive_bitwidth) // 32
            PBT = slots.words + slot.to(tl.int64) * SLOT_WORDS
            IMG = (PBT + BLOCK_M * _slot_width(BLOCK_M, BAND)).to(tl.pointer_type(qv.dtype))
            band_at = _slot_skewed(BLOCK_M, BAND)
            _slot_zero(IMG, BLOCK_M, BAND)
            for start_n in range(lo, hi, SPAN):
                t_band = t_last + start_n + tl.arange(0, BAND)
                r_band, band_ok = _band_rows(R_bh, keys.r.s_l, t_band, R_len, offs_d, D)
                pbt = dot(r_band, tl.trans(qv), None, PREC, UPCAST)  # [BAND, BLOCK_M], float32
                tl.debug_barrier()  # every thread is done with the previous span's slot
                tl.store(PBT + band_at, pbt)
                tl.debug_barrier()  # and sees this one's product (a block barrier orders global memory too)
                keys_in = tl.minimum(hi - start_n, SPAN)  # the span's keys: all SPAN but in the last span
                for j in range(0, keys_in, BLOCK_N):
                    dq, dseg, g, offs_n, col_ok, band, t_tile = _dq_key_tile(
                        dq, dseg, start_n + j, PBT, j, S, grads, keys, dims, drop, stream, tile, qu, qv, do, BLOCK_M,
                        BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST, GATHER, DQ_T)
                    _band_image_store(IMG, g, j, BLOCK_M, BLOCK_N, BAND)
                for j in range(tl.cdiv(keys_in, BLOCK_N) * BLOCK_N, SPAN, BLOCK_N):  # a last span's missing tiles
                    _band_image_store(IMG, tl.zeros([BLOCK_M, BLOCK_N], dtype=qv.dtype), j, BLOCK_M, BLOCK_N, BAND)
                tl.debug_barrier()
                dpb = tl.load(IMG + band_at)
                # its row sums and dr before the band dot into dq: the other order held dpb's registers beside the
                # dr dots' (sm_90, bf16 D = 128, spill bytes: every mask + dropout 92 / 76 -> 76 / 60, 36 -> 24 in
                # the span loop; two-stream 84 / 68 -> 52 / 36, 32 -> 0 in the span loop)
                if grads.band_sums is not None:
                    _band_sums(BAND_SUMS_bh, dpb, t_band, band_ok, BAND_MAJOR)
                _dr_dots(dpb, t_band, band_ok, QV_row, row_ok, DR_bh, BLOCK_D, D, DR_CHUNK, BAND_MAJOR, PREC, UPCAST)
                dq = _band_dq_dot(dq, dpb, r_band, BAND_MAJOR, PREC, UPCAST)
            # the slot's lock address computed again (opaque): the one _take_slot computed was held across the key
            # loop (sm_90 bf16 D = 128 spill bytes: every mask + dropout 16 / 8 -> 8 / 4, two-stream 12 / 8 -> 4 / 4)
            _give_slot(slots.locks, opaque(slot))
        else:
            for start_n in range(lo, hi, BLOCK_N):
                dq, dseg, g, offs_n, col_ok, band, t_band = _dq_key_tile(
                    dq, dseg, start_n, None, None, S, grads, keys, dims, drop, stream, tile, qu, qv, do, BLOCK_M,
                    BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST, GATHER, DQ_T)
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
                else:  # band form of g: dqv += dpb r_band, dr[t_band] += dpb^T qv (two dots, BAND x D atomics);
                    # dpb [BLOCK_M, BAND], row-major (band-major tiles span several key tiles above)
                    r_band, band_ok = band
                    dpb = _band_grad(g, BLOCK_M, BLOCK_N, BAND).to(qv.dtype)
                    if CHUNKED:  # dqv read, added and written per chunk (float32 DQV, rows owned), beside dr
                        for d0 in range(0, BLOCK_D, DR_CHUNK):
                            offs_c = d0 + tl.arange(0, DR_CHUNK)
                            dqv_ptr = DQV_bh + rows64[:, None] * D + offs_c[None, :]
                            cmask = row_ok[:, None] & (offs_c < D)[None, :]
                            dqv_c = dot(dpb, _cols(keys.r, b64, h64, t_band, band_ok, offs_c, D), None, PREC, UPCAST)
                            tl.store(dqv_ptr, tl.load(dqv_ptr, mask=cmask, other=0.0) + dqv_c, mask=cmask)
                            _dr_chunk(d0, dpb, QV_row, row_ok, DR_bh, t_band, band_ok, D, DR_CHUNK, False, PREC,
                                      UPCAST)
                    else:
                        dq = _band_grad_dots(dq, dpb, r_band, t_band, band_ok, QV_row, row_ok, DR_bh, BLOCK_D, D,
                                             DR_CHUNK, False, PREC, UPCAST)
                        if grads.band_sums is not None:
                            _band_sums(BAND_SUMS_bh, dpb, t_band, band_ok, False)
        if GATHER or CHUNKED:  # + the dqv these forms added up in memory (rows owned by this program)
            # stored in [BLOCK_M, chunk] tiles, read back whole: other threads of this block wrote some of it, and
            # only a block barrier makes their stores visible here
            tl.debug_barrier()
            dq += tl.load(DQV_bh + rows64[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
        # 16-bit: the rows addressed within the head in int32 (as dr): their int64 offsets were the kernel's from
        # before the key loop, held across it (sm_90, the two-stream dq at D = 128, bf16: 32 / 20 -> 12 / 8 spill
        # bytes); float32 keeps them (at D = 64 its two-stream dq spilled 8 / 4 B with int32 offsets, 0 without)
        DQ_bh = grads.dq + bh64 * Lr * D
        if DQ_T:
            # dq^T stored as it lies, its column offsets opaque. tl.trans + store went through shared memory with
            # a thread-index term that LLVM computed once, before the key loop (shared with the prologue's loads),
            # and held across it: sm_90 bf16 D = 128, every mask + dropout, 8 / 4 spill bytes -> 0. With plain
            # offsets LLVM hoisted their [BLOCK_D, BLOCK_M] tile instead (124 / 104 B, in the loop). The stores are
            # 2-byte and strided, once per program
            offs_dt = opaque(offs_d)
            tl.store(DQ_bh + (rows[None, :] * D + offs_dt[:, None]), dq, mask=row_ok[None, :] & (offs_dt < D)[:, None])
        elif PREC == "tf32x3":
            tl.store(DQ_bh + rows64[:, None] * D + offs_d[None, :], dq, mask=rd_ok)
        else:
            tl.store(DQ_bh + (rows[:, None] * D + offs_d[None, :]), dq, mask=rd_ok)
        if grads.dseg is not None:
            dseg_at = (bh64 * Lr + rows64) * 2 if PREC == "tf32x3" else bh64 * Lr * 2 + rows * 2
            tl.store(grads.dseg + dseg_at, dseg[0], mask=row_ok)
            tl.store(grads.dseg + dseg_at + 1, dseg[1], mask=row_ok)


@triton.jit
def _rel_bwd_dq_kernel(S0, S1, G0, G1, keys, dims, drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                       PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Grid (row tiles, B * H, streams). S0 / S1: the streams (args.StreamArgs; S1 None for one stream), G0 / G1:
    their args.StreamGrads (with the same dr: both streams add into it)."""
    _for_stream(_stream_dq, S0, S1, G0, G1, keys, dims, drop, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC,
                UPCAST)


@triton.jit
def _stream_dkdv(dk, dv, pid_n, bh, S, grads, keys, dims, drop, stream, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
                 D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, DKDV_T: tl.constexpr,
                 ROW_HALVES: tl.constexpr):
    """dk, dv (float32 [BLOCK_N, BLOCK_D], or their transposes [BLOCK_D, BLOCK_N] with DKDV_T) of key tile
    pid_n plus the share of stream S's rows. The key tile is read again for each row tile (cached): kept across
    the loop, it cost registers that the compiler spilled."""
    GATHER: tl.constexpr = S.positions is not None or BAND == 0
    start_n = pid_n * BLOCK_N
    m_lo = 0
    if S.causal and S.prefix_lengths is None and S.positions is None:
        # row i (consecutive rows) sees keys up to i + Lk - q_len: rows before start_n - (Lk - q_len) see none here
        m_lo = tl.maximum(start_n - (keys.Lk - dims.q_len), 0) // BLOCK_M
    for pid_m in range(m_lo, tl.cdiv(S.Lr, BLOCK_M)):
        rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row = _row_tile(
            S, grads, keys, dims, pid_m, bh, BLOCK_M, BLOCK_D, D, GATHER, ROW_HALVES)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _key_tile(keys.k, b64, h64, start_n, offs_n, offs_n < keys.Lk, BLOCK_D, D)
        v = _key_tile(keys.v, b64, h64, start_n, offs_n, offs_n < keys.Lk, BLOCK_D, D)
        pd, g, offs_n, col_ok, band, t_band = _tile_grad(
            S, grads.do, keys, dims, drop, stream, rows, row_ok, b64, h64, bh64, qu, qv, QV_row, do, lse, delta, row, k,
            v, start_n, None, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST, GATHER, ROW_HALVES)
        if DKDV_T:  # dk^T += qu^T dS, dv^T += dO^T Pd (dk first: 140 -> 132 spill bytes, launch._config)
            dk += dot(tl.trans(qu), g.to(qu.dtype), None, PREC, UPCAST)
            dv += dot(tl.trans(do), pd.to(do.dtype), None, PREC, UPCAST)
        else:
            dv += dot(tl.trans(pd.to(do.dtype)), do, None, PREC, UPCAST)
            dk += dot(tl.trans(g.to(qu.dtype)), qu, None, PREC, UPCAST)
    return dk, dv


@triton.jit
def _rel_bwd_dkdv_kernel(S0, S1, G0, G1, keys, dims, drop, DK, DV, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr, D: tl.constexpr,
                         PREC: tl.constexpr, UPCAST: tl.constexpr, DKDV_T: tl.constexpr, ROW_HALVES: tl.constexpr):
    """Grid (key tiles, B * H): dk, dv (contiguous [B, H, Lk, D], k's dtype) of one key tile, summed over the
    rows of both streams (S1 / G1 None for one stream; stream s draws its dropout with seed + s modulo 2 ** 63).
    DKDV_T (launch._config): accumulate dk^T and dv^T, whose dots have M = BLOCK_D rows rather than BLOCK_N
    (wgmma takes M >= 64: a 32-key tile's dk / dv dots ran on mma.sync). ROW_HALVES (launch._config): the position
    term per row half (position._pos_row_halves)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if DKDV_T:
        dk = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _stream_dkdv(dk, dv, pid_n, bh, S0, G0, keys, dims, drop, 0, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK,
                          D, PREC, UPCAST, DKDV_T, ROW_HALVES)
    if S1 is not None:
        dk, dv = _stream_dkdv(dk, dv, pid_n, bh, S1, G1, keys, dims, drop, 1, BLOCK_M, BLOCK_N, BAND, BLOCK_D,
                              D_CHUNK, D, PREC, UPCAST, DKDV_T, ROW_HALVES)
    if DKDV_T:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    offs_d = tl.arange(0, BLOCK_D)
    ptr = bh.to(tl.int64) * keys.Lk * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :]
    ok = (offs_n < keys.Lk)[:, None] & (offs_d < D)[None, :]
    tl.store(DK + ptr, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + ptr, dv.to(DV.dtype.element_ty), mask=ok)
