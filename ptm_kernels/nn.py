"""Drop-in modules over the ops, with the parameter names (and so state_dict keys) of their torch/HF twins."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import ops
from .reference import rope_cos_sin


class RMSNorm(nn.Module):
    """RMSNorm with a `weight` (like torch.nn.RMSNorm / LlamaRMSNorm / T5LayerNorm).

    `forward(x, residual=None)`: with a residual, returns (normalized x + residual, x + residual).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, cast: str = "llama", elementwise_affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.hidden_size, self.eps, self.cast = hidden_size, eps, cast
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual, cast=self.cast)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, cast={self.cast!r}"


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension with `weight` and `bias` (like torch.nn.LayerNorm)."""

    def __init__(self, normalized_shape: Union[int, tuple], eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not isinstance(normalized_shape, int):
            if len(normalized_shape) != 1:
                raise ValueError(f"normalized_shape must be an int or a 1-tuple (the last dimension), "
                                 f"got {normalized_shape}")
            normalized_shape = normalized_shape[0]
        self.normalized_shape, self.eps = (normalized_shape,), eps
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(normalized_shape, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(normalized_shape, **kw)) if elementwise_affine and bias else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class GELU(nn.Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu(x, self.approximate)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): LLaMA's MLP (act="silu") and T5 v1.1's gated-GELU FFN (act="gelu_tanh").

    Parameter names follow transformers' LlamaMLP (gate_proj, up_proj, down_proj).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if act not in ("silu", "gelu", "gelu_tanh"):
            raise ValueError(f"act must be 'silu', 'gelu' or 'gelu_tanh', got {act!r}")
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if self.act == "silu":
            h = ops.swiglu(gate, up)
        else:
            h = ops.geglu(gate, up, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.down_proj(h)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin cache ([max_positions, rotary_dim // 2], float32) and rotates q and k.

    `forward(q, k, position_ids=None, offset=0)` -> (q_rot, k_rot), q/k in [B, H, L, D].
    """

    def __init__(self, rotary_dim: int, max_position_embeddings: int = 2048, base: float = 10000.0,
                 interleaved: bool = False, device=None):
        super().__init__()
        self.rotary_dim, self.base, self.interleaved = rotary_dim, base, interleaved
        cos, sin = rope_cos_sin(rotary_dim, max_position_embeddings, base)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)

    def forward(self, q: Tensor, k: Optional[Tensor], position_ids: Optional[Tensor] = None,
                offset: Union[int, Tensor] = 0):
        return ops.rope(q, k, self.cos, self.sin, position_ids=position_ids, offset=offset,
                        interleaved=self.interleaved, rotary_dim=self.rotary_dim)


class MultiHeadAttention(nn.Module):
    """Attention with q/k/v/o projections (transformers' LLaMA names: q_proj, k_proj, v_proj, o_proj), fewer
    key/value heads if asked (num_kv_heads: GQA/MQA) and an optional rotary embedding, on the fused op.

    `forward(x, mask=None, context=None, position_ids=None)`: x [B, L, hidden_size]; mask an AttentionMask;
    context [B, S, hidden_size] makes it cross-attention (keys and values from context, no rotary).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = False, dropout: float = 0.0,
                 rotary_dim: Optional[int] = None, rope_base: float = 10000.0, max_position_embeddings: int = 2048,
                 scale: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dropout, self.scale = dropout, scale
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, **kw)
        self.rotary = (RotaryEmbedding(rotary_dim, max_position_embeddings, rope_base, device=device)
                       if rotary_dim else None)

    def forward(self, x: Tensor, mask=None, context: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        B, L, _ = x.shape
        src = x if context is None else context

        def heads(proj, t, n):  # [B, L, n * D] -> a [B, n, L, D] view (unit last stride: no copy in the op)
            return proj(t).view(B, t.shape[1], n, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj, x, self.num_heads)
        k = heads(self.k_proj, src, self.num_kv_heads)
        v = heads(self.v_proj, src, self.num_kv_heads)
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, k, position_ids=position_ids)
        out = ops.attention(q, k, v, mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
