"""The patch table behind `ptm_kernels.hf.apply` / `revert`: which transformers families we know, and an undo log.

A family module (`ptm_kernels/hf/llama.py`, `bert.py`, ...) registers one function per group of HF model types:

    @family("llama", "mistral", "qwen2")
    def patch_llama(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
        for layer in model.model.layers:
            patcher.set(layer.input_layernorm, "forward", fused_forward)   # recorded, undone by revert()

Every change goes through `Patcher.set`, so `revert` restores exactly the objects that were there before
(bit-identical outputs). A family function refuses (raises, naming the config field) a configuration it cannot
reproduce: "refuse or honour".
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """What `apply` replaces; each flag is a group of modules or functions."""

    attention: bool = True  # attention through ptm_kernels.attention (analytic masks, fused biases)
    norms: bool = True      # RMSNorm / LayerNorm (with the residual add fused where the block allows it)
    rope: bool = True       # rotary embeddings
    mlp: bool = True        # activations / gated MLPs / bias+GELU
    loss: bool = True       # fused (linear) cross-entropy in *ForCausalLM / *ForMaskedLM / *ForConditionalGeneration
    linear: bool = True     # nn.Linear / Conv1D through ptm_kernels.linear (a CPU decode step GEMV; hf/linear.py)


class Patcher:
    """Sets attributes and remembers the old values so that `undo` puts every one of them back."""

    def __init__(self) -> None:
        self._log: List[Tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else getattr(obj, name, _MISSING)
        self._log.append((obj, name, old))
        setattr(obj, name, value)

    def set_method(self, obj: Any, name: str, fn: Callable, **bound: Any) -> None:
        """Set `obj.name` to `fn` bound to obj (an instance attribute: this object only, not its class).
        `bound` keyword arguments are passed to every call (per-instance settings of the patch)."""
        # a MethodType (not a closure over obj), so copy.deepcopy(model) binds the copy to the copied object
        self.set(obj, name, types.MethodType(functools.partial(fn, **bound) if bound else fn, obj))

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Call `fn` when undoing, in reverse order with the attribute restores (for changes made through an
        API, e.g. `model.set_attn_implementation`)."""
        self._log.append((None, fn, _MISSING))

    def undo(self) -> None:
        for obj, name, old in reversed(self._log):
            if obj is None:
                name()
            elif old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._log.clear()


PatchFn = Callable[[nn.Module, PatchOptions, Patcher], None]
FAMILIES: Dict[str, PatchFn] = {}


def family(*model_types: str) -> Callable[[PatchFn], PatchFn]:
    """Register `fn` as the patch for HF `config.model_type` in `model_types`."""

    def register(fn: PatchFn) -> PatchFn:
        for t in model_types:
            if t in FAMILIES:
                raise ValueError(f"model_type {t!r} registered twice")
            FAMILIES[t] = fn
        return fn

    return register


def refuse(config: Any, field: str, why: str) -> None:
    """Raise for a configuration the patches cannot reproduce, naming the config field ("refuse or honour")."""
    raise ValueError(f"hf.apply: {getattr(config, 'model_type', '?')} config.{field}: {why}")


def checkpointable(forward: Callable) -> Callable:
    """`forward` for a transformers GradientCheckpointingLayer instance, keeping its gradient checkpointing.

    transformers checkpoints those layers inside the class's `forward` wrapper; an instance-level forward
    replaces that wrapper, so this does the same: under `model.gradient_checkpointing_enable()` in training,
    run `forward` through the layer's checkpoint function, without the KV cache (as transformers does).
    """

    @functools.wraps(forward)
    def layer_forward(self, *args, **kwargs):
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(self, "_can_checkpoint_with_cache", False) and kwargs.get("cache") is not None:
                kwargs["cache"] = None
            return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
        return forward(self, *args, **kwargs)

    return layer_forward
