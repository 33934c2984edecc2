"""RMSNorm and LayerNorm over the rows of a contiguous [N, C] tensor, with an optional fused residual add.

Forward: one program per row. Rows of up to MAX_FUSED_BLOCK elements are held in registers (ONE_PASS);
longer rows are read again for each pass over them, in chunks of BLOCK elements.

Backward: each program takes a contiguous chunk of rows, writes dh for them, and sums dweight/dbias over
its rows into a float32 row of a [programs, C] buffer, which torch then sums (Liger-Kernel's approach;
no atomics, so the result is deterministic). Several rows are in flight per SM: a few programs per SM
(about 32 resident warps, see _bwd_programs), and the one-pass row loop is software-pipelined
(tl.range(..., num_stages=ROW_STAGES)) so that the next row's dy / h loads are issued asynchronously
(cp.async on sm_80+) while the current row is reduced.

The interface (arguments, results, dtypes, rounding) is `ptm_kernels.reference_kernels`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import cast_to, check_dtype, num_programs, row_block, split_rows

# Backward: resident warps per SM to aim for with several programs per SM (each program reduces whole rows
# in turn, so more programs = more rows in flight); and the pipeline depth of the one-pass row loop.
_BWD_WARPS_PER_SM = 32
ROW_STAGES = tl.constexpr(2)


# ------------------------------------------------------------------------------------------- helpers
@triton.jit
def _load_h(X, R, H, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):
    """h = x (+ residual) in float32; the sum is rounded to h's dtype first, as eager `x + residual` is."""
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h_rounded = cast_to(h + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
        if STORE_H:
            tl.store(H + offs, h_rounded, mask=mask)
        h = h_rounded.to(tl.float32)
    return h


@triton.jit
def _rms_norm_out(Y, W, X, h, rstd, offs, cols, mask, HAS_WEIGHT: tl.constexpr, ROUND_NORMED: tl.constexpr):
    n = h * rstd
    if ROUND_NORMED:
        # LLaMA: the normalized row is cast back to x's dtype before the weight multiply.
        n = cast_to(n, X.dtype.element_ty).to(tl.float32)
    if HAS_WEIGHT:
        n = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast_to(n, Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_out(Y, W, B, h, mean, rstd, offs, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = (h - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast_to(y, Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------- RMSNorm fwd
@triton.jit
def _rms_norm_fwd_kernel(
    Y, H, RSTD, X, R, W, C, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUND_NORMED: tl.constexpr,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * C may pass 2**31
    base = row * C
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < C
        h = _load_h(X, R, H, base + cols, mask, HAS_RESIDUAL, True)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / C + eps)
        _rms_norm_out(Y, W, X, h, rstd, base + cols, cols, mask, HAS_WEIGHT, ROUND_NORMED)
    else:
        # Pass 1: sum of squares. Pass 2: normalize (and store h, computed again rather than read back).
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X, R, H, base + start + cols, mask, HAS_RESIDUAL, False)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / C + eps)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X, R, H, base + start + cols, mask, HAS_RESIDUAL, True)
            _rms_norm_out(Y, W, X, h, rstd, base + start + cols, start + cols, mask, HAS_WEIGHT, ROUND_NORMED)
    tl.store(RSTD + row, rstd)


# --------------------------------------------------------------------------------------- RMSNorm bwd
@triton.jit
def _rms_norm_bwd_kernel(
    DH, DW_PARTIAL, DY, H, W, RSTD, DH_OUT, N, C, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_DH_OUT: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # With n = h * rstd and g = dy * w:  dh = rstd * (g - n * mean(g * n)) (+ dh_out);  dw = sum_rows dy * n.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.arange(0, BLOCK)
    dw_row = DW_PARTIAL + pid.to(tl.int64) * C  # this program's row of partial sums
    if ONE_PASS:
        mask = cols < C
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = row_start.to(tl.int64) * C  # int64, advanced by C per row: row * C may pass 2**31
        for row in tl.range(row_start, row_end, num_stages=ROW_STAGES):
            offs = base + cols
            base += C
            rstd = tl.load(RSTD + row)
            # Masked lanes load dy = 0, so they add nothing to the sums below.
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            n = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) * rstd
            g = dy
            if HAS_WEIGHT:
                dw_acc += dy * n
                g = dy * w
            dh = rstd * (g - n * (tl.sum(g * n, axis=0) / C))
            if HAS_DH_OUT:
                dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + offs, cast_to(dh, DH.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        # The row does not fit in registers: one pass over it for mean(g * n), a second for dh. dw is
        # accumulated in this program's own row of DW_PARTIAL (each element is read and written back by
        # the same thread, with the same offsets, so no synchronization is needed).
        if HAS_WEIGHT:
            for start in range(0, C, BLOCK):
                tl.store(dw_row + start + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=start + cols < C)
        next_base = row_start.to(tl.int64) * C
        for row in range(row_start, row_end):
            base = next_base
            next_base += C
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                dy = tl.load(DY + base + start + cols, mask=mask, other=0.0).to(tl.float32)
                n = tl.load(H + base + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += g * n
            c1 = tl.sum(acc, axis=0) / C
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                offs = base + start + cols
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                n = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                    dw = tl.load(dw_row + start + cols, mask=mask, other=0.0)
                    tl.store(dw_row + start + cols, dw + dy * n, mask=mask)
                dh = rstd * (g - n * c1)
                if HAS_DH_OUT:
                    dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DH + offs, cast_to(dh, DH.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------- LayerNorm fwd
@triton.jit
def _layer_norm_fwd_kernel(
    Y, H, MEAN, RSTD, X, R, W, B, C, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < C
        h = _load_h(X, R, H, base + cols, mask, HAS_RESIDUAL, True)
        mean = tl.sum(h, axis=0) / C
        d = tl.where(mask, h - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / C + eps)
        _layer_norm_out(Y, W, B, h, mean, rstd, base + cols, cols, mask, HAS_WEIGHT, HAS_BIAS)
    else:
        # Three passes: the mean, then the variance around it (no E[h^2] - mean^2 cancellation), then y.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            acc += _load_h(X, R, H, base + start + cols, mask, HAS_RESIDUAL, False)
        mean = tl.sum(acc, axis=0) / C
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X, R, H, base + start + cols, mask, HAS_RESIDUAL, False)
            d = tl.where(mask, h - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / C + eps)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            h = _load_h(X, R, H, base + start + cols, mask, HAS_RESIDUAL, True)
            _layer_norm_out(Y, W, B, h, mean, rstd, base + start + cols, start + cols, mask, HAS_WEIGHT, HAS_BIAS)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


# ------------------------------------------------------------------------------------- LayerNorm bwd
@triton.jit
def _layer_norm_bwd_kernel(
    DH, DW_PARTIAL, DB_PARTIAL, DY, H, W, MEAN, RSTD, DH_OUT, N, C, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH_OUT: tl.constexpr,
    BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # With n = (h - mean) * rstd and g = dy * w:
    #   dh = rstd * (g - mean(g) - n * mean(g * n)) (+ dh_out);  dw = sum_rows dy * n;  db = sum_rows dy.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.arange(0, BLOCK)
    dw_row = DW_PARTIAL + pid.to(tl.int64) * C
    db_row = DB_PARTIAL + pid.to(tl.int64) * C
    if ONE_PASS:
        mask = cols < C
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = row_start.to(tl.int64) * C  # int64, advanced by C per row
        for row in tl.range(row_start, row_end, num_stages=ROW_STAGES):
            offs = base + cols
            base += C
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
            n = tl.where(mask, (h - mean) * rstd, 0.0)
            g = dy
            if HAS_WEIGHT:
                dw_acc += dy * n
                g = dy * w
            if HAS_BIAS:
                db_acc += dy
            c1 = tl.sum(g * n, axis=0) / C
            c2 = tl.sum(g, axis=0) / C
            dh = rstd * (g - c2 - n * c1)
            if HAS_DH_OUT:
                dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + offs, cast_to(dh, DH.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(db_row + cols, db_acc, mask=mask)
    else:
        # As in the RMSNorm backward: two passes per row; dw/db accumulate in this program's partial rows.
        for start in range(0, C, BLOCK):
            zero = tl.zeros([BLOCK], dtype=tl.float32)
            if HAS_WEIGHT:
                tl.store(dw_row + start + cols, zero, mask=start + cols < C)
            if HAS_BIAS:
                tl.store(db_row + start + cols, zero, mask=start + cols < C)
        next_base = row_start.to(tl.int64) * C
        for row in range(row_start, row_end):
            base = next_base
            next_base += C
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc_gn = tl.zeros([BLOCK], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                dy = tl.load(DY + base + start + cols, mask=mask, other=0.0).to(tl.float32)
                h = tl.load(H + base + start + cols, mask=mask, other=0.0).to(tl.float32)
                n = tl.where(mask, (h - mean) * rstd, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc_gn += g * n
                acc_g += g
            c1 = tl.sum(acc_gn, axis=0) / C
            c2 = tl.sum(acc_g, axis=0) / C
            for start in range(0, C, BLOCK):
                mask = start + cols < C
                offs = base + start + cols
                dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
                h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
                n = tl.where(mask, (h - mean) * rstd, 0.0)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                    dw = tl.load(dw_row + start + cols, mask=mask, other=0.0)
                    tl.store(dw_row + start + cols, dw + dy * n, mask=mask)
                if HAS_BIAS:
                    db = tl.load(db_row + start + cols, mask=mask, other=0.0)
                    tl.store(db_row + start + cols, db + dy, mask=mask)
                dh = rstd * (g - c2 - n * c1)
                if HAS_DH_OUT:
                    dh += tl.load(DH_OUT + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(DH + offs, cast_to(dh, DH.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers
def _check(x: Tensor, **params: Optional[Tensor]) -> None:
    check_dtype("x", x)
    for name, t in params.items():
        check_dtype(name, t, None if name in ("residual", "dy", "dh_out") else x.dtype)


def _residual_sum_like(x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """The buffer for h = x + residual (eager's promoted dtype), or the empty placeholder without residual."""
    if residual is None:
        return x.new_empty(0)
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)


def _partials(rows: int, C: int, needed: bool, like: Tensor) -> Tensor:
    return torch.empty((rows, C) if needed else (0,), dtype=torch.float32, device=like.device)


def _sum_partials(partial: Tensor, needed: bool, C: int, like: Tensor) -> Tensor:
    if not needed:
        return like.new_empty(0)
    if partial.shape[0] == 0:  # N == 0: the sum over no rows
        return torch.zeros(C, dtype=torch.float32, device=like.device)
    return partial.sum(0)


def _bwd_programs(N: int, num_warps: int, device: torch.device):
    """-> (programs, rows_per_program) for a backward kernel: enough programs for ~32 warps per SM."""
    per_sm = max(1, _BWD_WARPS_PER_SM // num_warps)
    return split_rows(N, per_sm * num_programs(device)) if N > 0 else (0, 1)


def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                 round_normed: bool):
    """-> (y, h, rstd); see `reference_kernels.rms_norm_fwd`."""
    _check(x, weight=weight, residual=residual)
    x = x.contiguous()
    N, C = x.shape
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((N, C), dtype=out_dtype, device=x.device)
    h = _residual_sum_like(x, residual)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, h, rstd
    BLOCK, ONE_PASS, num_warps = row_block(C)
    _rms_norm_fwd_kernel[(N,)](
        y, h if residual is not None else x, rstd, x,
        residual.contiguous() if residual is not None else x,
        weight.contiguous() if weight is not None else x,
        C, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, ROUND_NORMED=bool(round_normed),
        BLOCK=BLOCK, ONE_PASS=ONE_PASS, num_warps=num_warps,
    )
    return y, h, rstd


def rms_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], rstd: Tensor, dh_out: Optional[Tensor]):
    """-> (dh, dweight); see `reference_kernels.rms_norm_bwd`."""
    _check(h, weight=weight, dy=dy, dh_out=dh_out)
    h, dy = h.contiguous(), dy.contiguous()
    N, C = h.shape
    dh = torch.empty_like(h)
    has_weight = weight is not None
    BLOCK, ONE_PASS, num_warps = row_block(C, backward=True)
    programs, rows_per_program = _bwd_programs(N, num_warps, h.device)
    dw_partial = _partials(programs, C, has_weight, h)
    if N > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dh, dw_partial if has_weight else h, dy, h,
            weight.contiguous() if has_weight else h,
            rstd.contiguous(),
            dh_out.contiguous() if dh_out is not None else h,
            N, C, rows_per_program,
            HAS_WEIGHT=has_weight, HAS_DH_OUT=dh_out is not None,
            BLOCK=BLOCK, ONE_PASS=ONE_PASS, num_warps=num_warps,
        )
    return dh, _sum_partials(dw_partial, has_weight, C, h)


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float):
    """-> (y, h, mean, rstd); see `reference_kernels.layer_norm_fwd`."""
    _check(x, weight=weight, bias=bias, residual=residual)
    x = x.contiguous()
    N, C = x.shape
    y = torch.empty_like(x)
    h = _residual_sum_like(x, residual)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    if N == 0:
        return y, h, mean, rstd
    BLOCK, ONE_PASS, num_warps = row_block(C)
    _layer_norm_fwd_kernel[(N,)](
        y, h if residual is not None else x, mean, rstd, x,
        residual.contiguous() if residual is not None else x,
        weight.contiguous() if weight is not None else x,
        bias.contiguous() if bias is not None else x,
        C, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=BLOCK, ONE_PASS=ONE_PASS, num_warps=num_warps,
    )
    return y, h, mean, rstd


def layer_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   dh_out: Optional[Tensor], has_bias: bool):
    """-> (dh, dweight, dbias); see `reference_kernels.layer_norm_bwd`."""
    _check(h, weight=weight, dy=dy, dh_out=dh_out)
    h, dy = h.contiguous(), dy.contiguous()
    N, C = h.shape
    dh = torch.empty_like(h)
    has_weight, has_bias = weight is not None, bool(has_bias)
    BLOCK, ONE_PASS, num_warps = row_block(C, backward=True)
    programs, rows_per_program = _bwd_programs(N, num_warps, h.device)
    dw_partial = _partials(programs, C, has_weight, h)
    db_partial = _partials(programs, C, has_bias, h)
    if N > 0:
        _layer_norm_bwd_kernel[(programs,)](
            dh, dw_partial if has_weight else h, db_partial if has_bias else h, dy, h,
            weight.contiguous() if has_weight else h,
            mean.contiguous(), rstd.contiguous(),
            dh_out.contiguous() if dh_out is not None else h,
            N, C, rows_per_program,
            HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_DH_OUT=dh_out is not None,
            BLOCK=BLOCK, ONE_PASS=ONE_PASS, num_warps=num_warps,
        )
    return dh, _sum_partials(dw_partial, has_weight, C, h), _sum_partials(db_partial, has_bias, C, h)
