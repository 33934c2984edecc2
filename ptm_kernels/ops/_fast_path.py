"""A fast path past torch.library's dispatcher for the ops (norms, RoPE, activations, losses; the attention ops
through OpArgs.call in ops/_op_args.py).

A Python `torch.library.custom_op` call costs about 15 µs before the kernel starts (autograd wrapper, a
dynamo-disabled frame, the redispatch): more than the kernel itself on one decode row (RMSNorm of one row:
2.5 µs of kernel). When the dispatcher has nothing to do, `call(op, ...)` runs the op's own Python function
directly: the *same* function the op runs, so results are bitwise identical (tests/ops/test_fast_path.py).

The dispatcher has nothing to do when
- no input tensor requires grad while grad mode is on (no autograd node to record);
- nothing traces: not inside torch.compile / export or torch.jit.trace, no dispatch mode (FakeTensorMode,
  FlopCounterMode, ...), no torch-function mode, no functorch transform (vmap, grad);
- every tensor is a plain torch.Tensor / nn.Parameter (no subclass: FakeTensor, DTensor, ...), and every other
  argument a plain Python value (not an fx Proxy).
Otherwise the op is called as usual.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

# The argument types that may skip the dispatcher: exactly these (a subclass, e.g. FakeTensor, DTensor, an fx
# Proxy, or an int subclass, takes the dispatcher). TENSORS: the plain tensor types, which ops/linear.py's
# few-row forms also require.
TENSORS = frozenset((Tensor, nn.Parameter))
_PLAIN_TYPES = TENSORS | {bool, int, float, str, type(None)}


def custom_op(name: str) -> Callable:
    """`torch.library.custom_op(name, mutates_args=())`, keeping the function as `op.kernel` for `call`."""

    def register(fn: Callable):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.kernel = fn
        return op

    return register


def skips_dispatch(args) -> bool:
    """Whether `args` (an op's arguments) may go straight to the op's function (see the module docstring)."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None or \
            torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() or \
            torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    # One pass over the types in C: a Python loop over attention's 21 arguments cost about 2 µs.
    if not _PLAIN_TYPES.issuperset(map(type, args)):
        return False
    if torch.is_grad_enabled():
        for a in args:
            if type(a) in TENSORS and a.requires_grad:
                return False
    return True


def call(op, *args):
    """`op(*args)` through torch.library, or `op.kernel(*args)` when the dispatcher has nothing to do."""
    return op.kernel(*args) if skips_dispatch(args) else op(*args)
