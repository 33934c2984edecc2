"""Every nn.Linear (and transformers' Conv1D) of a patched model through `ptm_kernels.linear`
(`apply(model, linear=True)`, the default).

ops.linear is F.linear except for the few rows of a CPU decode step (float32, at most 64 rows), which it runs
faster (csrc/cpu/linear.cpp): a transformers model's `generate` on a CPU gets the GEMV without any conversion.
GPT-2's Conv1D computes x W + b with its weight stored [in, out]: it goes through
ops.linear as W^T, a view (no copy), which the GEMV reads down its columns. Only modules whose class is exactly
nn.Linear or Conv1D are patched: subclasses (quantized or adapter layers) have their own forward, which is
theirs to keep.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import Linear
from ..ops.linear import linear
from .patching import Patcher


def conv1d_forward(self, x: Tensor) -> Tensor:
    """transformers' Conv1D, `addmm(bias, x, weight)` with weight [in, out], as ops.linear(x, weight^T, bias):
    beyond ops.linear's few CPU rows it is F.linear, the same addmm."""
    return linear(x, self.weight.t(), self.bias)


def patch_linears(model: nn.Module, patcher: Patcher) -> None:
    from transformers.pytorch_utils import Conv1D

    for module in model.modules():
        if type(module) is nn.Linear:
            patcher.set_method(module, "forward", Linear.forward)  # ptm_kernels.nn.Linear's: ops.linear
        elif type(module) is Conv1D:
            patcher.set_method(module, "forward", conv1d_forward)
