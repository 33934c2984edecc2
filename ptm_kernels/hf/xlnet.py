"""`hf.apply` for XLNet (XLNetModel, XLNetLMHeadModel and the heads built on XLNetModel).

What a patched model does differently (the same math, fewer and fused passes):

- **attention** (`attention=True`): each `XLNetRelativeAttention` runs both streams in one
  `ptm_kernels.two_stream_attention` call (one `relative_attention` call without a query stream): content,
  position and segment terms, `r_w_bias` / `r_r_bias` / `r_s_bias`, the masks and the softmax, each tile of k, v
  and r loaded once. How transformers' layer inputs map onto the op:
  - `target_mapping` [num_predict, L, B] becomes `query_positions` (its one-hot rows: the query stream has only
    the predicted rows, not L); an all-zero row (a padded prediction) gives zeros, as in transformers. A
    mapping that is not one-hot with distinct positions (transformers then sums queries) runs transformers'
    attention for that call.
  - the float masks transformers builds (`non_tgt_mask` for the content stream, `attn_mask` for the query
    stream: 1 = hidden; from `attention_mask` / `input_mask`, `perm_mask`, attn_type "uni", `same_length`,
    memory) become dense visibility parts, the query stream's rows gathered at the predicted positions.
  - `seg_mat` (one-hot "different segment" from `token_type_ids`, memory in segment 0) becomes segment ids for
    queries and keys; a `seg_mat` that no ids reproduce runs transformers' attention.
  - `mems` are the first keys (memory first), r the projected relative positions (`bi_data`: per batch row).
  A query-stream row that sees no key gives zeros, where transformers averages all keys; the permutations of
  XLNet's pre-training always leave a target some key. `output_attentions=True` runs transformers' attention.
- **norms** (`norms=True`): the residual adds after attention and after the feed-forward are fused into their
  LayerNorm (`post_attention`, `XLNetFeedForward`).
- **mlp** (`mlp=True`): `layer_1`'s bias added inside the GELU kernel when `ff_activation` is a GELU the kernels
  compute (`hf/activations.py`); any other activation runs as before.
- **loss** (`loss=True`, `XLNetLMHeadModel`): given `labels`, `lm_loss` (weight and bias) and the cross-entropy
  run as one `ptm_kernels.linear_cross_entropy` on the hidden states (`logits_to_keep` applied first), and
  **`logits` is None** in the output. `mems` are returned as before.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask

from .activations import gelu_approximate
from .bert import IGNORE_INDEX, original_forward, set_forward
from .patching import Patcher, PatchOptions, family

# ------------------------------------------------------------------------------- transformers' inputs


def one_hot_positions(target_mapping: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(positions [B, Lg], weights [B, Lg]: 1 for a predicted row, 0 for an all-zero row) of a one-hot
    target_mapping [Lg, L, B] with distinct positions per batch row; None for any other mapping."""
    tm = target_mapping
    if not (bool(((tm == 0) | (tm == 1)).all()) and bool((tm.sum(1) <= 1).all()) and bool((tm.sum(0) <= 1).all())):
        return None
    tm = tm.permute(2, 0, 1)  # [B, Lg, L]
    positions = tm.argmax(-1)
    return positions, tm.gather(2, positions.unsqueeze(-1)).squeeze(-1)


def visibility(mask: Optional[Tensor], positions: Optional[Tensor] = None) -> Optional[AttentionMask]:
    """transformers' XLNet mask [L, K, B, 1] (1 = hidden) as a dense part [B, 1, rows, K] (True = visible);
    with `positions` [B, Lg], only those query rows."""
    if mask is None:
        return None
    visible = (mask[..., 0] == 0).permute(2, 0, 1)  # [B, L, K]
    if positions is not None:
        visible = visible.gather(1, positions.unsqueeze(-1).expand(-1, -1, visible.shape[-1]))
    return AttentionMask.dense(visible.unsqueeze(1))


def segment_ids(seg_mat: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """(query ids [B, L], key ids [B, K]) whose "different segment" one-hot is exactly `seg_mat` [L, K, B, 2]
    (memory first: K = M + L); None if no ids reproduce it."""
    different = seg_mat[..., 1].permute(2, 0, 1) != 0  # [B, L, K]
    B, L, K = different.shape
    M = K - L
    same = ~different[:, :, M:]
    q_ids = same.int().argmax(-1)  # a row's id: the first current token in its segment (itself at the latest)
    k_ids = q_ids
    if M > 0:  # memory keys share one id (transformers gives them 0): the id of a row that sees them as same
        mem_same = ~different[:, :, 0]
        first = q_ids.gather(1, mem_same.int().argmax(1, keepdim=True)).squeeze(1)
        mem_id = torch.where(mem_same.any(1), first, torch.full_like(first, -1))
        k_ids = torch.cat([mem_id[:, None].expand(B, M), q_ids], 1)
    rebuilt = F.one_hot((q_ids[:, :, None] != k_ids[:, None, :]).long(), 2).permute(1, 2, 0, 3)
    return (q_ids, k_ids) if torch.equal(rebuilt.to(seg_mat.dtype), seg_mat) else None


# ------------------------------------------------------------------------------------ patched forwards


def _heads(x: Tensor, w: Tensor) -> Tensor:
    """[L, B, C] @ [C, H, D] -> [B, H, L, D] (unit last stride)."""
    return (x @ w.flatten(1)).unflatten(-1, w.shape[1:]).permute(1, 2, 0, 3)


def relative_attention_forward(self, h, g, attn_mask_h, attn_mask_g, r, seg_mat, mems=None, target_mapping=None,
                               output_attentions=False):
    """XLNetRelativeAttention.forward on ptm_kernels.two_stream_attention / relative_attention."""
    fallback = lambda: original_forward(self, h, g, attn_mask_h, attn_mask_g, r, seg_mat, mems=mems,  # noqa: E731
                                        target_mapping=target_mapping, output_attentions=output_attentions)
    if output_attentions:
        return fallback()
    positions = weight = None
    if g is not None and target_mapping is not None:
        mapped = one_hot_positions(target_mapping)
        if mapped is None:
            return fallback()
        positions, weight = mapped
    seg_kw = {}
    if seg_mat is not None:
        ids = segment_ids(seg_mat)
        if ids is None:
            return fallback()
        seg_kw = dict(segment_ids=ids[0], key_segment_ids=ids[1], seg_embed=self.seg_embed, s_bias=self.r_s_bias)
    cat = torch.cat([mems, h], 0) if mems is not None and mems.dim() > 1 else h
    k, v = _heads(cat, self.k), _heads(cat, self.v)
    k_r = _heads(r.to(self.r.dtype), self.r)  # [B, H, R, D]: per batch row (bi_data)
    q_h = _heads(h, self.q)
    p = self.dropout.p if self.training else 0.0
    content_mask = visibility(attn_mask_h)
    to_ibnd = lambda vec: vec.permute(2, 0, 1, 3)  # noqa: E731  [B, H, L, D] -> transformers' [L, B, H, D]
    if g is None:
        out_h = pk.relative_attention(q_h, k, v, k_r, self.r_w_bias, self.r_r_bias, mask=content_mask, dropout_p=p,
                                      **seg_kw)
        return self.post_attention(h, to_ibnd(out_h)), None
    out_h, out_g = pk.two_stream_attention(q_h, _heads(g, self.q), k, v, k_r, self.r_w_bias, self.r_r_bias,
                                           query_positions=positions, content_mask=content_mask,
                                           query_mask=visibility(attn_mask_g, positions), dropout_p=p, **seg_kw)
    if weight is not None:
        out_g = out_g * weight[:, None, :, None].to(out_g.dtype)
    return self.post_attention(h, to_ibnd(out_h)), self.post_attention(g, to_ibnd(out_g))


def post_attention_forward(self, h: Tensor, attn_vec: Tensor, residual: bool = True) -> Tensor:
    """XLNetRelativeAttention.post_attention: output projection, dropout, residual add fused into the LayerNorm."""
    out = self.dropout(torch.einsum("ibnd,hnd->ibh", attn_vec, self.o))
    norm = self.layer_norm
    if not residual:
        return pk.layer_norm(out, norm.weight, norm.bias, norm.eps)
    return pk.layer_norm(out, norm.weight, norm.bias, norm.eps, residual=h)[0]


def feed_forward(self, inp: Tensor, *, fused: bool, approximate: Optional[str]) -> Tensor:
    """XLNetFeedForward: layer_2(act(layer_1 x)), bias+GELU in one kernel and the add fused into the LayerNorm."""
    fc = self.layer_1
    if approximate is None:
        x = self.activation_function(fc(inp))
    else:
        x = pk.bias_gelu(F.linear(inp, fc.weight), fc.bias, approximate) if fc.bias is not None else \
            pk.gelu(F.linear(inp, fc.weight), approximate)
    x = self.dropout(self.layer_2(self.dropout(x)))
    norm = self.layer_norm
    return pk.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=inp)[0] if fused else norm(x + inp)


def lm_head_forward(self, input_ids=None, *args, labels=None, logits_to_keep=0, return_dict=None, **kwargs):
    """XLNetLMHeadModel.forward: with labels, lm_loss and the cross-entropy as one linear_cross_entropy and
    logits=None; without (generate, evaluation) transformers' forward."""
    from transformers.modeling_utils import slice_logits_to_keep
    from transformers.models.xlnet.modeling_xlnet import XLNetLMHeadModelOutput

    if labels is None or args or return_dict is False:
        return original_forward(self, input_ids, *args, labels=labels, logits_to_keep=logits_to_keep,
                                return_dict=return_dict, **kwargs)
    kwargs.pop("num_items_in_batch", None)  # transformers' XLNet loss is a plain mean that does not read it
    outputs = self.transformer(input_ids, return_dict=True, **kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = pk.linear_cross_entropy(hidden, self.lm_loss.weight, labels.to(hidden.device), self.lm_loss.bias,
                                   ignore_index=IGNORE_INDEX)
    return XLNetLMHeadModelOutput(loss=loss, logits=None, mems=outputs.mems, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


# ------------------------------------------------------------------------------------------- family


@family("xlnet")
def patch_xlnet(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    from transformers.models.xlnet import modeling_xlnet as xlnet

    approximate = gelu_approximate(model.config.ff_activation) if opts.mlp else None
    for module in model.modules():
        if isinstance(module, xlnet.XLNetRelativeAttention):
            if opts.attention:
                set_forward(patcher, module, relative_attention_forward)
            if opts.norms:
                patcher.set_method(module, "post_attention", post_attention_forward)
        elif isinstance(module, xlnet.XLNetFeedForward) and (opts.norms or approximate is not None):
            set_forward(patcher, module, feed_forward, fused=opts.norms, approximate=approximate)
    if opts.loss and isinstance(model, xlnet.XLNetLMHeadModel):
        set_forward(patcher, model, lm_head_forward)
