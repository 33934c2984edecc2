"""Activations (GELU, tanh-approximated GELU, SiLU) with an optional fused bias, and gated units act(gate) * up.

The element-wise kernels work on [BLOCK_N, BLOCK_C] tiles of the contiguous [N, C] input, so the bias is
loaded once per tile. act_bwd with a bias also sums dx over the rows: each program walks a contiguous chunk
of rows and writes float32 partial sums [programs, C], which torch then sums (no atomics).

The interface (arguments, results, dtypes, rounding) is `ptm_kernels.reference_kernels`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import ELEMENTWISE_TILE, cast_to, check_dtype, num_programs, num_warps_for, tile_2d

_ACTS = ("gelu", "gelu_tanh", "silu")

# Globals read by @triton.jit functions must be constexpr.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_GELU_TANH_C = tl.constexpr(0.044715)


# -------------------------------------------------------------------------------------- the math
# tanh is not in tl.math (only in the per-backend libdevice), so gelu_tanh is written with a sigmoid:
# 0.5 * (1 + tanh(u)) == sigmoid(2u), which also avoids the cancellation in 1 + tanh(u) for u << 0.
@triton.jit
def _sigmoid_pair(x):
    """-> (sigmoid(x), 1 - sigmoid(x)), the smaller one computed directly rather than as 1 - the larger
    (no cancellation in the gradients), and exp only of non-positive numbers (no overflow)."""
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = x >= 0
    return tl.where(pos, big, small), tl.where(pos, small, big)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """act(z) for float32 z."""
    if ACT == "gelu":
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    elif ACT == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
        s, _ = _sigmoid_pair(2.0 * u)
        y = z * s
    else:  # silu
        s, _ = _sigmoid_pair(z)
        y = z * s
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act(z) / dz for float32 z."""
    if ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        d = cdf + z * pdf
    elif ACT == "gelu_tanh":
        # With s = sigmoid(2u) = (1 + tanh u) / 2:  1 - tanh(u)^2 = 4 s (1 - s).
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z)
        s, one_minus_s = _sigmoid_pair(2.0 * u)
        d = s + 2.0 * z * s * one_minus_s * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    else:  # silu
        s, one_minus_s = _sigmoid_pair(z)
        d = s * (1.0 + z * one_minus_s)
    return d


@triton.jit
def _tile(N, C, row0, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (int64) and mask of the [BLOCK_N, BLOCK_C] tile at rows row0.., columns of program_id(1)."""
    rows = row0 + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    mask = (rows < N)[:, None] & (cols < C)[None, :]
    return offs, mask, cols


# ----------------------------------------------------------------------------------------- kernels
@triton.jit
def _act_fwd_kernel(Y, X, BIAS, N, C, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    offs, mask, cols = _tile(N, C, tl.program_id(0) * BLOCK_N, BLOCK_N, BLOCK_C)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # x + bias is not rounded before the activation
        z += tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, cast_to(_act(z, ACT), Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(DX, DB_PARTIAL, DY, X, BIAS, N, C, rows_per_program,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (i, j) takes rows [i * rows_per_program, ...) of column block j, BLOCK_N rows at a time.
    row_start = tl.program_id(0) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    db_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for row0 in range(row_start, row_end, BLOCK_N):
        offs, mask, _ = _tile(row_end, C, row0, BLOCK_N, BLOCK_C)
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * _act_grad(z, ACT)  # 0 on masked lanes, where dy = 0
        tl.store(DX + offs, cast_to(dz, DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db_acc += dz
    if HAS_BIAS:
        tl.store(DB_PARTIAL + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(db_acc, axis=0), mask=cols < C)


@triton.jit
def _glu_fwd_kernel(Y, GATE, UP, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast_to(_act(g, ACT) * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DGATE, DUP, DY, GATE, UP, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    # u * (dy * act'): act' is at most ~1.13, so a huge up overflows only if the true result does
    tl.store(DGATE + offs, cast_to(u * (dy * _act_grad(g, ACT)), DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, cast_to(dy * _act(g, ACT), DUP.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------- launchers
def _check_act(act: str) -> None:
    if act not in _ACTS:
        raise ValueError(f"unknown activation {act!r}; expected one of {_ACTS}")


def act_fwd(x: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    """y = act(x + bias) in x's dtype; see `reference_kernels.act_fwd`."""
    _check_act(act)
    check_dtype("x", x)
    check_dtype("bias", bias, x.dtype)
    x = x.contiguous()
    N, C = x.shape
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    BLOCK_N, BLOCK_C = tile_2d(C)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_C))
    _act_fwd_kernel[grid](
        y, x, bias.contiguous() if bias is not None else x, N, C,
        HAS_BIAS=bias is not None, ACT=act, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
        num_warps=num_warps_for(BLOCK_N * BLOCK_C),
    )
    return y


def act_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], act: str):
    """-> (dx, dbias); see `reference_kernels.act_bwd`."""
    _check_act(act)
    check_dtype("x", x)
    check_dtype("dy", dy)
    check_dtype("bias", bias, x.dtype)
    x, dy = x.contiguous(), dy.contiguous()
    N, C = x.shape
    dx = torch.empty_like(x)
    has_bias = bias is not None
    if N == 0:
        return dx, (torch.zeros(C, dtype=torch.float32, device=x.device) if has_bias else x.new_empty(0))
    BLOCK_N, BLOCK_C = tile_2d(C)
    row_tiles, col_blocks = triton.cdiv(N, BLOCK_N), triton.cdiv(C, BLOCK_C)
    if has_bias:
        # Enough programs to fill the GPU (about 4 per SM); each then loops over several row tiles.
        row_programs = max(1, min(row_tiles, 4 * num_programs(x.device) // col_blocks))
        rows_per_program = triton.cdiv(row_tiles, row_programs) * BLOCK_N
        row_programs = triton.cdiv(N, rows_per_program)
    else:
        row_programs, rows_per_program = row_tiles, BLOCK_N  # one tile per program
    db_partial = torch.empty((row_programs, C) if has_bias else (0,), dtype=torch.float32, device=x.device)
    _act_bwd_kernel[(row_programs, col_blocks)](
        dx, db_partial if has_bias else x, dy, x, bias.contiguous() if has_bias else x,
        N, C, rows_per_program,
        HAS_BIAS=has_bias, ACT=act, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
        num_warps=num_warps_for(BLOCK_N * BLOCK_C),
    )
    return dx, (db_partial.sum(0) if has_bias else x.new_empty(0))


def glu_fwd(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """y = act(gate) * up in gate's dtype; see `reference_kernels.glu_fwd`."""
    _check_act(act)
    check_dtype("gate", gate)
    check_dtype("up", up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    numel = gate.numel()
    if numel == 0:
        return y
    _glu_fwd_kernel[(triton.cdiv(numel, ELEMENTWISE_TILE),)](
        y, gate, up, numel, ACT=act, BLOCK=ELEMENTWISE_TILE, num_warps=num_warps_for(ELEMENTWISE_TILE),
    )
    return y


def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, act: str):
    """-> (dgate, dup); see `reference_kernels.glu_bwd`."""
    _check_act(act)
    check_dtype("gate", gate)
    check_dtype("up", up)
    check_dtype("dy", dy)
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    numel = gate.numel()
    if numel == 0:
        return dgate, dup
    _glu_bwd_kernel[(triton.cdiv(numel, ELEMENTWISE_TILE),)](
        dgate, dup, dy, gate, up, numel, ACT=act, BLOCK=ELEMENTWISE_TILE,
        num_warps=num_warps_for(ELEMENTWISE_TILE),
    )
    return dgate, dup
