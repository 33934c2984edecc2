"""ptm_kernels inside transformers models: `attn_implementation="ptm"` and `apply(model)` / `revert(model)`.

Needs transformers; `import ptm_kernels` never imports this package.

    import ptm_kernels.hf
    ptm_kernels.hf.register()                                     # attn_implementation="ptm" for any model
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ptm")

    ptm_kernels.hf.apply(model)       # + fused norms, RoPE, MLP, the fused loss (see the family modules), and
                                      #   nn.Linear / Conv1D through ptm_kernels.linear (hf/linear.py)
    ptm_kernels.hf.revert(model)      # back to exactly the modules and functions it had

`apply` patches one model *instance* in place, dispatched on `model.config.model_type` (the table in
`patching.FAMILIES`, filled by `llama.py`, `gpt2.py`, `bert.py`, `t5.py`, `bart.py`, `xlnet.py`). It does not
patch classes: `apply(LlamaForCausalLM)` raises, so models built later are never changed behind your back (patch
each model after building or loading it; weights loaded later into a patched instance are used as they are,
since the patches read the model's own parameters). Applying again with the same options does nothing; with
other options it raises (revert first). Each family refuses (ValueError naming the config field) what it cannot
reproduce.
"""

from __future__ import annotations

import importlib
import weakref

from torch import nn

from .attention import register
from .linear import patch_linears
from .patching import FAMILIES, Patcher, PatchOptions

FAMILY_MODULES = ("llama", "gpt2", "bert", "t5", "bart", "xlnet")

# model -> (options, undo log); weak, so a patched model that is dropped is not kept alive
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _load_families() -> None:
    for name in FAMILY_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def supported_model_types() -> list:
    _load_families()
    return sorted(FAMILIES)


def _converted_by(model: nn.Module) -> str:
    """A hint naming our model whose from_hf converts this transformers class (models/ HFTwin.hf_class), or ''."""
    import pkgutil

    import ptm_kernels.models as models

    name = type(model).__name__
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"{models.__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and obj.__module__ == module.__name__ and getattr(obj, "hf_class", None) == name:
                return (f". This project's own model converts it: ptm_kernels.models.{info.name}.{obj.__name__}"
                        f".from_hf(model)")
    return ""


def apply(model_or_class, *, attention: bool = True, norms: bool = True, rope: bool = True, mlp: bool = True,
          loss: bool = True, linear: bool = True) -> nn.Module:
    """Patch a transformers model instance in place with ptm_kernels; returns it. See the module docstring."""
    if isinstance(model_or_class, type):
        raise TypeError(f"hf.apply takes a model instance, not the class {model_or_class.__name__}: classes are "
                        f"not patched (build or load the model, then hf.apply(model))")
    model = model_or_class
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or getattr(config, "model_type", None) is None:
        raise TypeError(f"hf.apply takes a transformers model (an nn.Module with .config.model_type), got "
                        f"{type(model).__name__}")
    opts = PatchOptions(attention=attention, norms=norms, rope=rope, mlp=mlp, loss=loss, linear=linear)
    if model in _APPLIED:
        if _APPLIED[model][0] == opts:
            return model
        raise ValueError(f"hf.apply: this model is already patched with {_APPLIED[model][0]}; call "
                         f"hf.revert(model) before applying {opts}")
    types = supported_model_types()
    patch = FAMILIES.get(config.model_type)
    if patch is None:
        raise ValueError(f"hf.apply: model_type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(types)}{_converted_by(model)}")
    register()
    patcher = Patcher()
    try:
        patch(model, opts, patcher)
        if opts.linear:
            patch_linears(model, patcher)
    except BaseException:
        patcher.undo()  # a refusal half-way leaves the model as it was
        raise
    _APPLIED[model] = (opts, patcher)
    return model


def revert(model_or_class) -> nn.Module:
    """Undo `apply` on this model: every patched attribute gets back the object it had (bit-identical outputs)."""
    if model_or_class not in _APPLIED:
        raise ValueError(f"hf.revert: this {type(model_or_class).__name__} was not patched by hf.apply")
    _, patcher = _APPLIED.pop(model_or_class)
    patcher.undo()
    return model_or_class


def is_applied(model: nn.Module) -> bool:
    return model in _APPLIED


__all__ = ["register", "apply", "revert", "is_applied", "supported_model_types", "PatchOptions"]
