"""Which implementation runs each op: decided here and nowhere else.

Implementations ("backends") all provide the kernel interface of `reference_kernels.py`:

    triton     ptm_kernels.triton        GPU default; on CPU tensors only under TRITON_INTERPRET=1
    cuda       ptm_kernels._C.cuda       hand-written CUDA, when the extension was built with it
    cpu        ptm_kernels._C.cpu        C++ CPU kernels, the CPU default when the extension is built
    reference  ptm_kernels.reference_kernels   plain PyTorch, the fallback everywhere

Override with the environment (`PTM_KERNELS_BACKEND=triton`, or per op: `rms_norm=cpu,attention=reference`)
or in code with `ptm_kernels.backend.use("triton")` / `use(rms_norm="cpu")` as a context manager.
An override that cannot run on the tensors' device raises instead of silently running something else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
from types import ModuleType
from typing import Dict, Optional

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cpu", "reference")

# Op families, each a set of kernel functions selected together (forward and backward must agree).
OPS = ("rms_norm", "layer_norm", "activation", "rope", "attention", "relative_attention", "cross_entropy",
       "linear")

_local = threading.local()


def _parse(spec: str) -> Dict[str, str]:
    """'triton' -> {'*': 'triton'}; 'rms_norm=cpu,attention=reference' -> per-op choices."""
    out: Dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        op, _, name = part.rpartition("=")
        op = op.strip() or "*"
        name = name.strip()
        if name not in BACKENDS:
            raise ValueError(f"PTM_KERNELS_BACKEND: unknown backend {name!r}; expected one of {BACKENDS}")
        if op != "*" and op not in OPS:
            raise ValueError(f"PTM_KERNELS_BACKEND: unknown op {op!r}; expected one of {OPS}")
        out[op] = name
    return out


class _Overrides(dict):
    """The backend chosen per op family ('*': all) by PTM_KERNELS_BACKEND or a `use()` block, with the modules
    it resolves to (`kernels`): every op call asks, and the answer only changes with the overrides in force."""

    def __init__(self, choice: Dict[str, str]):
        super().__init__(choice)
        self.names: Dict[tuple, str] = {}  # (op, device type) -> backend name
        self.modules: Dict[tuple, ModuleType] = {}  # (op, device, dtype) -> module


# os.environ.get encodes the name and decodes the value on every call (~0.7 µs, an op call reads the variable
# each time so that a change takes effect at once): the raw value is looked up in os.environ's own mapping,
# which every os.environ change updates. (os.environ.get where there is no such mapping.)
_ENV_NAME = "PTM_KERNELS_BACKEND"
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(_ENV_NAME) if _ENV_DATA is not None else None
_PARSED: Dict[object, _Overrides] = {}  # raw PTM_KERNELS_BACKEND value -> its parse: parsed once, not per op call

_uses_lock = threading.Lock()
_uses_open = 0  # `use()` blocks open in any thread: while there are none, no thread's stack is read


def _overrides() -> _Overrides:
    if _uses_open:
        stack = getattr(_local, "stack", None)
        if stack:
            return stack[-1]
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_ENV_NAME)
    parsed = _PARSED.get(raw)
    if parsed is None:
        spec = os.environ.get(_ENV_NAME, "")
        parsed = _PARSED[raw] = _Overrides(_parse(spec))
    return parsed


@contextlib.contextmanager
def use(default: Optional[str] = None, **per_op: str):
    """Run the ops inside the block on the given backend(s): `with use("triton"):` or `use(rope="cpu")`."""
    global _uses_open
    choice = dict(_overrides())
    if default is not None:
        choice.update(_parse(default))
    for op, name in per_op.items():
        choice.update(_parse(f"{op}={name}"))
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(_Overrides(choice))
    with _uses_lock:
        _uses_open += 1
    try:
        yield
    finally:
        stack.pop()
        with _uses_lock:
            _uses_open -= 1


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)  # a failed import is not retried on every op call
def _triton_module() -> Optional[ModuleType]:
    try:
        return importlib.import_module("ptm_kernels.triton")
    except Exception:  # triton missing or broken: the other backends still work
        return None


def module(name: str) -> Optional[ModuleType]:
    """The module implementing backend `name`, or None when it is not available in this installation."""
    if name == "reference":
        return importlib.import_module("ptm_kernels.reference_kernels")
    if name == "cpu":
        return getattr(_ext.C, "cpu", None) if _ext.C is not None else None
    if name == "cuda":
        return getattr(_ext.C, "cuda", None) if _ext.C is not None else None
    if name == "triton":
        return _triton_module()
    raise ValueError(f"unknown backend {name!r}")


def supports(name: str, op: str, device_type: str) -> bool:
    """Whether backend `name` can run family `op` on `device_type` in this installation."""
    # TRITON_INTERPRET matters only to Triton on CPU tensors: not read (an os.environ lookup) for the others
    return _supports(name, op, device_type, name == "triton" and device_type == "cpu" and triton_interpreted())


# The answer depends only on the installation and TRITON_INTERPRET: computed once per combination, since the
# dispatcher asks on every op call (a decode step makes hundreds of tiny calls).
@functools.lru_cache(maxsize=None)
def _supports(name: str, op: str, device_type: str, interpreted: bool) -> bool:
    mod = module(name)
    if mod is None:
        return False
    if name == "cpu" and device_type != "cpu":
        return False
    if name == "cuda" and device_type != "cuda":
        return False
    if name == "triton" and device_type == "cpu" and not interpreted:
        return False
    probe = {"rms_norm": "rms_norm_fwd", "layer_norm": "layer_norm_fwd", "activation": "act_fwd",
             "rope": "rope_fwd", "attention": "attention_fwd",
             "relative_attention": "relative_attention_fwd", "cross_entropy": "cross_entropy_fwd",
             "linear": "linear_fwd"}[op]
    return hasattr(mod, probe)


def default(op: str, device_type: str) -> str:
    """The backend used without an override: the fastest one available (see benchmarks/)."""
    order = ("triton", "cuda", "reference") if device_type == "cuda" else ("cpu", "reference")
    for name in order:
        if supports(name, op, device_type):
            return name
    return "reference"


def select(op: str, device: torch.device) -> str:
    return _select(op, device.type)


def _select(op: str, device_type: str) -> str:
    overrides = _overrides()
    name = overrides.names.get((op, device_type))
    if name is None:
        name = _resolve(overrides, op, device_type)
        # Triton on CPU tensors also depends on TRITON_INTERPRET, read on every call: not kept
        if not (name == "triton" and device_type == "cpu"):
            overrides.names[(op, device_type)] = name
    return name


def _resolve(choice: Dict[str, str], op: str, device_type: str) -> str:
    name = choice.get(op, choice.get("*"))
    if name is None:
        return default(op, device_type)
    if not supports(name, op, device_type):
        why = {
            "triton": "needs a CUDA tensor, or TRITON_INTERPRET=1 set before ptm_kernels is imported",
            "cpu": "needs CPU tensors and the C++ extension (ptm_kernels._C)",
            "cuda": "needs CUDA tensors and the extension built with CUDA",
        }.get(name, "")
        raise RuntimeError(f"ptm_kernels: backend {name!r} cannot run {op} on {device_type} tensors "
                           f"in this installation ({why}); see `python -m ptm_kernels.info`")
    return name


def kernels(op: str, x: torch.Tensor, *others: torch.Tensor) -> ModuleType:
    """The module whose functions implement `op` for inputs like `x`.

    float64 always runs on the reference: the kernels serve the training dtypes, float64 serves gradcheck.
    So does a problem where x or one of `others` has no element: plain PyTorch gives torch's empty (or, for
    attention with no key, zero) results, where the kernels' launch grids and loops assume some work.
    """
    if x.numel() == 0:
        return module("reference")
    for t in others:
        if t.numel() == 0:
            return module("reference")
    # Every op call comes here: the module is kept per (op, device, dtype) with the overrides in force, so a
    # `use()` block or a changed PTM_KERNELS_BACKEND (other overrides) resolves afresh.
    overrides = _overrides()
    key = (op, x.device, x.dtype)
    mod = overrides.modules.get(key)
    if mod is None:
        name = choice(op, x.device.type, x.dtype)
        mod = module(name)
        if not (name == "triton" and x.device.type == "cpu"):  # see _select
            overrides.modules[key] = mod
    return mod


def choice(op: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that `kernels` picks for nonempty inputs of this device type and dtype (no tensor needed)."""
    return "reference" if dtype == torch.float64 else _select(op, device_type)
