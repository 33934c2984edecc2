"""The blocks every transformer model here is composed of: one `Attention`, one `MLP`, one `Block`.

    Attention(hidden_size, num_heads, num_kv_heads=None, head_dim=None, *, cross=False, kv_size=None,
              qkv_bias=True, out_bias=True, scale=None, dropout=0.0, rotary=None, position_bias=None)
        forward(x [B, L, hidden], mask, position_ids=None, cache=None, layer=0, *, kv=None) -> [B, L, hidden]
        self-attention: one fused projection `qkv` (rows [q heads | k heads | v heads]), then `out`;
        cross-attention (cross=True): `q` from x, `kv` from the context (`project_kv(context)`, computed once
        per forward or per generate and passed as kv=), then `out`.
        GQA: num_kv_heads < num_heads (query head h reads kv head h // (num_heads // num_kv_heads)).
        rotary: a shared ptm_kernels.nn.RotaryEmbedding applied to q and k at position_ids.
        cache: a models.kv_cache.KVCache; `cache.update(layer, k, v)` stores the new keys/values and returns
        all of them (see kv_cache.py for the static, preallocated decode mode).
        mask: an AttentionMask (the fused ptm_kernels.attention), or a float Tensor [B, 1, Lq, Lk] of additive
        biases (0 / -inf): the plain-torch path the static decode step uses (for Lq = 1 a GEMV-shaped matmul over
        the cache, all query heads of a GQA group at once; no mask objects, nothing torch.compile breaks on).
        Relative positions enter as mask parts (AttentionMask.toeplitz / .bias), built once per stack and shared
        by its layers (T5); `position_bias(Lq, Lk) -> AttentionMask` is the per-layer hook for a bias a layer
        owns itself.

    MLP(hidden_size, intermediate_size, act, *, gated=False, bias=True, dropout=0.0)
        forward(x) -> proj(dropout(h)), h = act(fc(x) + fc_bias) (the bias fused into the activation: bias_gelu
        for the GELU family), or, gated, h = act(gate(x)) * (fc(x) + fc_bias) (fused swiglu / geglu);
        act by transformers' name from models.activations (the one activation table).

    Block(attn, mlp, norm1, norm2, pre_norm=True, resid_dropout=0.0, *, cross_attn=None, norm3=None)
        forward(x, residual, mask, position_ids=None, cache=None, layer=0, *, cross_kv=None, cross_mask=None)
        -> (x, residual): attention, optional cross-attention, MLP, each with a residual and a norm
        (norm1, norm2[, norm3] in that order). The residual/norm convention:
          pre-norm   the residual stream is carried beside x, the sub-layer output not yet added: every norm
                     adds and normalizes in one fused op, `h, residual = norm(x, residual=residual)`; the stack
                     ends with `finish(x, residual, final_norm)`.
          post-norm  x = norm(x + sublayer(x)), the add fused into the norm; residual stays None.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask

from . import activations


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: Optional[float] = None) -> Tensor:
    """softmax(scale q k^T + bias) v in plain torch with GQA groups folded into the query rows.

    q [B, H, Lq, D], k/v [B, Hk, Lk, D], bias [B or 1, 1, Lq, Lk] float (0 / -inf). The H // Hk query heads of
    a key/value head read it in one matmul: for Lq = 1 (decoding) a GEMV-shaped pass over the cache per
    (batch, kv head). Softmax in float32. Every query row must see a key (decoding: at least its own), else
    its softmax is NaN.
    """
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    G = H // Hk
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, Hk, G * Lq, D)  # [B, Hk, G * Lq, D]: heads of one group are adjacent
    s = torch.matmul(qg, k.transpose(-1, -2)).float().view(B, Hk, G, Lq, Lk) * scale
    p = torch.softmax(s + bias.unsqueeze(2), dim=-1)  # bias [B, 1, 1, Lq, Lk] broadcast over the group
    y = torch.matmul(p.to(v.dtype).view(B, Hk, G * Lq, Lk), v)  # [B, Hk, G * Lq, D]
    return y.view(B, H, Lq, D)


class Attention(nn.Module):
    """Self- or cross-attention on ptm_kernels.attention; see the module docstring for the full contract."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, *, cross: bool = False, kv_size: Optional[int] = None,
                 qkv_bias: bool = True, out_bias: bool = True, scale: Optional[float] = None, dropout: float = 0.0,
                 rotary: Optional[nn.Module] = None,
                 position_bias: Optional[Callable[[int, int], AttentionMask]] = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.scale, self.dropout, self.cross = scale, dropout, cross
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if cross:
            self.q = nn.Linear(hidden_size, H * D, bias=qkv_bias)
            self.kv = nn.Linear(kv_size or hidden_size, 2 * Hk * D, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(hidden_size, (H + 2 * Hk) * D, bias=qkv_bias)
        self.out = nn.Linear(H * D, hidden_size, bias=out_bias)
        self.rotary = rotary  # a RotaryEmbedding shared by the layers (its buffers are not in the state dict)
        self.position_bias = position_bias

    def project_kv(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        """Cross-attention keys and values [B, Hk, S, D] of the context [B, S, kv_size]."""
        B, S, _ = context.shape
        k, v = self.kv(context).view(B, S, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: Tensor, mask, position_ids: Optional[Tensor] = None, cache=None, layer: int = 0, *,
                kv: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        B, L, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.cross:
            if kv is None:
                raise ValueError("cross-attention needs kv=project_kv(context)")
            q = self.q(x).view(B, L, H, D).transpose(1, 2)  # [B, H, L, D]
            k, v = kv
        else:
            # [B, L, heads, D] -> [B, heads, L, D] views with a unit last stride: the ops read them in place
            q, k, v = self.qkv(x).view(B, L, H + 2 * Hk, D).transpose(1, 2).split([H, Hk, Hk], dim=1)
            if self.rotary is not None:
                q, k = self.rotary(q, k, position_ids=position_ids)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        if isinstance(mask, Tensor):  # additive biases: the plain-torch (decode) path
            y = attend(q, k, v, mask, self.scale)
        else:
            if self.position_bias is not None:
                mask = mask & self.position_bias(L, k.shape[2])
            y = pk.attention(q, k, v, mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, H * D))


class MLP(nn.Module):
    """proj(dropout(act(fc(x) + fc_bias))) or, gated, proj(dropout(act(gate(x)) * (fc(x) + fc_bias))).

    fc runs without its bias: plain, the activation adds it in the same pass (bias_gelu for the GELU family);
    gated, SiLU / GELU run as the fused swiglu / geglu. bias=False drops fc_bias, gate's and proj's biases.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "gelu_new", *, gated: bool = False,
                 bias: bool = True, dropout: float = 0.0):
        super().__init__()
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act, self.dropout = act, dropout
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=bias) if gated else None
        self.fc = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc_bias = nn.Parameter(torch.zeros(intermediate_size)) if bias else None
        self.proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # [B, L, intermediate]
        if self.gate is not None:
            if self.fc_bias is not None:
                h = h + self.fc_bias
            h = activations.gated_apply(self.gate(x), h, self.act)
        elif self.fc_bias is not None:
            h = activations.bias_apply(h, self.fc_bias, self.act)
        else:
            h = activations.apply(h, self.act)
        return self.proj(F.dropout(h, self.dropout, self.training))


def add_norm(norm: nn.Module, x: Tensor, residual: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Pre-norm: (norm(x + residual), x + residual) in one fused op; the first block has no residual yet."""
    if residual is None:
        return norm(x), x
    return norm(x, residual=residual)


def finish(x: Tensor, residual: Optional[Tensor], norm: Optional[nn.Module] = None) -> Tensor:
    """The end of a stack of Blocks: pre-norm adds the carried residual (fused into the final norm, if any)."""
    if residual is None:
        return norm(x) if norm is not None else x
    return norm(x, residual=residual)[0] if norm is not None else x + residual


class Block(nn.Module):
    """Attention (+ cross-attention) + MLP, each with a residual and a norm; see the module docstring."""

    def __init__(self, attn: Attention, mlp: nn.Module, norm1: nn.Module, norm2: nn.Module, pre_norm: bool = True,
                 resid_dropout: float = 0.0, *, cross_attn: Optional[Attention] = None,
                 norm3: Optional[nn.Module] = None):
        super().__init__()
        if (cross_attn is None) != (norm3 is None):
            raise ValueError("a Block with cross_attn needs norm3 (norm2 is then the cross-attention's norm)")
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.cross_attn, self.norm3 = cross_attn, norm3
        self.pre_norm = pre_norm
        self.drop = nn.Dropout(resid_dropout)

    def forward(self, x: Tensor, residual: Optional[Tensor], mask, position_ids: Optional[Tensor] = None,
                cache=None, layer: int = 0, *, cross_kv: Optional[Tuple[Tensor, Tensor]] = None,
                cross_mask=None) -> Tuple[Tensor, Optional[Tensor]]:
        mlp_norm = self.norm3 if self.cross_attn is not None else self.norm2
        if self.pre_norm:
            h, residual = add_norm(self.norm1, x, residual)
            x = self.drop(self.attn(h, mask, position_ids, cache, layer))
            if self.cross_attn is not None:
                h, residual = self.norm2(x, residual=residual)
                x = self.drop(self.cross_attn(h, cross_mask, kv=cross_kv))
            h, residual = mlp_norm(x, residual=residual)
            return self.drop(self.mlp(h)), residual
        x = self.norm1(self.drop(self.attn(x, mask, position_ids, cache, layer)), residual=x)[0]
        if self.cross_attn is not None:
            x = self.norm2(self.drop(self.cross_attn(x, cross_mask, kv=cross_kv)), residual=x)[0]
        return mlp_norm(self.drop(self.mlp(x)), residual=x)[0], None
