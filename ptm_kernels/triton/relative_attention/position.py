"""The position term of relative attention in device code: the band form (consecutive rows: one dot against
the band of r a tile pair uses, then a diagonal select) and the gather form (rows at arbitrary positions)."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import dot


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
def _band(keys, b64, h64, R_bh, t0, offs_d, D: tl.constexpr, BAND: tl.constexpr):
    """The band of r a (row tile, key tile) pair uses, rows t0 + [0, BAND): (r_band, which rows exist). Through
    the TMA descriptor keys.r_band where the launcher made one (args.Keys; its boxes are bands), else by
    pointers (R_bh: r at (b, h)). TMA reads rows outside [0, R) as zeros, before the first row (t0 < 0, a
    negative coordinate) as past the last, as the masked pointer load does."""
    t_band = t0 + tl.arange(0, BAND)
    if keys.r_band is not None:
        band_ok = (t_band >= 0) & (t_band < keys.R)
        r_band = keys.r_band.load([(b64 * keys.r_batch_step).to(tl.int32), h64.to(tl.int32), t0.to(tl.int32), 0])
        return tl.reshape(r_band, [BAND, offs_d.shape[0]]), band_ok
    return _band_rows(R_bh, keys.r.s_l, t_band, keys.R, offs_d, D)


@triton.jit
def _pos_band(qv, band, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Position term for consecutive rows: local row m, key n uses band row c = (BLOCK_M - 1 - m) + n (band:
    _band). One dot against the band (tensor cores), then the diagonal select.

    With 64-row tiles (wgmma) the dot is band-major, r_band qv^T ([BAND, BLOCK_M]): its result feeds the
    probabilities, hence further dots, and Triton lays such a chained dot's warps along M alone, so with M =
    BLOCK_M = 64 on 8 warps both warpgroups would each hold (and compute) the whole [64, BAND] float32 tile;
    with M = BAND each warp owns its rows (sm_90, bf16 D = 128: 372 -> 256 spill bytes in dq, 592 -> 360 in
    dk/dv). The band in two 64-row pieces, one [64, BLOCK_M] dot each, was measured too (launch._config): the
    same multiply-adds, but a 64-row chained dot is held by both warpgroups again. Smaller tiles (float32,
    mma.sync) keep qv r_band^T: band-major, its tf32x3 product spilled more."""
    r_band, band_ok = band
    if _band_major(BLOCK_M):
        return _band_select_major(dot(r_band, tl.trans(qv), None, PREC, UPCAST), BLOCK_M, BLOCK_N)
    else:
        return _band_select(dot(qv, tl.trans(r_band), None, PREC, UPCAST), BLOCK_M, BLOCK_N)


@triton.jit
def _band_select_major(pbt, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The diagonal select of _pos_band from a band-major band product pbt = r_band qv^T ([BAND, BLOCK_M]):
    local row m, key n uses band row (BLOCK_M - 1 - m) + n. -> [BLOCK_M, BLOCK_N]."""
    idx = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[None, :] + tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, BLOCK_M]
    return tl.trans(tl.gather(pbt, idx, axis=0))


@triton.jit
def _slot_width(BLOCK_M: tl.constexpr, BAND: tl.constexpr):
    """Columns of a row of the dq kernel's band slots (backward._stream_dq): BLOCK_M + BAND."""
    return BLOCK_M + BAND


@triton.jit
def _slot_skewed(BLOCK_M: tl.constexpr, BAND: tl.constexpr):
    """Where the band-major tile [BAND, BLOCK_M] (band row c, column m) sits in a band slot, skewed: row m, column
    c + m + 1. Then the pairs (row m, key j + n) of a key tile, band row (BLOCK_M - 1 - m) + j + n, sit at column
    BLOCK_M + j + n of row m: a box contiguous in n (_slot_box). -> int32 [BAND, BLOCK_M] offsets."""
    m = tl.arange(0, BLOCK_M)[None, :]
    return m * _slot_width(BLOCK_M, BAND) + tl.arange(0, BAND)[:, None] + m + 1


@triton.jit
def _slot_box(j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """The offsets of key tile j's pairs in a band slot (_slot_skewed): [BLOCK_M, BLOCK_N], each row BLOCK_N
    contiguous and 16-byte aligned (j and BLOCK_M multiples of 16, the width a multiple of 64), so loaded and stored
    as vectors. Band-major (c * BLOCK_M + m), the pairs lay BLOCK_M - 1 apart in every direction: one 64-bit
    address per element, which held 16 registers across the dq kernel's key step (sm_90, D = 128: 40 / 164 / 132
    spill bytes with band causal / every mask + dropout / two streams; 0 / 92 / 84 skewed)."""
    return (tl.arange(0, BLOCK_M)[:, None] * _slot_width(BLOCK_M, BAND) + BLOCK_M + j
            + tl.arange(0, BLOCK_N)[None, :])


@triton.jit
def _band_select_from(SLOT, j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """The position terms of keys j + [0, BLOCK_N) (those _band_select_major selects), read from the band product
    that the dq kernel stored skewed in its slot (SLOT: float32, _slot_skewed; backward._stream_dq): one vector
    load per row piece, where selecting them from the product in registers (tl.gather: warp shuffles, their index
    arithmetic and selects) took most of the dq kernel's key step. -> [BLOCK_M, BLOCK_N]."""
    return tl.load(SLOT + _slot_box(j, BLOCK_M, BLOCK_N, BAND))


@triton.jit
def _band_image_store(IMG, g, j, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """dS's band image in a band slot (IMG: of its dtype, skewed as the product, _slot_skewed): the entries of key
    tile j ([BLOCK_M, BLOCK_N], dS or zeros), where _band_select_from reads the position terms (the transpose of
    the select). The key tiles of one band product write disjoint entries."""
    tl.store(IMG + _slot_box(j, BLOCK_M, BLOCK_N, BAND), g.to(IMG.dtype.element_ty))


@triton.jit
def _slot_zero(IMG, BLOCK_M: tl.constexpr, BAND: tl.constexpr):
    """Zero a band slot's image (IMG), all BLOCK_M x (BLOCK_M + BAND) entries: those off the band's diagonals
    (columns outside [BLOCK_M, BLOCK_M + span)) are never written and must read 0."""
    W: tl.constexpr = _slot_width(BLOCK_M, BAND)
    cols = tl.arange(0, triton.next_power_of_2(W))
    tl.store(IMG + tl.arange(0, BLOCK_M)[:, None] * W + cols[None, :],
             tl.zeros([BLOCK_M, triton.next_power_of_2(W)], dtype=IMG.dtype.element_ty), mask=(cols < W)[None, :])


@triton.jit
def _band_keys(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """Keys one band product serves in the dq kernel: a band-major band of BAND rows covers BAND - BLOCK_M + 1
    consecutive keys of a BLOCK_M-row tile; the largest multiple of BLOCK_N within that (64 with 64 rows, 16 keys
    a step and BAND = 128; at least BLOCK_N, as BAND >= BLOCK_M + BLOCK_N), else one key tile."""
    if _band_major(BLOCK_M):
        return ((BAND - BLOCK_M) // BLOCK_N) * BLOCK_N
    else:
        return BLOCK_N


@triton.jit
def _pos_row_halves(qv_halves, R_bh, s_rt, t0, R, offs_d, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Position term for consecutive rows, the row tile in two halves (qv_halves: the qv rows of its first and
    second half), each against the band of its own rows: the first half's rows meet band rows t0 + HALF + [0, HB),
    the second half's t0 + [0, HB), HB = next_pow2(BLOCK_M / 2 + BLOCK_N) (64 for 64 rows and 32 keys, where the
    whole tile's band takes 128). Two band-major [HB, BLOCK_M / 2] dots instead of one [BAND, BLOCK_M] dot or two
    [64, BLOCK_M] pieces: at 64 rows the result of a chained dot with M = 64 is held (and computed) by both
    warpgroups, so the pieces cost each warpgroup 2 x 64 x 64 x D multiply-adds where the halves cost 2 x 64 x 32
    x D."""
    HALF: tl.constexpr = BLOCK_M // 2
    HB: tl.constexpr = triton.next_power_of_2(HALF + BLOCK_N)
    qv0, qv1 = qv_halves
    idx = (HALF - 1 - tl.arange(0, HALF))[None, :] + tl.arange(0, BLOCK_N)[:, None]  # [BLOCK_N, HALF]
    r0, ok0 = _band_rows(R_bh, s_rt, t0 + HALF + tl.arange(0, HB), R, offs_d, D)
    pos0 = tl.gather(dot(r0, tl.trans(qv0), None, PREC, UPCAST), idx, axis=0)  # [BLOCK_N, HALF]
    r1, ok1 = _band_rows(R_bh, s_rt, t0 + tl.arange(0, HB), R, offs_d, D)
    pos1 = tl.gather(dot(r1, tl.trans(qv1), None, PREC, UPCAST), idx, axis=0)
    # [BLOCK_N, HALF, 2] -> [2, HALF, BLOCK_N] -> rows h * HALF + m
    return tl.reshape(tl.permute(tl.join(pos0, pos1), (2, 1, 0)), [BLOCK_M, BLOCK_N])


@triton.jit
def _band_select(pb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The diagonal select of _pos_band from pb = qv r_band^T ([BLOCK_M, BAND]): -> [BLOCK_M, BLOCK_N]."""
    idx = (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] + tl.arange(0, BLOCK_N)[None, :]
    return tl.gather(pb, idx, axis=1)


@triton.jit
def _band_major(BLOCK_M: tl.constexpr):
    """Whether the band products of a BLOCK_M-row tile are laid out band-major (see _pos_band)."""
    return BLOCK_M >= 64


@triton.jit
def _band_grad(g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr):
    """The transpose of _band_select: dpb[m, c] = g[m, c - (BLOCK_M - 1 - m)] where that key index is in
    [0, BLOCK_N), else 0 (float32), [BLOCK_M, BAND]. Band-major tiles write theirs to memory instead
    (_band_image_store)."""
    n = tl.arange(0, BAND)[None, :] - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None]
    n_ok = (n >= 0) & (n < BLOCK_N)
    return tl.where(n_ok, tl.gather(g, tl.where(n_ok, n, 0), axis=1), 0.0)
