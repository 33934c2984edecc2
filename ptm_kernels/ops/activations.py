"""gelu, bias_gelu (the preceding Linear's bias fused in), and the gated swiglu / geglu.

Two torch.library ops cover them: `ptm::activation(x, bias?, act)` and `ptm::gated_activation(gate, up, act)`,
with act one of "gelu" (erf), "gelu_tanh", "silu".
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backend
from .. import _checks
from ..dtypes import compute_dtype
from . import _fast_path

_APPROXIMATE_TO_ACT = {"none": "gelu", "tanh": "gelu_tanh"}


@_fast_path.custom_op("ptm::activation")
def _activation(x: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    return backend.kernels("activation", x).act_fwd(x, bias, act)


@_activation.register_fake
def _(x, bias, act):
    return torch.empty_like(x)


@_fast_path.custom_op("ptm::activation_backward")
def _activation_backward(dy: Tensor, x: Tensor, bias: Optional[Tensor], act: str) -> Tuple[Tensor, Tensor]:
    return tuple(backend.kernels("activation", x).act_bwd(dy, x, bias, act))


@_activation_backward.register_fake
def _(dy, x, bias, act):
    if bias is None:  # an absent gradient is an empty tensor of x's dtype (reference_kernels.empty_stats)
        return torch.empty_like(x), x.new_empty(0)
    return torch.empty_like(x), x.new_empty(bias.shape[0], dtype=compute_dtype(x))


def _activation_setup(ctx, inputs, output):
    x, bias, act = inputs
    ctx.act = act
    ctx.save_for_backward(x, bias)


def _activation_grad(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = _fast_path.call(_activation_backward, dy.contiguous(), x, bias, ctx.act)
    return dx, (db.to(bias.dtype) if bias is not None else None), None


_activation.register_autograd(_activation_grad, setup_context=_activation_setup)


@_fast_path.custom_op("ptm::gated_activation")
def _gated_activation(gate: Tensor, up: Tensor, act: str) -> Tensor:
    return backend.kernels("activation", gate).glu_fwd(gate, up, act)


@_gated_activation.register_fake
def _(gate, up, act):
    return torch.empty_like(gate)


@_fast_path.custom_op("ptm::gated_activation_backward")
def _gated_activation_backward(dy: Tensor, gate: Tensor, up: Tensor, act: str) -> Tuple[Tensor, Tensor]:
    return tuple(backend.kernels("activation", gate).glu_bwd(dy, gate, up, act))


@_gated_activation_backward.register_fake
def _(dy, gate, up, act):
    return torch.empty_like(gate), torch.empty_like(up)


def _gated_setup(ctx, inputs, output):
    gate, up, act = inputs
    ctx.act = act
    ctx.save_for_backward(gate, up)


def _gated_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = _fast_path.call(_gated_activation_backward, dy.contiguous(), gate, up, ctx.act)
    return dgate, dup, None


_gated_activation.register_autograd(_gated_grad, setup_context=_gated_setup)


def _act_name(approximate: str) -> str:
    if approximate not in _APPROXIMATE_TO_ACT:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _APPROXIMATE_TO_ACT[approximate]


def _elementwise(x: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    if x.dim() == 0:
        return _elementwise(x.reshape(1), bias, act).reshape(())
    return _fast_path.call(_activation, _checks.rows(x), bias, act).view_as(x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU (`approximate="tanh"` for GPT-2's tanh form), computed in float32 and rounded once."""
    _checks.tensor("x", x)
    return _elementwise(x, None, _act_name(approximate))


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias) in one pass: the output of a Linear without its bias, plus the bias, through GELU."""
    _checks.tensor("x", x, min_dim=1)
    _checks.tensor("bias", bias)
    _checks.shape("bias", bias, (x.shape[-1],))
    _checks.same_device("x", x, bias=bias)
    return _elementwise(x, _checks.param_dtype(x, bias), _act_name(approximate))


def silu(x: Tensor) -> Tensor:
    _checks.tensor("x", x)
    return _elementwise(x, None, "silu")


def _gated(gate: Tensor, up: Tensor, act: str) -> Tensor:
    _checks.tensor("gate", gate, min_dim=1)
    _checks.tensor("up", up)
    _checks.shape("up", up, gate.shape)
    _checks.same_dtype("gate", gate, up=up)
    _checks.same_device("gate", gate, up=up)
    return _fast_path.call(_gated_activation, _checks.rows(gate), _checks.rows(up), act).view_as(gate)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: LLaMA's MLP activation (gate and up are the two projections of the input)."""
    return _gated(gate, up, "silu")


def geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    """gelu(gate) * up: T5 v1.1's gated-GELU FFN (which uses the tanh approximation)."""
    return _gated(gate, up, _act_name(approximate))
