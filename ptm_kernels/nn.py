"""Drop-in modules over the ops, with the parameter names (and so state_dict keys) of their torch/HF twins."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import activations, ops
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


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict entries) whose forward is ops.linear: torch's result, faster
    for the few rows of a CPU decode step. The Linears of MLP, Attention and the models' LM heads are these."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.linear(x, self.weight, self.bias)


class MLP(nn.Module):
    """The one MLP of the package (every model in ptm_kernels.models composes it):
    proj(dropout(act(fc(x) + fc_bias))) or, gated, proj(dropout(act(gate(x)) * (fc(x) + fc_bias))).

    act by transformers' name (ptm_kernels.activations, the one table). fc runs without its bias: plain, the
    activation adds it in the same pass (bias_gelu for the GELU family); gated, SiLU / GELU run as the fused
    swiglu / geglu. bias=False drops fc_bias, gate's and proj's biases. fc_bias_apart=False keeps fc's bias in
    its Linear (transformers' layout, for a gated MLP, where nothing fuses it). A subclass may rename the
    Linears (`names`, as GatedMLP).
    """

    names: Dict[str, str] = {}  # a Linear's attribute name where it is not its role's ("gate", "fc", "proj")

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu_new", *, gated: bool = False,
                 bias: bool = True, dropout: float = 0.0, fc_bias_apart: bool = True, device=None, dtype=None):
        super().__init__()
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act, self.dropout, self.gated = act, dropout, gated
        kw = dict(device=device, dtype=dtype)
        if gated:
            setattr(self, self.names.get("gate", "gate"), Linear(hidden_size, intermediate_size, bias=bias, **kw))
        setattr(self, self.names.get("fc", "fc"),
                Linear(hidden_size, intermediate_size, bias=bias and not fc_bias_apart, **kw))
        self.fc_bias = nn.Parameter(torch.zeros(intermediate_size, **kw)) if bias and fc_bias_apart else None
        setattr(self, self.names.get("proj", "proj"), Linear(intermediate_size, hidden_size, bias=bias, **kw))

    def _linear(self, role: str) -> nn.Linear:
        return getattr(self, self.names.get(role, role))

    def forward(self, x: Tensor) -> Tensor:
        h = self._linear("fc")(x)  # [B, L, intermediate]
        if self.gated:
            if self.fc_bias is not None:
                h = h + self.fc_bias
            h = activations.gated_apply(self._linear("gate")(x), h, self.act)
        elif self.fc_bias is not None:
            h = activations.bias_apply(h, self.fc_bias, self.act)
        else:
            h = activations.apply(h, self.act)
        return self._linear("proj")(F.dropout(h, self.dropout, self.training))


class GatedMLP(MLP):
    """down(act(gate(x)) * up(x)): LLaMA's MLP (act="silu") and T5 v1.1's gated-GELU FFN (act="gelu_tanh").

    The one MLP, gated, with transformers' LlamaMLP parameter names (gate_proj, up_proj, down_proj).
    """

    names = {"gate": "gate_proj", "fc": "up_proj", "proj": "down_proj"}
    ACTS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # this module's names -> the table's

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False,
                 device=None, dtype=None):
        if act not in self.ACTS:
            raise ValueError(f"act must be 'silu', 'gelu' or 'gelu_tanh', got {act!r}")
        super().__init__(hidden_size, intermediate_size, self.ACTS[act], gated=True, bias=bias, fc_bias_apart=False,
                         device=device, dtype=dtype)


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


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(scale q k^T + bias) v in plain torch with GQA groups folded into the query rows.

    q [B, H, Lq, D], k/v [B, Hk, Lk, D], bias [B or 1, 1 or H, Lq or 1, Lk] float (0 / -inf, or a per-head
    relative-position bias: T5's decode step). The H // Hk query heads of a key/value head read it in one
    matmul: for Lq = 1 (decoding) a GEMV-shaped pass over the cache per (batch, kv head). Softmax in float32.
    Every query row must see a key (decoding: at least its own), else its softmax is NaN.
    """
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    G = H // Hk
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, Hk, G * Lq, D)  # [B, Hk, G * Lq, D]: heads of one group are adjacent
    s = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, Hk, G, Lq, Lk) * scale
    # bias as [B or 1, Hk or 1, G or 1, Lq or 1, Lk]: one row for a group's heads, or one per head
    bias = bias.unsqueeze(2) if bias.shape[1] == 1 else bias.view(bias.shape[0], Hk, G, *bias.shape[2:])
    p = torch.softmax(s + bias, dim=-1)
    y = torch.matmul(p.to(v.dtype).view(B, Hk, G * Lq, Lk), v)  # [B, Hk, G * Lq, D]
    return y.view(B, H, Lq, D)


class Attention(nn.Module):
    """The one multi-head attention of the package (every model in ptm_kernels.models composes it).

        Attention(hidden_size, num_heads, num_kv_heads=None, head_dim=None, *, cross=False, kv_size=None,
                  qkv_bias=True, out_bias=True, scale=None, dropout=0.0, rotary=None, position_bias=None,
                  layout=None)
        forward(x [B, L, hidden], mask=None, position_ids=None, cache=None, layer=0, *, kv=None, context=None)
            -> [B, L, hidden]

    Projections. `layout` says how the input projections are fused: a tuple of groups that together spell
    "qkv", one nn.Linear per group, named by the group, its rows the groups' heads in order:
        ("qkv",)        self-attention, one fused projection (the default)
        ("q", "kv")     cross-attention (the default with cross=True): keys and values from a context
        ("qk", "v")     MobileBERT: queries and keys from x, values from another input
        ("q", "k", "v") three projections (MultiHeadAttention)
    The group holding q reads x ([B, L, hidden_size]); the others read `context` ([B, S, kv_size]) when one
    is given, else x. Cross-attention keys/values computed once (per forward, or per generate) are passed as
    kv=project_kv(context). The output projection is `out`. (A subclass may rename the modules: `names`.)

    GQA: num_kv_heads < num_heads (query head h reads kv head h // (num_heads // num_kv_heads)).
    rotary: a RotaryEmbedding (shared by the layers) applied to q and k at position_ids, when the keys are
    x's own. cache: a models.kv_cache.KVCache, idem; `cache.update(layer, k, v)` stores the new keys/values
    and returns all of them.
    mask: None, an AttentionMask (the fused ptm_kernels.attention), or a float Tensor [B or 1, 1 or H, Lq, Lk]
    of additive biases (0 / -inf, + relative positions): the plain-torch path (`attend`) of the static decode
    steps. Relative positions
    enter as mask parts built once per stack (T5); `position_bias(Lq, Lk) -> AttentionMask` is the per-layer
    hook for a bias a layer owns itself.
    """

    names: Dict[str, str] = {}  # a projection's attribute name where it is not its group's ("q", "qkv", "out")

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, cross: bool = False, kv_size: Optional[int] = None,
                 qkv_bias: bool = True, out_bias: bool = True, scale: Optional[float] = None, dropout: float = 0.0,
                 rotary: Optional[nn.Module] = None, position_bias: Optional[Callable] = None,
                 layout: Optional[Sequence[str]] = None, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale, self.dropout, self.cross = scale, dropout, cross
        self.layout = tuple(layout or (("q", "kv") if cross else ("qkv",)))
        if "".join(self.layout) != "qkv":
            raise ValueError(f"layout must split 'qkv' in order into groups, e.g. ('q', 'kv'), got {self.layout}")
        if cross and "q" not in self.layout:
            raise ValueError(f"cross-attention reads keys and values from a context: layout {self.layout} "
                             f"projects them with the queries")
        kw = dict(device=device, dtype=dtype)
        for group in self.layout:
            n_in = hidden_size if "q" in group else (kv_size or hidden_size)
            n_out = sum(self._heads_of(c) for c in group) * self.head_dim
            setattr(self, self.names.get(group, group), Linear(n_in, n_out, bias=qkv_bias, **kw))
        setattr(self, self.names.get("out", "out"), Linear(num_heads * self.head_dim, hidden_size,
                                                            bias=out_bias, **kw))
        self.rotary = rotary  # a RotaryEmbedding shared by the layers (its buffers are not in the state dict)
        self.position_bias = position_bias

    def _heads_of(self, part: str) -> int:
        return self.num_heads if part == "q" else self.num_kv_heads

    def _project(self, group: str, t: Tensor) -> Dict[str, Tensor]:
        """The heads of one projection group: {part: [B, heads, L, D]} of t [B, L, in]."""
        B, L, _ = t.shape
        n = [self._heads_of(c) for c in group]
        # [B, L, heads, D] -> [B, heads, L, D] views with a unit last stride: the ops read them in place
        parts = getattr(self, self.names.get(group, group))(t).view(B, L, sum(n), self.head_dim).transpose(1, 2)
        return dict(zip(group, parts.split(n, dim=1)))

    def project_kv(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values [B, Hk, S, D] of a context [B, S, kv_size] (cross-attention, computed once)."""
        if "q" in self.layout[-1]:
            raise ValueError(f"layout {self.layout} projects keys or values with the queries: no project_kv")
        heads = {}
        for group in self.layout[1:]:
            heads.update(self._project(group, context))
        return heads["k"], heads["v"]

    def forward(self, x: Tensor, mask=None, position_ids: Optional[Tensor] = None, cache=None, layer: int = 0, *,
                kv: Optional[Tuple[Tensor, Tensor]] = None, context: Optional[Tensor] = None) -> Tensor:
        B, L, _ = x.shape
        if self.cross and kv is None and context is None:
            raise ValueError("cross-attention needs kv=project_kv(context) or context=")
        if kv is not None:
            if self.layout[0] != "q":
                raise ValueError(f"kv= needs a layout with a projection of its own for q, got {self.layout}")
            q, (k, v) = self._project("q", x)["q"], kv
        else:
            heads = {}
            for group in self.layout:
                heads.update(self._project(group, x if "q" in group or context is None else context))
            q, k, v = heads["q"], heads["k"], heads["v"]
            if context is None:  # the keys are x's own: rotary positions and the cache apply
                if self.rotary is not None:
                    q, k = self.rotary(q, k, position_ids=position_ids)
                if cache is not None:
                    k, v = cache.update(layer, k, v)
        if isinstance(mask, Tensor):  # additive biases: the plain-torch (decode) path
            y = attend(q, k, v, mask, self.scale)
        else:
            if self.position_bias is not None:
                bias = self.position_bias(L, k.shape[2])
                mask = bias if mask is None else mask & bias
            y = ops.attention(q, k, v, mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        out = getattr(self, self.names.get("out", "out"))
        return out(y.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layout={self.layout}")


class MultiHeadAttention(Attention):
    """`Attention` with three projections named as transformers' LLaMA (q_proj, k_proj, v_proj, o_proj), one
    bias switch, and its own rotary embedding if asked (rotary_dim).

    `forward(x, mask=None, context=None, position_ids=None)`: x [B, L, hidden_size]; mask an AttentionMask;
    context [B, S, hidden_size] makes it cross-attention (keys and values from context, no rotary).
    """

    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "o_proj"}

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = False, dropout: float = 0.0,
                 rotary_dim: Optional[int] = None, rope_base: float = 10000.0, max_position_embeddings: int = 2048,
                 scale: Optional[float] = None, device=None, dtype=None):
        rotary = RotaryEmbedding(rotary_dim, max_position_embeddings, rope_base, device=device) if rotary_dim else None
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=bias, out_bias=bias, scale=scale,
                         dropout=dropout, rotary=rotary, layout=("q", "k", "v"), device=device, dtype=dtype)

    def forward(self, x: Tensor, mask=None, context: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        return super().forward(x, mask, position_ids, context=context)
