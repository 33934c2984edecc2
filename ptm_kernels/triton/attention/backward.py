"""Attention backward kernels (FlashAttention-2): the preprocess (delta = rowsum(dO * O)), dQ (with dS for the
bias / Toeplitz gradients) and dK/dV kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import dot, dropout_keep, load
from .masks import _key_tile_range, _mod_scores, _query_tile_range


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
            keepT = dropout_keep(seed, bh64, rows, n0, Lq, Lk, drop_thr, BLOCK_N, True)
            pdT = tl.where(keepT, pT * rdrop, 0.0)
            dpT = tl.where(keepT, dpT * rdrop, 0.0)
        else:
            pdT = pT
        dsT = pT * (dpT - delta[None, :])  # before the dV dot: pT and dpT are dead there (fewer live registers)
        dv = dot(pdT.to(do.dtype), do, dv, PREC, UPCAST)
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

