"""Every nn.Linear of a patched model through `ptm_kernels.linear` (`apply(model, linear=True)`, the default).

ops.linear is F.linear except for the few rows of a CPU decode step (float32, at most 64 rows), which it runs
faster (csrc/cpu/linear.cpp): a transformers model's `generate` on a CPU gets the GEMV without any conversion.
Only modules whose class is exactly nn.Linear are patched: subclasses (quantized or adapter layers) have their
own forward, which is theirs to keep.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .patching import Patcher


def linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return ops.linear(x, self.weight, self.bias)


def patch_linears(model: nn.Module, patcher: Patcher) -> None:
    for module in model.modules():
        if type(module) is nn.Linear:
            patcher.set_method(module, "forward", linear_forward)
