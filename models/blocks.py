"""The blocks every transformer model here is composed of: one `Attention`, one `MLP`, one `Block`.

    Attention  ptm_kernels.nn.Attention (re-exported here): self or cross, GQA, rotary, KV cache, relative-bias
               hook, bias on/off, scale, and how the q/k/v projections are fused (`layout`); see its docstring.
               The package's MultiHeadAttention is the same class with transformers' projection names.

    MLP        ptm_kernels.nn.MLP (re-exported here): act(fc(x) + fc_bias) -> proj, or gated
               act(gate(x)) * (fc(x) + fc_bias) -> proj, the bias fused into the activation (bias_gelu) or the
               gated product (swiglu / geglu); act by transformers' name from the one activation table
               (ptm_kernels.activations). The package's GatedMLP is the same class with LlamaMLP's names.

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

from typing import Optional, Tuple

from torch import Tensor, nn

from ptm_kernels.nn import MLP, Attention, attend  # noqa: F401  (attend: the attention's plain-torch path)


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


def run_blocks(blocks, x: Tensor, mask, final_norm: Optional[nn.Module] = None) -> Tensor:
    """A stack of Blocks without cache or cross-attention (an encoder), finished: [B, L, d] -> [B, L, d]."""
    residual = None
    for block in blocks:
        x, residual = block(x, residual, mask)
    return finish(x, residual, final_norm)


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
