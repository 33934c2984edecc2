"""rms_norm and layer_norm, each with an optional fused residual add.

Public function -> argument checks -> a torch.library op (`ptm::rms_norm`, `ptm::layer_norm`) whose
implementation calls the backend chosen by `ptm_kernels.backend`, with a fake implementation for
torch.compile and an autograd formula that calls a backward op (`ptm::rms_norm_backward`, ...).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend
from .. import _checks
from ..dtypes import compute_dtype as _stat_dtype
from . import _fast_path

# ------------------------------------------------------------------------------------------- RMSNorm


@_fast_path.custom_op("ptm::rms_norm")
def _rms_norm(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
              round_normed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(backend.kernels("rms_norm", x).rms_norm_fwd(x, weight, residual, eps, round_normed))


@_rms_norm.register_fake
def _(x, weight, residual, eps, round_normed):
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape, dtype=out_dtype), h, x.new_empty(x.shape[0], dtype=_stat_dtype(x))


@_fast_path.custom_op("ptm::rms_norm_backward")
def _rms_norm_backward(dy: Tensor, h: Tensor, weight: Optional[Tensor], rstd: Tensor,
                       dh_out: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return tuple(backend.kernels("rms_norm", h).rms_norm_bwd(dy, h, weight, rstd, dh_out))


@_rms_norm_backward.register_fake
def _(dy, h, weight, rstd, dh_out):
    return h.new_empty(h.shape), _param_grad(h, weight is not None)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, residual, _, _ = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd)


def _rms_norm_grad(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dw = _fast_path.call(_rms_norm_backward, dy.contiguous(), h, weight, rstd,
                             dh_out.contiguous() if ctx.has_residual and dh_out is not None else None)
    dweight = dw.to(weight.dtype) if weight is not None else None
    return dh, dweight, (dh if ctx.has_residual else None), None, None


_rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *, residual: Optional[Tensor] = None,
             cast: str = "llama"):
    """RMSNorm over the last dimension of x.

    With `residual`, normalizes `x + residual` and returns `(normalized, x + residual)`: the pre-norm
    block's "add, then norm" in one pass. `cast` picks the rounding convention for half-precision inputs:
    "llama" (normalize in float32, cast to x's dtype, multiply by weight) or "t5" (cast to the weight's
    dtype when it is half precision). With weight and x in the same dtype both give the same result.
    """
    _checks.tensor("x", x, min_dim=1)
    C = x.shape[-1]
    if weight is not None:
        _checks.tensor("weight", weight)
        _checks.shape("weight", weight, (C,))
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, x.shape)
        _checks.same_dtype("x", x, residual=residual)
    _checks.same_device("x", x, weight=weight, residual=residual)
    if cast not in ("llama", "t5"):
        raise ValueError(f"cast must be 'llama' or 't5', got {cast!r}")

    half = (torch.float16, torch.bfloat16)
    # T5 with a half-precision weight of another dtype than x: normalize without weight, round to the
    # weight's dtype, then scale (plain autograd handles the two extra elementwise ops).
    scale_outside = cast == "t5" and weight is not None and weight.dtype in half and weight.dtype != x.dtype
    w = None if scale_outside else _checks.param_dtype(x, weight)
    round_normed = cast == "llama" or (weight is not None and weight.dtype == x.dtype)

    y, h, _ = _fast_path.call(_rms_norm, _checks.rows(x), w, None if residual is None else _checks.rows(residual),
                              float(eps), round_normed)
    y = y.view_as(x)  # view_as: a third of the cost of view(shape) per call
    if scale_outside:
        y = weight * y.to(weight.dtype)
    if residual is not None:
        return y, h.view_as(x)
    return y


# ----------------------------------------------------------------------------------------- LayerNorm


@_fast_path.custom_op("ptm::layer_norm")
def _layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(backend.kernels("layer_norm", x).layer_norm_fwd(x, weight, bias, residual, eps))


@_layer_norm.register_fake
def _(x, weight, bias, residual, eps):
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stat = x.new_empty(x.shape[0], dtype=_stat_dtype(x))
    return x.new_empty(x.shape), h, stat, stat.new_empty(stat.shape)


@_fast_path.custom_op("ptm::layer_norm_backward")
def _layer_norm_backward(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                         dh_out: Optional[Tensor], has_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(backend.kernels("layer_norm", h).layer_norm_bwd(dy, h, weight, mean, rstd, dh_out, has_bias))


@_layer_norm_backward.register_fake
def _(dy, h, weight, mean, rstd, dh_out, has_bias):
    return h.new_empty(h.shape), _param_grad(h, weight is not None), _param_grad(h, has_bias)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, residual, _ = inputs
    _, h, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(h if ctx.has_residual else x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, dh_out, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    has_bias = ctx.bias_dtype is not None
    dh, dw, db = _fast_path.call(_layer_norm_backward, dy.contiguous(), h, weight, mean, rstd,
                                 dh_out.contiguous() if ctx.has_residual and dh_out is not None else None, has_bias)
    dweight = dw.to(weight.dtype) if weight is not None else None
    dbias = db.to(ctx.bias_dtype) if has_bias else None
    return dh, dweight, dbias, (dh if ctx.has_residual else None), None


_layer_norm.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None):
    """LayerNorm over the last dimension of x (computed in float32, rounded once, like torch's).

    With `residual`, normalizes `x + residual` and returns `(normalized, x + residual)`. Post-norm blocks
    (BERT) use the first result; pre-norm blocks (GPT-2) keep the second as the residual stream.
    """
    _checks.tensor("x", x, min_dim=1)
    C = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _checks.tensor(name, p)
            _checks.shape(name, p, (C,))
    if residual is not None:
        _checks.tensor("residual", residual)
        _checks.shape("residual", residual, x.shape)
        _checks.same_dtype("x", x, residual=residual)
    _checks.same_device("x", x, weight=weight, bias=bias, residual=residual)

    y, h, _, _ = _fast_path.call(_layer_norm, _checks.rows(x), _checks.param_dtype(x, weight),
                                 _checks.param_dtype(x, bias), None if residual is None else _checks.rows(residual),
                                 float(eps))
    y = y.view_as(x)
    if residual is not None:
        return y, h.view_as(x)
    return y


def _param_grad(h: Tensor, present: bool) -> Tensor:
    """Fake of a parameter gradient: float32 [C], or (absent parameter) an empty tensor of h's dtype."""
    return h.new_empty(h.shape[-1], dtype=_stat_dtype(h)) if present else h.new_empty(0)
