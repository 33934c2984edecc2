"""Attention forward kernels: the main kernel (online softmax over the visible key tiles, optionally one key
split of a decoding launch), the combine kernel of the key splits, and the dropout-mask kernel.

Grouped arguments (NamedTuples / tuples, see launch.py): Q, K, V = (ptr, stride_b, stride_h, stride_l);
O = (ptr, stride_b, stride_h, stride_l, stride_split); LSE = (ptr, stride_split); mask: masks.MaskArgs;
lists: launch.TileLists or None (no block map); drop: (seed, threshold, scale) or None (no dropout); tma: TMA
descriptors (q, k, v) of the [B, H, L, D] operands with [1, 1, rows, BLOCK_D] boxes (launch._tma_descriptors,
Hopper), or None: pointer loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._common import dot, dropout_keep
from .masks import _key_tile, _key_tile_range, _mod_scores, _tile_ctx
from .tiles import _row_program, _rows_tile, _tile_mask


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, kv, it_lo, it_hi, IDX, offs_m, offs_n, offs_d, ctx, mask, drop, keep_at,
               MASK: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SCALE_POS: tl.constexpr,
               STAGES: tl.constexpr = None):
    """Online softmax over key tiles it_lo..it_hi (tile indices, or positions in the list IDX when SPARSE);
    MASK: tiles that need the mask (else fully visible, inside [0, Lk)). STAGES: the loop's software-pipeline
    depth (None: the kernel's num_stages). The other arguments: _fwd_tile's."""
    for it in tl.range(it_lo, it_hi, num_stages=STAGES):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kv, it, IDX, offs_m, offs_n, offs_d, ctx, mask, drop, keep_at,
                                  MASK, SPARSE, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS)
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, kv, it, IDX, offs_m, offs_n, offs_d, ctx, mask, drop, keep_at,
              MASK: tl.constexpr, SPARSE: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, SCALE_POS: tl.constexpr,
              DIAGONAL: tl.constexpr = False):
    """One online-softmax step over key tile it (see _fwd_tiles). kv = (K_bh, V_bh, k_offs, v_offs, s_kn, s_vn,
    D, qk_scale, tma, kv_at); keep_at = (bh, rows): the dropout_keep arguments of the tile's rows. SCALE_POS:
    qk_scale > 0, so that without additive terms the scale folds into the exp2's argument (one FFMA per score,
    as the tutorial: the row maximum of the unscaled scores, times the scale, is the scaled one). DIAGONAL: the
    tile is the causal diagonal of a square query tile (launch._one_diagonal), so its mask is a constant lower
    triangle: key j of the tile is visible to row i when j <= i (the keys past Lk lie to the right of every valid
    row's diagonal; the rows past Lq are never stored)."""
    K_bh, V_bh, k_offs, v_offs, s_kn, s_vn, D, qk_scale, tma, kv_at = kv
    Lq = ctx.Lq
    Lk = ctx.Lk
    start_n, cols, kv_mask = _key_tile(it, IDX, offs_n, offs_d, Lk, D, MASK, SPARSE, BLOCK_N, EVEN_D)
    k = _rows_tile(tma, 1, kv_at, start_n, K_bh + start_n.to(tl.int64) * s_kn + k_offs, kv_mask,
                   MASK or not EVEN_D, BLOCK_N, offs_d.shape[0])
    s = dot(q, tl.trans(k), None, PREC, UPCAST)
    MASK_SCORES: tl.constexpr = MASK and not DIAGONAL  # (the diagonal's: _mod_scores adds the additive terms)
    if DIAGONAL:
        s = tl.where(offs_n[None, :] <= tl.arange(0, BLOCK_N)[:, None], s, float("-inf"))
    if SCALE_POS and mask.bias is None and mask.toeplitz is None:
        s = _mod_scores(s, 0, offs_m[:, None], start_n, offs_n[None, :], ctx, mask, MASK_SCORES, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: no NaN
        p = tl.math.exp2(s * qk_scale - m_use[:, None])
    else:
        s = _mod_scores(s * qk_scale, 0, offs_m[:, None], start_n, offs_n[None, :], ctx, mask, MASK_SCORES, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if drop is not None:
        seed, threshold, _scale = drop
        keep = dropout_keep(seed, keep_at[0], keep_at[1], start_n, Lq, Lk, threshold, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    v = _rows_tile(tma, 2, kv_at, start_n, V_bh + start_n.to(tl.int64) * s_vn + v_offs, kv_mask,
                   MASK or not EVEN_D, BLOCK_N, offs_d.shape[0])
    acc = dot(p.to(v.dtype), v, acc, PREC, UPCAST)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _program_rows(pid, H, G, Lq, BLOCK_M: tl.constexpr, PACK_GROUP: tl.constexpr):
    """The query rows of a forward program -> (b, kv head, head, b * H + head, query row index of each row,
    row_ok, m0: first query row). PACK_GROUP (decoding under GQA): one program per (b, kv head) holds the G * Lq rows of
    its G query heads, row r = query row r % Lq of head r // Lq, so each K / V tile is loaded once per group;
    head is then per row, 1-D (rows past G * Lq repeat the group's last head: computed, never stored). Else
    one program per (query tile, b, h), heaviest (last, for causal) tiles first, and head is a scalar."""
    if PACK_GROUP:
        Hk = H // G
        b = pid // Hk
        hk = pid % Hk
        r = tl.arange(0, BLOCK_M)
        head = hk * G + tl.minimum(r // Lq, G - 1)
        bh = b * H + head
        offs_m = r % Lq
        row_ok = r < G * Lq
        m0 = pid * 0
    else:
        num_m = tl.cdiv(Lq, BLOCK_M)
        bh = pid // num_m
        b = bh // H
        head = bh % H
        hk = head // G
        m0 = (num_m - 1 - pid % num_m) * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
    return b, hk, head, bh, offs_m, row_ok, m0


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, mask, lists, drop, tma, qk_scale, H, G, Lq, Lk, D, n_split,
                     CAUSAL: tl.constexpr, ELEMWISE: tl.constexpr, SPLIT: tl.constexpr, PACK_GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, SCALE_POS: tl.constexpr,
                     ONE_DIAGONAL: tl.constexpr = False):
    """ONE_DIAGONAL: every query tile has exactly one masked key tile, its diagonal (launch._one_diagonal)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b, hk, head, bh, offs_m, row_ok, m0 = _program_rows(pid, H, G, Lq, BLOCK_M, PACK_GROUP)
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    bh64 = bh.to(tl.int64)  # a scalar, or per row (PACK_GROUP)
    if PACK_GROUP:
        h64 = head.to(tl.int64)[:, None]  # a column: addresses [BLOCK_M, x] tiles
    else:
        h64 = head.to(tl.int64)
    rows64 = offs_m[:, None].to(tl.int64)
    K_bh = K[0] + b64 * K[1] + hk64 * K[2]
    V_bh = V[0] + b64 * V[1] + hk64 * V[2]

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d[None, :] < D)
    if tma is not None and not PACK_GROUP:  # (a packed group's rows span heads: not one TMA box)
        q = tl.reshape(tma[0].load([b, head, m0, 0]), [BLOCK_M, BLOCK_D])
    else:
        q = tl.load(Q[0] + b64 * Q[1] + h64 * Q[2] + rows64 * Q[3] + offs_d[None, :], mask=q_mask, other=0.0)
    kv = (K_bh, V_bh, offs_n[:, None] * K[3] + offs_d[None, :], offs_n[:, None] * V[3] + offs_d[None, :], K[3],
          V[3], D, qk_scale, tma, (b, hk))
    ctx = _tile_ctx(mask, b, b64, h64, Lq, Lk)
    if PACK_GROUP:  # the dropout counter of row i of head bh is bh * Lq + i: per-row heads pass it whole
        keep_at = (b64 * 0, bh64 * Lq + offs_m)
    else:
        keep_at = (bh64, offs_m)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    if lists is not None:  # block map: the partial tiles (masked), then the full ones
        tl.static_assert(not PACK_GROUP, "a block map is per query head: no packed group")
        lrow = b64 * lists.s_b + h64 * lists.s_h + m0 // BLOCK_M
        n1 = tl.load(lists.cnt_partial + lrow)
        n2 = tl.load(lists.cnt_full + lrow)
        lo1 = n1 * 0
        hi1 = n1
        lo2 = n2 * 0
        hi2 = n2
        if SPLIT:
            per1 = tl.cdiv(n1, n_split)
            lo1 = tl.minimum(split * per1, n1)
            hi1 = tl.minimum(lo1 + per1, n1)
            per2 = tl.cdiv(n2, n_split)
            lo2 = tl.minimum(split * per2, n2)
            hi2 = tl.minimum(lo2 + per2, n2)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kv, lo1, hi1, lists.idx_partial + lrow * lists.n,
                                   offs_m, offs_n, offs_d, ctx, mask, drop, keep_at,
                                   True, True, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kv, lo2, hi2, lists.idx_full + lrow * lists.n,
                                   offs_m, offs_n, offs_d, ctx, mask, drop, keep_at,
                                   False, True, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS)
    else:
        A, F0, F1, Z = _key_tile_range(m0, ctx, mask, BLOCK_M, BLOCK_N, CAUSAL, ELEMWISE)
        if SPLIT:
            per = tl.cdiv(Z - A, n_split)
            c0 = A + split * per
            c1 = tl.minimum(c0 + per, Z)
            A = tl.maximum(A, c0)
            F0 = tl.minimum(tl.maximum(F0, c0), c1)
            F1 = tl.minimum(tl.maximum(F1, c0), c1)
            Z = tl.minimum(Z, c1)
        # [A, F0) and [F1, Z): masked tiles; [F0, F1): tiles every query of this tile fully sees. Without a
        # window, keys start visible at 0, so [A, F0) is empty: its loop is not compiled. With the analytic parts
        # alone the masked tiles are the few that cross a boundary (causal: the diagonal), so their loops are
        # not software-pipelined: 11 fewer registers at D = 128 causal (sm_90), the full-tile loop keeps them.
        MASKED_STAGES: tl.constexpr = None if ELEMWISE else 1
        if mask.window is not None:
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kv, A, F0, None, offs_m, offs_n, offs_d, ctx, mask, drop,
                                       keep_at, True, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS,
                                       MASKED_STAGES)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kv, F0, F1, None, offs_m, offs_n, offs_d, ctx, mask, drop,
                                   keep_at, False, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS)
        if ONE_DIAGONAL:  # the masked span is the one diagonal tile, (m0 + Lk - Lq) / BLOCK_N = F1 = Z - 1:
            # straight-line, as the tutorial's (no loop: 211 -> 202 registers at D = 128, 128 x 128, sm_90)
            diagonal = (m0 + (Lk - Lq)) // BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kv, diagonal, None, offs_m, offs_n, offs_d, ctx, mask, drop,
                                      keep_at, True, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS, True)
        else:
            acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, kv, F1, Z, None, offs_m, offs_n, offs_d, ctx, mask, drop,
                                       keep_at, True, False, CAUSAL, BLOCK_N, EVEN_D, PREC, UPCAST, SCALE_POS,
                                       MASKED_STAGES)

    # Epilogue. l_i == 0 exactly when the row saw no visible key (the row maximum contributes exp2(0) = 1).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if drop is not None:
        out = out * drop[2]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    split64 = split.to(tl.int64)
    o_ptrs = O[0] + split64 * O[4] + b64 * O[1] + h64 * O[2] + rows64 * O[3] + offs_d[None, :]
    tl.store(o_ptrs, out.to(O[0].dtype.element_ty), mask=q_mask)
    tl.store(LSE[0] + split64 * LSE[1] + bh64 * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_combine_kernel(OP, LP, O, LSE, s_os, s_ls, s_ob, s_oh, s_om, H, Lq, D, n_split,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Merge the key splits: out = sum_s exp(lse_s - lse) o_s, lse = logsumexp_s lse_s."""
    _pid_m, b, h, offs_m, row_ok = _row_program(tl.program_id(0), Lq, H, BLOCK_M, False)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    bh64 = b64 * H + h64
    offs_d = tl.arange(0, BLOCK_D)
    mask = _tile_mask(row_ok, offs_d, D, EVEN_D)
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lp = LP + bh64 * Lq + offs_m  # pointers advance by the split strides (64-bit pointer arithmetic)
    for s in range(0, n_split):
        ls = tl.load(lp, mask=row_ok, other=float("-inf"))
        lse_max = tl.maximum(lse_max, ls)
        lp += s_ls
    m_use = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    lp = LP + bh64 * Lq + offs_m
    op = OP + (bh64 * Lq + offs_m[:, None]) * D + offs_d[None, :]
    for s in range(0, n_split):
        ls = tl.load(lp, mask=row_ok, other=float("-inf"))
        w = tl.exp(ls - m_use)
        o = tl.load(op, mask=mask, other=0.0)
        acc += w[:, None] * o
        wsum += w
        lp += s_ls
        op += s_os
    empty = wsum == 0.0
    out = acc / tl.where(empty, 1.0, wsum)[:, None]
    lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, wsum)))
    tl.store(O + b64 * s_ob + h64 * s_oh + offs_m[:, None].to(tl.int64) * s_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=mask)
    tl.store(LSE + bh64 * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _dropout_mask_kernel(OUT, seed, drop_thr, Lq, Lk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(Lk, BLOCK_N)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_n = pid % num_n
    pid_m = (pid // num_n) % num_m
    bh64 = (pid // (num_n * num_m)).to(tl.int64)
    keep = dropout_keep(seed, bh64, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N, Lq, Lk, drop_thr,
                        BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(OUT + (bh64 * Lq + rows) * Lk + cols, keep.to(tl.int8), mask=(rows < Lq) & (cols < Lk))

