"""transformers' activation names (`hidden_act`, `activation_function`, ...) that the fused kernels compute.

Read from the one activation table (`ptm_kernels/activations.py`, which `ptm_kernels.nn` and the models use
too). A name that is not a GELU or SiLU there means "not fused": the family either runs transformers'
activation as before or refuses, as its docstring says.
"""

from __future__ import annotations

from typing import Callable, Optional

import ptm_kernels as pk

from ..activations import ACTIVATIONS

# GELU names of transformers.activations.ACT2FN -> the `approximate` form the kernels take (exact erf or tanh)
GELU_APPROXIMATE = {name: act.gelu for name, act in ACTIVATIONS.items() if act.gelu is not None}
SILU = tuple(name for name, act in ACTIVATIONS.items() if act.silu)


def gelu_approximate(name) -> Optional[str]:
    """The kernels' `approximate` for a GELU activation name, None for anything else (other names, modules)."""
    return GELU_APPROXIMATE.get(name) if isinstance(name, str) else None


def gated(name) -> Optional[Callable]:
    """`act(gate) * up` as one kernel for the activation `name` (SwiGLU or GeGLU), None if not fused."""
    if isinstance(name, str) and name in SILU:
        return pk.swiglu
    approximate = gelu_approximate(name)
    if approximate is None:
        return None
    return lambda gate, up: pk.geglu(gate, up, approximate=approximate)


def gated_names() -> list:
    return sorted((*SILU, *GELU_APPROXIMATE))
