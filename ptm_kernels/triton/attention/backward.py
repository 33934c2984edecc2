"""Attention backward kernels (FlashAttention-2): the preprocess (delta = rowsum(dO * O)), dQ (with dS for the
bias / Toeplitz gradients) and dK/dV kernels. Grouped arguments as in forward.py; LSE and DELTA are
contiguous float32 [B, H, Lq] pointers; tma: TMA descriptors (q, k, v, do) of the [B, H, L, D] operands with
[1, 1, rows, BLOCK_D] boxes (launch._tma_descriptors, Hopper: the kernel's query tile for q / do, its key tile
for k / v), or None: pointer loads."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import dot, dropout_keep
from .masks import _key_tile, _key_tile_range, _mod_scores, _query_tile_range, _tile_ctx
from .tiles import _row_program, _rows_tile, _tile_mask, _tile_start


@triton.jit
def _bwd_preprocess_kernel(O, DO, DELTA, s_ob, s_oh, s_om, s_dob, s_doh, s_dom, H, Lq, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    _pid_m, b, h, offs_m, row_ok = _row_program(tl.program_id(0), Lq, H, BLOCK_M, False)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(row_ok, offs_d, D, EVEN_D)
    rows64 = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b64 * s_ob + h64 * s_oh + rows64 * s_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b64 * s_dob + h64 * s_doh + rows64 * s_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b64 * H + h64) * Lq + offs_m, delta, mask=row_ok)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, kv, it_lo, it_hi, IDX, offs_m, offs_n, offs_d, ctx, mask, drop, bh64, DB, DT,
              MASK: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ over key tiles it_lo..it_hi (as _fwd_tiles); DB / DT (or None): the dbias buffer, the dtoeplitz table
    (see _attn_bwd_dq_kernel)."""
    K_bh, V_bh, k_offs, v_offs, s_kn, s_vn, D, qk_scale, tma, kv_at = kv
    h64 = ctx.h64
    Lq = ctx.Lq
    Lk = ctx.Lk
    for it in range(it_lo, it_hi):
        start_n, cols, kv_mask = _key_tile(it, IDX, offs_n, offs_d, Lk, D, MASK, SPARSE, BLOCK_N, EVEN_D)
        k = _rows_tile(tma, 1, kv_at, start_n, K_bh + start_n.to(tl.int64) * s_kn + k_offs, kv_mask,
                       MASK or not EVEN_D, BLOCK_N, offs_d.shape[0])
        v = _rows_tile(tma, 2, kv_at, start_n, V_bh + start_n.to(tl.int64) * s_vn + v_offs, kv_mask,
                       MASK or not EVEN_D, BLOCK_N, offs_d.shape[0])
        s = dot(q, tl.trans(k), None, PREC, UPCAST) * qk_scale
        s = _mod_scores(s, 0, offs_m[:, None], start_n, offs_n[None, :], ctx, mask, MASK, CAUSAL)
        p = tl.math.exp2(s - lse2[:, None])
        dp = dot(do, tl.trans(v), None, PREC, UPCAST)
        if drop is not None:
            seed, threshold, scale = drop
            keep = dropout_keep(seed, bh64, offs_m, start_n, Lq, Lk, threshold, BLOCK_N)
            dp = tl.where(keep, dp * scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, dq, PREC, UPCAST)
        if DB is not None:
            ok = (offs_m[:, None] < Lq) & (cols[None, :] < Lk)
            tl.store(DB + bh64 * Lq * Lk + offs_m[:, None].to(tl.int64) * Lk + cols[None, :], ds, mask=ok)
        if DT is not None:
            ok = (offs_m[:, None] < Lq) & (cols[None, :] < Lk)
            tl.atomic_add(DT[0] + h64 * DT[1] + (offs_m[:, None] - cols[None, :] + (Lk - 1)), ds, mask=ok,
                          sem="relaxed")
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DB, DT, mask, lists, drop, tma, qk_scale, sm_scale, H, G, Lq,
                        Lk, D,
                        CAUSAL: tl.constexpr, ELEMWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dQ (and, when DB / DT are given, dS into the dbias buffer [B, H, Lq, Lk] / the dtoeplitz table (ptr,
    stride_h)) of one query tile."""
    pid_m, b, h, offs_m, row_ok = _row_program(tl.program_id(0), Lq, H, BLOCK_M, True)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = b64 * H + h64
    hk = h // G
    hk64 = hk.to(tl.int64)

    m0 = pid_m * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = _tile_mask(row_ok, offs_d, D, EVEN_D)
    rows64 = offs_m[:, None].to(tl.int64)
    q = _rows_tile(tma, 0, (b, h), m0, Q[0] + b64 * Q[1] + h64 * Q[2] + rows64 * Q[3] + offs_d[None, :], q_mask,
                   True, BLOCK_M, BLOCK_D)
    do = _rows_tile(tma, 3, (b, h), m0, DO[0] + b64 * DO[1] + h64 * DO[2] + rows64 * DO[3] + offs_d[None, :],
                    q_mask, True, BLOCK_M, BLOCK_D)
    lse = tl.load(LSE + bh64 * Lq + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # empty rows: p = 0
    delta = tl.load(DELTA + bh64 * Lq + offs_m, mask=row_ok, other=0.0)
    kv = (K[0] + b64 * K[1] + hk64 * K[2], V[0] + b64 * V[1] + hk64 * V[2], offs_n[:, None] * K[3] + offs_d[None, :],
          offs_n[:, None] * V[3] + offs_d[None, :], K[3], V[3], D, qk_scale, tma, (b, hk))
    ctx = _tile_ctx(mask, b, b64, h64, Lq, Lk)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if lists is not None:
        lrow = b64 * lists.s_b + h64 * lists.s_h + pid_m
        n1 = tl.load(lists.cnt_partial + lrow)
        n2 = tl.load(lists.cnt_full + lrow)
        dq = _dq_tiles(dq, q, do, lse2, delta, kv, 0, n1, lists.idx_partial + lrow * lists.n, offs_m, offs_n, offs_d,
                       ctx, mask, drop, bh64, DB, DT, True, True, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, kv, 0, n2, lists.idx_full + lrow * lists.n, offs_m, offs_n, offs_d,
                       ctx, mask, drop, bh64, DB, DT, False, True, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST)
    else:
        A, F0, F1, Z = _key_tile_range(m0, ctx, mask, BLOCK_M, BLOCK_N, CAUSAL, ELEMWISE)
        if mask.window is not None:  # else [A, F0) is empty (see _attn_fwd_kernel)
            dq = _dq_tiles(dq, q, do, lse2, delta, kv, A, F0, None, offs_m, offs_n, offs_d, ctx, mask, drop, bh64, DB,
                           DT, True, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, kv, F0, F1, None, offs_m, offs_n, offs_d, ctx, mask, drop, bh64, DB, DT,
                       False, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST)
        dq = _dq_tiles(dq, q, do, lse2, delta, kv, F1, Z, None, offs_m, offs_n, offs_d, ctx, mask, drop, bh64, DB, DT,
                       True, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ[0] + b64 * DQ[1] + h64 * DQ[2] + rows64 * DQ[3] + offs_d[None, :], dq.to(DQ[0].dtype.element_ty),
             mask=q_mask)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, head, it_lo, it_hi, IDX, offs_mb, n0, offs_d, ctx, mask, drop, bh64,
                MASK: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV of one key tile [n0, n0 + BLOCK_N) over query tiles it_lo..it_hi of one query head: head =
    (Q_bh, DO_bh, LSE_bh, DELTA_bh, s_qm, s_dom, D, qk_scale, tma, (b, h))."""
    Q_bh, DO_bh, LSE_bh, DELTA_bh, s_qm, s_dom, D, qk_scale, tma, q_at = head
    Lq = ctx.Lq
    Lk = ctx.Lk
    offs_n = tl.arange(0, BLOCK_N)
    if drop is not None:  # 1 - p (0 when p = 1: every key dropped, dS = 0)
        unscale = tl.where(drop[2] > 0.0, 1.0 / drop[2], 0.0)
    for it in range(it_lo, it_hi):
        m0 = _tile_start(it, IDX, SPARSE, BLOCK_M)
        rows = m0 + offs_mb
        rows64 = rows[:, None].to(tl.int64)
        if MASK:
            row_ok = rows < Lq
            q_mask = _tile_mask(row_ok, offs_d, D, EVEN_D)
            lse = tl.load(LSE_bh + rows, mask=row_ok, other=float("inf"))  # rows past Lq: p = 0
            delta = tl.load(DELTA_bh + rows, mask=row_ok, other=0.0)
        else:  # a full query tile lies inside [0, Lq) (see _query_tile_range / _convert_map)
            q_mask = offs_d[None, :] < D
            lse = tl.load(LSE_bh + rows)
            delta = tl.load(DELTA_bh + rows)
        q = _rows_tile(tma, 0, q_at, m0, Q_bh + rows64 * s_qm + offs_d[None, :], q_mask, MASK or not EVEN_D,
                       BLOCK_M, offs_d.shape[0])
        do = _rows_tile(tma, 3, q_at, m0, DO_bh + rows64 * s_dom + offs_d[None, :], q_mask, MASK or not EVEN_D,
                        BLOCK_M, offs_d.shape[0])
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        # Transposed scores: [keys, queries].
        sT = dot(k, tl.trans(q), None, PREC, UPCAST) * qk_scale
        sT = _mod_scores(sT, m0, offs_mb[None, :], n0, offs_n[:, None], ctx, mask, MASK, CAUSAL, True)
        pT = tl.math.exp2(sT - lse2[None, :])
        if drop is not None:
            # With Pd = keep P (the kept probabilities, unscaled): dV += scale Pd^T dO and
            # dS = P (scale keep dP - delta) = scale (Pd dP - P delta / scale). dK and dV are accumulated without
            # the scale (applied once at the end), and the keep-mask has one use (its bits are built once).
            seed, threshold, _scale = drop
            dpT = dot(v, tl.trans(do), None, PREC, UPCAST)
            keepT = dropout_keep(seed, bh64, rows, n0, Lq, Lk, threshold, BLOCK_N, True)
            pdT = tl.where(keepT, pT, 0.0)
            dsT = pdT * dpT - pT * (delta * unscale)[None, :]  # before the dV dot: fewer live registers
            dv = dot(pdT.to(do.dtype), do, dv, PREC, UPCAST)
        else:  # dV first: pT is dead before the dO . V^T product is live (fewer live registers)
            dv = dot(pT.to(do.dtype), do, dv, PREC, UPCAST)
            dpT = dot(v, tl.trans(do), None, PREC, UPCAST)
            dsT = pT * (dpT - delta[None, :])
        dk = dot(dsT.to(q.dtype), q, dk, PREC, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, mask, lists, drop, tma, qk_scale, sm_scale, H, Hk, G, GS,
                          NS, Lq, Lk, D, CAUSAL: tl.constexpr, ELEMWISE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                          UPCAST: tl.constexpr):
    """dK, dV of one key tile, summed over the GS query heads of its GQA group split; DK, DV = (ptr, stride_b,
    stride_h, stride_split, stride_l)."""
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
    kv_mask = _tile_mask(cols < Lk, offs_d, D, EVEN_D)
    cols64 = cols[:, None].to(tl.int64)
    k = _rows_tile(tma, 1, (b, hk), n0, K[0] + b64 * K[1] + hk64 * K[2] + cols64 * K[3] + offs_d[None, :], kv_mask,
                   True, BLOCK_N, BLOCK_D)
    v = _rows_tile(tma, 2, (b, hk), n0, V[0] + b64 * V[1] + hk64 * V[2] + cols64 * V[3] + offs_d[None, :], kv_mask,
                   True, BLOCK_N, BLOCK_D)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if lists is None:  # the query-tile range depends on the batch row only
        A, F0, F1, Z = _query_tile_range(n0, _tile_ctx(mask, b, b64, b64 * 0, Lq, Lk), mask, BLOCK_M, BLOCK_N,
                                         CAUSAL, ELEMWISE)
    for gi in range(0, GS):  # the query heads sharing this kv head (this split's share of them)
        h = hk * G + gsplit * GS + gi
        h64 = h.to(tl.int64)
        bh64 = b64 * H + h64
        ctx = _tile_ctx(mask, b, b64, h64, Lq, Lk)
        head = (Q[0] + b64 * Q[1] + h64 * Q[2], DO[0] + b64 * DO[1] + h64 * DO[2], LSE + bh64 * Lq,
                DELTA + bh64 * Lq, Q[3], DO[3], D, qk_scale, tma, (b, h))
        if lists is not None:
            lrow = b64 * lists.s_b + h64 * lists.s_h + pid_n
            n1 = tl.load(lists.cnt_partial + lrow)
            n2 = tl.load(lists.cnt_full + lrow)
            dk, dv = _dkdv_tiles(dk, dv, k, v, head, 0, n1, lists.idx_partial + lrow * lists.n, offs_mb, n0, offs_d,
                                 ctx, mask, drop, bh64, True, True, CAUSAL, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, head, 0, n2, lists.idx_full + lrow * lists.n, offs_mb, n0, offs_d,
                                 ctx, mask, drop, bh64, False, True, CAUSAL, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
        else:
            dk, dv = _dkdv_tiles(dk, dv, k, v, head, A, F0, None, offs_mb, n0, offs_d, ctx, mask, drop, bh64,
                                 True, False, CAUSAL, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, head, F0, F1, None, offs_mb, n0, offs_d, ctx, mask, drop, bh64,
                                 False, False, CAUSAL, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
            dk, dv = _dkdv_tiles(dk, dv, k, v, head, F1, Z, None, offs_mb, n0, offs_d, ctx, mask, drop, bh64,
                                 True, False, CAUSAL, BLOCK_M, BLOCK_N, EVEN_D, PREC, UPCAST)
    dk = dk * sm_scale
    if drop is not None:  # the dropout scale left out of the loop (_dkdv_tiles)
        dk = dk * drop[2]
        dv = dv * drop[2]
    gs64 = gsplit.to(tl.int64)
    tl.store(DK[0] + b64 * DK[1] + hk64 * DK[2] + gs64 * DK[3] + cols64 * DK[4] + offs_d[None, :],
             dk.to(DK[0].dtype.element_ty), mask=kv_mask)
    tl.store(DV[0] + b64 * DV[1] + hk64 * DV[2] + gs64 * DV[3] + cols64 * DV[4] + offs_d[None, :],
             dv.to(DV[0].dtype.element_ty), mask=kv_mask)
