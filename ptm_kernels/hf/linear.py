"""Every nn.Linear of a patched model through `ptm_kernels.linear` (`apply(model, linear=True)`, the default).

ops.linear is F.linear except for the few rows of a CPU decode step (float32, at most 64 rows), which it runs
faster (csrc/cpu/linear.cpp): a transformers model's `generate` on a CPU gets the GEMV without any conversion.
Only modules whose class is exactly nn.Linear are patched: subclasses (quantized or adapter layers) have their
own forward, which is theirs to keep.
"""

from __future__ import annotations

from torch import nn

from ..nn import Linear
from .patching import Patcher


def patch_linears(model: nn.Module, patcher: Patcher) -> None:
    for module in model.modules():
        if type(module) is nn.Linear:
            patcher.set_method(module, "forward", Linear.forward)  # ptm_kernels.nn.Linear's: ops.linear
