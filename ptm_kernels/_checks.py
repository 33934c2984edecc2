"""Argument checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, t, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES, min_dim: int = 0,
           dim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")
    return t


def same_device(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def shape(name: str, t: Optional[Tensor], expected: Sequence[int]) -> None:
    if t is not None and t.shape != tuple(expected):  # torch.Size compares with a tuple
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def param_dtype(x: Tensor, p: Optional[Tensor]) -> Optional[Tensor]:
    """Kernels take a weight/bias in x's dtype or float32; any other float dtype widens exactly to float32."""
    if p is None or p.dtype in (x.dtype, torch.float32):
        return p if p is None or p.is_contiguous() else p.contiguous()
    return p.float().contiguous()


def rows(x: Tensor) -> Tensor:
    """x as a contiguous [N, C] matrix (a view when x is contiguous); N or C may be 0."""
    if x.dim() != 2:  # flatten (a reshape) costs less than reshape to computed sizes; a matrix needs neither
        x = x.flatten(0, -2) if x.dim() > 2 else x.unsqueeze(0)
    return x.contiguous()


def values_in(name: str, t: Tensor, lo: int, hi: int, range_text: str) -> None:
    """Refuse integer values of t outside [lo, hi) (range_text says it for the message, e.g. "[0, Lq = 8)").

    A GPU kernel cannot raise, and an index outside its range reads outside memory or gives a plausible wrong
    answer, so it is checked here: eagerly with one sync and a ValueError naming `name` and the values found;
    inside a traced graph (torch.compile), where a data-dependent raise cannot run, as a graph assertion
    (torch._assert_async: a RuntimeError on the CPU, a device-side assert on a GPU, as torch's own indexing)."""
    if t.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch._assert_async(((t >= lo) & (t < hi)).all(), f"{name} must lie in {range_text}")
        return
    a, b = int(t.min()), int(t.max())
    if a < lo or b >= hi:
        raise ValueError(f"{name} must lie in {range_text}, got values in [{a}, {b}]")
