"""Relative attention scores in device code: the content + position + segment terms of a tile, the
visibility of its (row, key) pairs, the per-row terms shared by forward and backward, and the one place
that sends each program to its stream. S: args.StreamArgs, keys: args.Keys, dims: args.Dims."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import analytic_visible, dot


@triton.jit
def _for_stream(BODY: tl.constexpr, S0, S1, X0, X1, keys, dims, drop, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BAND: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr,
                D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Run BODY (the forward's or backward's row-tile program) for stream program_id(2) with its stream
    arguments S and results X; S1 / X1 are None for a single stream. Stream s draws its dropout with seed + s
    modulo 2 ** 63 (args.DropoutArgs)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if tl.program_id(2) == 0:
        BODY(pid_m, bh, S0, X0, keys, dims, drop, 0, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)
    elif S1 is not None:
        BODY(pid_m, bh, S1, X1, keys, dims, drop, 1, BLOCK_M, BLOCK_N, BAND, BLOCK_D, D_CHUNK, D, PREC, UPCAST)


@triton.jit
def _key_tile(T, b64, h64, start_n, offs_n, col_ok, BLOCK_D: tl.constexpr, D: tl.constexpr):
    """Rows offs_n = start_n + [0, BLOCK_N) of the [B, H, L, D] tensor T (args.Rows) at (b, h): [BLOCK_N,
    BLOCK_D], 0 outside col_ok (rows past the end) and past D; through T's TMA descriptor where it has one (its
    boxes are these tiles; it reads rows past the end as zeros too), else by pointers."""
    if T.tma is not None:
        tile = T.tma.load([b64.to(tl.int32), h64.to(tl.int32), start_n, 0])
        return tl.reshape(tile, [offs_n.shape[0], BLOCK_D])
    return _cols(T, b64, h64, offs_n, col_ok, tl.arange(0, BLOCK_D), D)


@triton.jit
def _cols(T, b64, h64, idx, ok, offs_c, D: tl.constexpr):
    """Columns offs_c of rows idx of the [B, H, L, D] tensor T (args.Rows) at (b, h); 0 outside ok or past D."""
    return tl.load(T.ptr + b64 * T.s_b + h64 * T.s_h + idx.to(tl.int64)[:, None] * T.s_l + offs_c[None, :],
                   mask=ok[:, None] & (offs_c < D)[None, :], other=0.0)


@triton.jit
def _scores(qu, pos, k, keys, b64, row, offs_n, col_ok, scale2, HAS_SEG: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr):
    """Scaled scores (base 2) of a row tile against the key tile k (keys offs_n), before the mask; pos: the
    position term (_pos_gather or _pos_band); row: _row_terms."""
    return _scores_of(dot(qu, tl.trans(k), None, PREC, UPCAST), pos, keys, b64, row, offs_n, col_ok, scale2, HAS_SEG)


@triton.jit
def _scores_of(qk, pos, keys, b64, row, offs_n, col_ok, scale2, HAS_SEG: tl.constexpr):
    """_scores from the content term qk = qu k^T."""
    s = qk + pos
    if HAS_SEG:
        ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
        kid = tl.load(keys.k_ids + b64 * keys.Lk + offs_n, mask=col_ok, other=0)
        same = qid[:, None] == kid[None, :]
        s += tl.where(same, seg0[:, None], seg1[:, None])
    return s * scale2


@triton.jit
def _visible(S, rows, row, offs_n, row_ok, col_ok, b64, h64, Lk):
    """Which (row, key) pairs of the tile the stream's mask parts let through ([BLOCK_M, BLOCK_N] bool)."""
    ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
    wl = 0
    wr = 0
    if S.window is not None:
        wl = S.window.left
        wr = S.window.right
    vis = analytic_visible(row_ok[:, None] & col_ok[None, :], ip[:, None], offs_n[None, :], klen, plen, wl, wr,
                           S.causal, S.prefix_lengths is not None, S.window is not None, S.key_lengths is not None)
    if S.q_segments is not None:
        ks = tl.load(S.k_segments + b64 * Lk + offs_n, mask=col_ok, other=0)
        vis = vis & (qseg[:, None] == ks[None, :])
    if S.dense is not None:
        dm = S.dense
        dm_ptr = dm.ptr + b64 * dm.s_b + h64 * dm.s_h
        m = tl.load(dm_ptr + rows[:, None].to(tl.int64) * dm.s_m + offs_n[None, :].to(tl.int64) * dm.s_n,
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        vis = vis & (m != 0)
    return vis


@triton.jit
def _row_terms(S, keys, dims, pid_m, b, b64, bh64, rows, rows64, row_ok, BLOCK_M: tl.constexpr):
    """What a row tile needs besides its q rows, the same for forward and backward: -> (ip: the rows'
    positions among the keys, base: r row t = base + j, t_last: the band start (consecutive rows: the tile's
    last row meets key 0 at r row t_last), seg0, seg1, qid: the segment term, klen, plen: this batch row's
    key length and prefix length, qseg: the rows' segments of the visibility (_visible), read once here: read
    in _visible, the dq kernel's pipeline copied them into shared memory every key step (sm_90, bf16 D = 128
    with every mask + dropout: 724 -> 670 instructions a step, 76 / 60 -> 68 / 52 spill bytes))."""
    Lr = S.Lr
    if S.positions is not None:
        p = tl.load(S.positions + b64 * Lr + rows, mask=row_ok, other=0).to(tl.int32)  # in [0, Lq): op checks
    else:
        p = rows
    ip = p + (keys.Lk - dims.q_len)  # int32: the mask compares it with every key of a tile
    base = dims.r_offset - ip.to(tl.int64)
    t_last = dims.r_offset - (pid_m * BLOCK_M + BLOCK_M - 1 + keys.Lk - dims.q_len).to(tl.int64)
    seg0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    seg1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    qid = tl.zeros([BLOCK_M], dtype=tl.int64)
    if S.seg is not None:
        seg_ptr = S.seg + (bh64 * Lr + rows64) * 2
        seg0 = tl.load(seg_ptr, mask=row_ok, other=0.0)
        seg1 = tl.load(seg_ptr + 1, mask=row_ok, other=0.0)
        qid = tl.load(S.q_ids + b64 * Lr + rows, mask=row_ok, other=0)
    qseg = 0
    if S.q_segments is not None:
        qseg = tl.load(S.q_segments + b64 * Lr + rows, mask=row_ok, other=0)
    klen = 0
    if S.key_lengths is not None:
        klen = tl.load(S.key_lengths + b)
    plen = 0
    if S.prefix_lengths is not None:
        plen = tl.load(S.prefix_lengths + b)
    return ip, base, t_last, seg0, seg1, qid, klen, plen, qseg


@triton.jit
def _key_range(S, row, row_ok, Lk, BLOCK_N: tl.constexpr):
    """[lo, hi): the keys a row tile may see. Causal (without prefix) ends after the last row's position; a
    left window starts late (lo rounded down to a key tile)."""
    ip, base, t_last, seg0, seg1, qid, klen, plen, qseg = row
    hi = Lk
    if S.causal:
        if S.prefix_lengths is None:
            hi = tl.minimum(Lk, (tl.max(tl.where(row_ok, ip, -1)) + 1).to(tl.int32))
    lo = 0
    if S.window is not None:
        wl = S.window.left
        lo_w = tl.maximum(tl.min(tl.where(row_ok, ip, Lk + wl)) - wl, 0).to(tl.int32)
        lo = (lo_w // BLOCK_N) * BLOCK_N
    return lo, hi
