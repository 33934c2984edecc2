"""Helpers shared by the op tests: which shapes each backend is tested on, and running one case."""

import torch

from ptm_kernels import backend

from ..conftest import DEVICE

# Hidden sizes the issue names: not powers of two, and large.
ROW_SHAPES = [(3, 1), (5, 768), (4, 1000), (2, 4096), (1, 16384)]
ROW_SHAPES_LARGE = [(64, 768), (16, 8192)]
DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if DEVICE.type == "cuda" else [])


def row_shapes(impl: str):
    """The Triton interpreter is slow: it gets the small shapes only."""
    if impl == "triton" and backend.triton_interpreted():
        return ROW_SHAPES
    return ROW_SHAPES + ROW_SHAPES_LARGE


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def run(fn, inputs, grads_out):
    """fn(*inputs) -> tensor or tuple; returns (outputs, input gradients) for random output gradients."""
    inputs = [None if t is None else leaf(t) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, grads_out))
    needs = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, needs, allow_unused=True)
    it = iter(grads)
    return outs, [None if t is None else next(it) for t in inputs]


def to64(ts):
    return [None if t is None else t.double() for t in ts]
