"""The oracle: each op in short, obviously correct PyTorch.

Tests compare every implementation against these functions, and they define what the public ops mean.
They are differentiable with plain autograd, work in any floating dtype (tests run them in float64 to get a
"true" answer), and never import a kernel. They follow the cast order of the models that made each op
popular (transformers' LLaMA and T5 RMSNorm, torch's LayerNorm and GELU).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .dtypes import compute_dtype


def rms_norm(
    x: Tensor,
    weight: Optional[Tensor],
    eps: float = 1e-6,
    residual: Optional[Tensor] = None,
    cast: str = "llama",
):
    """RMSNorm over the last dimension; with `residual`, normalizes x + residual and also returns that sum.

    cast="llama": normalize in float32, cast back to x's dtype, then multiply by the weight
                  (transformers' LlamaRMSNorm).
    cast="t5":    normalize in float32, cast to the weight's dtype when it is half precision, then multiply
                  (transformers' T5LayerNorm). Without a weight, both give x's dtype.
    """
    if residual is not None:
        x = x + residual
    h = x
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if cast == "llama":
        normed = normed.to(x.dtype)
    elif cast == "t5":
        if weight is None:
            normed = normed.to(x.dtype)
        elif weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(weight.dtype)
    else:
        raise ValueError(f"cast must be 'llama' or 't5', got {cast!r}")
    out = normed if weight is None else weight * normed
    return (out, h) if residual is not None else out


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
):
    """LayerNorm over the last dimension in float32, one rounding to x's dtype (as torch's LayerNorm)."""
    if residual is not None:
        x = x + residual
    h = x
    compute = compute_dtype(x)
    xf = x.to(compute)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.to(compute)
    if bias is not None:
        out = out + bias.to(compute)
    out = out.to(x.dtype)
    return (out, h) if residual is not None else out


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU computed in float32 (float64 for float64 input), rounded once."""
    compute = compute_dtype(x)
    xf = x.to(compute)
    if approximate == "none":
        y = 0.5 * xf * (1.0 + torch.erf(xf / math.sqrt(2.0)))
    elif approximate == "tanh":
        y = 0.5 * xf * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf.pow(3))))
    else:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return y.to(x.dtype)


def bias_gelu(x: Tensor, bias: Tensor, approximate: str = "none") -> Tensor:
    """gelu(x + bias), bias broadcast over the last dimension; the sum is not rounded before the GELU."""
    compute = compute_dtype(x)
    return gelu(x.to(compute) + bias.to(compute), approximate).to(x.dtype)


def silu(x: Tensor) -> Tensor:
    compute = compute_dtype(x)
    xf = x.to(compute)
    return (xf * torch.sigmoid(xf)).to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up (LLaMA's MLP), in float32, rounded once."""
    compute = compute_dtype(gate)
    g = gate.to(compute)
    return (g * torch.sigmoid(g) * up.to(compute)).to(gate.dtype)


def geglu(gate: Tensor, up: Tensor, approximate: str = "tanh") -> Tensor:
    """gelu(gate) * up (T5 v1.1 uses the tanh approximation), in float32, rounded once."""
    compute = compute_dtype(gate)
    return (gelu(gate.to(compute), approximate) * up.to(compute)).to(gate.dtype)


def rope_cos_sin(rotary_dim: int, max_positions: int, base: float = 10000.0, dtype=torch.float32):
    """The cos/sin cache: [max_positions, rotary_dim // 2], frequency i = base^(-2i / rotary_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    interleaved: bool = False,
    rotary_dim: Optional[int] = None,
) -> Tensor:
    """Rotate x [B, H, L, D] by the angles at `positions` ([B, L] or [L] integer).

    cos, sin: [P, rotary_dim // 2]. Rotate-half layout (LLaMA, GPT-NeoX) pairs dimension i with
    i + rotary_dim // 2; the interleaved layout (GPT-J, GLM) pairs 2i with 2i + 1. Dimensions past
    rotary_dim pass through unchanged. Computed in float32, rounded once.
    """
    D = x.shape[-1]
    R = D if rotary_dim is None else rotary_dim
    compute = compute_dtype(x)
    pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
    c = cos.to(compute)[pos].unsqueeze(1)  # [B|1, 1, L, R/2]
    s = sin.to(compute)[pos].unsqueeze(1)
    xf = x.to(compute)
    rot, rest = xf[..., :R], xf[..., R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2 :]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot, rest), dim=-1).to(x.dtype)
