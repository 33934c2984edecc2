"""The one dtype rule of the kernels: math and statistics in float32, float64 for float64 inputs."""

from __future__ import annotations

from typing import Union

import torch


def compute_dtype(x: Union[torch.Tensor, torch.dtype]) -> torch.dtype:
    """float64 for a float64 tensor (or dtype), else float32: the dtype of the kernels' math and of their
    statistics (lse, mean, rstd, parameter gradients)."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32
