"""The one table of activations, by transformers' names (its ACT2FN keys), that ptm_kernels.nn.MLP and every
model in ptm_kernels.models read (models.activations re-exports it).

Each name says what transformers computes for it; here the GELU family runs through the fused ptm_kernels ops
(bias_gelu, geglu; swiglu for SiLU), the others through plain torch. A name transformers knows but this table
lacks is refused by `check`, which names the config field that asked for it: never a silent substitute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from . import ops as pk  # the ops by their public names (pk.gelu, pk.swiglu, ...)


@dataclass(frozen=True)
class Activation:
    fn: Callable[[Tensor], Tensor]
    gelu: Optional[str] = None  # the GELU approximation ("none" or "tanh") of a GELU: run fused with its bias / gate
    silu: bool = False  # SiLU: its gated form is the fused swiglu


def _gelu(approximate: str) -> Activation:
    return Activation(lambda x: pk.gelu(x, approximate=approximate), gelu=approximate)


ACTIVATIONS: Dict[str, Activation] = {
    "gelu": _gelu("none"),  # erf GELU
    "gelu_python": _gelu("none"),
    # the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) under four names
    "gelu_new": _gelu("tanh"),
    "gelu_pytorch_tanh": _gelu("tanh"),
    "gelu_fast": _gelu("tanh"),
    "gelu_accurate": _gelu("tanh"),
    "gelu_python_tanh": _gelu("tanh"),
    "quick_gelu": Activation(lambda x: x * torch.sigmoid(1.702 * x)),
    "relu": Activation(torch.relu),
    "silu": Activation(pk.silu, silu=True),
    "swish": Activation(pk.silu, silu=True),
    "tanh": Activation(torch.tanh),
    "sigmoid": Activation(torch.sigmoid),
    "linear": Activation(lambda x: x),
}


def get(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def check(name: str, field: str) -> str:
    """`name` if the table has it, else NotImplementedError naming the config field that asked for it."""
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"config field {field}={name!r}: no such activation here "
                                  f"(supported: {sorted(ACTIVATIONS)})")
    return name


def apply(x: Tensor, name: str) -> Tensor:
    return get(name).fn(x)


def bias_apply(x: Tensor, bias: Tensor, name: str) -> Tensor:
    """act(x + bias) for the output of a Linear without bias: one fused op for the GELU family."""
    act = get(name)
    if act.gelu is not None:
        return pk.bias_gelu(x, bias, approximate=act.gelu)
    return act.fn(x + bias)


def gated_apply(gate: Tensor, up: Tensor, name: str) -> Tensor:
    """act(gate) * up: fused swiglu / geglu where the activation is SiLU / a GELU."""
    act = get(name)
    if act.silu:
        return pk.swiglu(gate, up)
    if act.gelu is not None:
        return pk.geglu(gate, up, approximate=act.gelu)
    return act.fn(gate) * up
