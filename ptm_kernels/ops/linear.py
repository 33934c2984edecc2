"""linear: torch's `F.linear` (y = x W^T + b), faster for the few rows of a CPU decode step: `ptm::linear`.

A decode step multiplies one row per sequence by every weight matrix, and on a CPU the BLAS handles those
shapes badly (csrc/cpu/linear.cpp says how, with figures): one row runs as the C++ backend's own GEMV, up to
64 rows with the weight as the GEMM's left operand. Every other call is `F.linear` itself, not an op: on a GPU
(cuBLAS, and torch.compile fuses what follows it), for more rows (prefill, training), other dtypes than
float32, and under torch.func transforms (vmap, grad). Results are torch's up to float32 rounding (another
summation order).

The backward is plain PyTorch: dx = dy W, dW = dy^T x, db = sum of dy's rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backend
from . import _fast_path

# Rows up to which the op runs instead of F.linear (the C++ backend's few-row forms; kFewRows in linear.cpp).
FEW_ROWS = 64


@_fast_path.custom_op("ptm::linear")
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return backend.kernels("linear", x, weight).linear_fwd(x, weight, bias)


@_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _linear_grad(ctx, dy):
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def _like(t, x: Tensor, shape) -> bool:
    # plain tensors only: a subclass (DTensor, a quantized or wrapped weight) has its own linear
    return type(t) in _fast_path.TENSORS and t.shape == shape and t.dtype == x.dtype and t.device == x.device


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x [..., K], weight [N, K], bias [N] or None -> [..., N].

    On CPU float32 with at most 64 rows (x's leading dimensions flattened) it runs `ptm::linear`; otherwise it
    is F.linear (see the module docstring)."""
    if type(x) not in _fast_path.TENSORS or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() == 0:
        return F.linear(x, weight, bias)
    if not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None:
        return F.linear(x, weight, bias)  # vmap / torch.func.grad: torch's linear has their rules
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    N = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    if not (0 < rows <= FEW_ROWS and N > 0 and _like(weight, x, (N, x.shape[-1]))
            and (bias is None or _like(bias, x, (N,)))):
        return F.linear(x, weight, bias)  # torch's own result, or torch's own error
    y = _fast_path.call(_linear, x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], N)
