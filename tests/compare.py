"""Tolerances that mean something.

float32 (and float64): within ~1e-5 relative of the float64 truth.
float16 / bfloat16: the kernel's error against the float64 truth stays within twice the error of plain
PyTorch computing the same thing in the same dtype, plus a small absolute slack.
"""

import math

import torch

HALF = (torch.float16, torch.bfloat16)


def _scale(truth: torch.Tensor) -> float:
    return max(1.0, truth.abs().max().item()) if truth.numel() else 1.0


def assert_close(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor = None, *, name: str = "",
                 precision: torch.dtype = None, rtol: float = 1e-5, atol: float = 1e-5, factor: float = 2.0,
                 slack_scale: float = None):
    """actual: the kernel's result; truth: float64 result; baseline: plain PyTorch in the inputs' dtype.

    precision: the dtype the inputs had (default: actual's); a float32 output computed from bfloat16
    inputs is judged as half precision. factor: the allowed multiple of plain PyTorch's error (2 unless a
    test states why a kernel is allowed more). slack_scale: the magnitude one rounding step of the half
    precision slack is taken at (default: the truth's largest value, at least 1); a sum of n rounded terms
    of size t is owed about sqrt(n) * t (see reduced_slack_scale).
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if (precision or actual.dtype) in HALF:
        assert baseline is not None, f"{name}: half precision needs a same-dtype baseline"
        err = (actual.double() - truth.double()).abs().max().item() if actual.numel() else 0.0
        base = (baseline.double() - truth.double()).abs().max().item() if actual.numel() else 0.0
        scale = max(_scale(truth), slack_scale or 0.0)
        bound = factor * base + torch.finfo(precision or actual.dtype).eps * scale
        assert err <= bound, f"{name}: {actual.dtype} error {err:.3g} > {factor} x torch's {base:.3g} + slack ({bound:.3g})"
    else:
        torch.testing.assert_close(actual.double(), truth.double(), rtol=rtol, atol=atol * _scale(truth),
                                   msg=lambda m: f"{name}: {m}")


def reduced_slack_scale(terms: torch.Tensor, n: int) -> float:
    """Slack scale for a gradient that sums n terms, each rounded to half precision, of `terms`' size
    (e.g. a bias vector's gradient summed over every row of q's gradient). Its rounding error is a random
    walk of n steps, so plain PyTorch's own error, the 2x baseline, is itself a noisy statistic there: with
    few output elements it flakes one run in a few hundred without this."""
    return math.sqrt(n) * terms.abs().max().item() if terms.numel() else 0.0
