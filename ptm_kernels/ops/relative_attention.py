"""Relative-position attention (Transformer-XL, XLNet): `ptm::relative_attention`, `ptm::two_stream_attention`
and their backward ops.

    out = ptm_kernels.relative_attention(q, k, v, r, u, v_bias, mask=AttentionMask.causal(), scale=1/8)
    h, g = ptm_kernels.two_stream_attention(q_h, q_g, k, v, r, u, v_bias, content_mask=..., query_mask=...,
                                            query_positions=pos, segment_ids=seg, seg_embed=e, s_bias=s)

Position convention (one formula for both papers). Query row i (at position p_i of the current segment; p_i = i
except in the query stream with `query_positions`) sits at index p' = p_i + (Lk - Lq) among the keys (memory
first: Lk = M + Lq). Its relative distance to key j is d = p' - j (positive = key in the past), and the
position term uses row

    t = r_offset - d = r_offset - (i + Lk - Lq - j)

of r; when t falls outside [0, R) the position term is 0 (such pairs are normally masked). r is ordered by
decreasing distance, as both papers build it, and r_offset is the row holding distance 0:

  * Transformer-XL: pos_seq = arange(klen - 1, -1, -1) (R = Lk rows: distances Lk - 1 ... 0), so
    r_offset = Lk - 1. Example: M = 2, Lq = 3, Lk = 5: query i = 0 is key index p' = 2; key j = 0 is at
    distance 2, uses r row 4 - 2 = 2 (pos_seq[2] = 2); key j = 2 (itself) uses row 4 (pos_seq[4] = 0).
    This is exactly the padded `_rel_shift` (x[i, j] = BD[i, j + Lq - 1 - i]) on every causal-visible pair.
  * XLNet: pos_seq = arange(klen, -qlen, -1) (attn_type "bi", R = Lk + Lq rows: distances Lk ... -Lq + 1)
    or arange(klen, -1, -1) ("uni", R = Lk + 1), so r_offset = Lk. Example: M = 0, Lq = Lk = 3
    (pos_seq = [3, 2, 1, 0, -1, -2]): query 0, key 2 is at distance -2 and uses row t = 3 - (0 - 2) = 5
    (pos_seq[5] = -2); query 2, key 0 uses t = 3 - 2 = 1 (pos_seq[1] = 2). This is exactly `rel_shift_bnij` (bd[i, j] = BD[i, j + Lq - i]).
  * bi_data (XLNet): the batch halves use different r: pass r as [B, H, R, D].
  * clamp_len: clamp pos_seq before embedding it, as the papers do; the rows keep their places.
  * Default r_offset: Lk when R > Lk (XLNet), else Lk - 1 (Transformer-XL). A given r_offset must leave some pair
    a row of r (1 - Lq <= r_offset <= R + Lk - 2), else it raises: the position term would be 0 everywhere.

Score (before the mask): scale * [(q_i + u)·k_j + (q_i + v_bias)·r[t] + (q_i + s_bias)·seg_embed[s(i, j)]],
s(i, j) = 0 when segment_ids[b, p_i] == key_segment_ids[b, j] (same segment), else 1 (XLNet's one-hot seg_mat:
seg_embed[0] is "same", seg_embed[1] "different"). key_segment_ids defaults to [0] * M + segment_ids (XLNet
gives memory the segment id 0). Any visibility part of an AttentionMask applies (causal is bottom-right
aligned, i.e. key j visible iff j <= p'; sliding_window(M, 0) & causal() is Transformer-XL's same_length; an
XLNet permutation / padding mask goes in as a dense bool part, True = visible); additive bias and Toeplitz
parts are refused (the position term is the bias). A row that sees no key gives zeros.

Implementation: the op takes q, u and v_bias and returns their gradients itself: q + u and q + v_bias are formed
inside it (in q's dtype, as the eager models do; RelativeStream.biased) and never saved for the backward, and
dq = d(q + u) + d(q + v_bias) comes out of the kernels summed (the Triton dq kernel keeps one accumulator for it).
The segment term is reduced to two numbers per row, (q_i + s_bias)·seg_embed[0|1] (float32, [B, H, Lq, 2]),
before the op: autograd carries its gradients to q, s_bias and seg_embed. The op takes these, k, v, r, the ids
and the mask's visibility, as a RelativeParams and one RelativeStream per stream (ptm_kernels/kernel_params.py;
kernel interface: ptm_kernels/reference_relative.py).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _checks, backend
from ..attention_mask import AttentionMask
from ..dtypes import compute_dtype
from ..kernel_params import Dropout, RelativeParams, RelativeStream
from ._op_args import OpArgs
from .attention import _scale, _seed, _unit_stride

MAX_HEAD_DIM = 256
_OP = "relative_attention"

# The ops' flat arguments, derived from the parameter objects (ops/_op_args.py): k, v, r, the RelativeParams the
# streams share, then each stream's RelativeStream (two-stream: the content stream c, then the query stream g).
ARGS = OpArgs(("k", Tensor), ("v", Tensor), ("r", Tensor), ("", RelativeParams), ("s", RelativeStream))
BACKWARD_ARGS = OpArgs(("dout", Tensor), ("out", Tensor), ("lse", Tensor), ("k", Tensor), ("v", Tensor),
                       ("r", Tensor), ("", RelativeParams), ("s", RelativeStream))
TWO_STREAM_ARGS = OpArgs(("k", Tensor), ("v", Tensor), ("r", Tensor), ("", RelativeParams), ("c", RelativeStream),
                         ("g", RelativeStream))
TWO_STREAM_BACKWARD_ARGS = OpArgs(
    ("dout_c", Tensor), ("out_c", Tensor), ("lse_c", Tensor), ("dout_g", Tensor), ("out_g", Tensor),
    ("lse_g", Tensor), ("k", Tensor), ("v", Tensor), ("r", Tensor), ("", RelativeParams), ("c", RelativeStream),
    ("g", RelativeStream))

# ------------------------------------------------------------------------------------------ the ops


def _expand(k: Tensor, r: Tensor, *streams: RelativeStream):
    """r and the streams' broadcast parts as the kernels take them: views expanded to [B, H, ...], no copy."""
    B, H, Lk = k.shape[0], k.shape[1], k.shape[2]
    return (r.expand(B, *r.shape[1:]),) + tuple(s.expanded(B, H, Lk) for s in streams)


def _stream_fake(s: RelativeStream, v: Tensor):
    B, H, Lr, _ = s.q.shape
    return s.q.new_empty(B, H, Lr, v.shape[-1]), s.q.new_empty(B, H, Lr, dtype=compute_dtype(s.q))


def _stream_grads_fake(s: RelativeStream):
    """(dq, du, dv_bias, dseg) of the kernel interface's backward (reference_relative.relative_attention_bwd)."""
    def bias(b):
        return s.q.new_empty(b.shape, dtype=compute_dtype(s.q)) if b is not None else s.q.new_empty(0)

    dseg = s.seg.new_empty(s.seg.shape) if s.seg is not None else s.q.new_empty(0)
    return s.q.new_empty(s.q.shape), bias(s.u), bias(s.v_bias), dseg


def _stream_grads(name: str, s: RelativeStream, dq, du, dv_bias, dseg) -> dict:
    """The gradients of one stream's op arguments (the biases' in their own dtype)."""
    return {f"{name}.q": dq, f"{name}.u": du.to(s.u.dtype) if s.u is not None else None,
            f"{name}.v_bias": dv_bias.to(s.v_bias.dtype) if s.v_bias is not None else None,
            f"{name}.seg": dseg if s.seg is not None else None}


@ARGS.custom_op("ptm::relative_attention", returns=Tuple[Tensor, Tensor])
def _relative_attention(k: Tensor, v: Tensor, r: Tensor, params: RelativeParams, s: RelativeStream):
    r, s = _expand(k, r, s)
    out, lse = backend.kernels(_OP, s.q, k).relative_attention_fwd(k, v, r, params, s)
    return out, lse


@ARGS.register_fake(_relative_attention)
def _(k, v, r, params, s):
    return _stream_fake(s, v)


@BACKWARD_ARGS.custom_op("ptm::relative_attention_backward",
                         returns=Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor])
def _relative_attention_backward(dout: Tensor, out: Tensor, lse: Tensor, k: Tensor, v: Tensor, r: Tensor,
                                 params: RelativeParams, s: RelativeStream):
    r_full, s = _expand(k, r, s)
    dq, du, dv_bias, dk, dv, dr, dseg = backend.kernels(_OP, s.q, k).relative_attention_bwd(
        dout, out, lse, k, v, r_full, params, s)
    return dq, du, dv_bias, dk, dv, dr.sum_to_size(r.shape).to(r.dtype), dseg


@BACKWARD_ARGS.register_fake(_relative_attention_backward)
def _(dout, out, lse, k, v, r, params, s):
    dq, du, dv_bias, dseg = _stream_grads_fake(s)
    return dq, du, dv_bias, k.new_empty(k.shape), v.new_empty(v.shape), r.new_empty(r.shape), dseg


def _rel_setup(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ARGS.save(ctx, inputs, out, lse)


def _rel_grad(ctx, dout, _dlse):
    (out, lse), (k, v, r, params, s) = ARGS.saved(ctx)
    dq, du, dv_bias, dk, dv, dr, dseg = BACKWARD_ARGS.call(_relative_attention_backward, _unit_stride(dout), out,
                                                           lse, k, v, r, params, s)
    return ARGS.grads({"k": dk, "v": dv, "r": dr, **_stream_grads("s", s, dq, du, dv_bias, dseg)})


_relative_attention.register_autograd(_rel_grad, setup_context=_rel_setup)


@TWO_STREAM_ARGS.custom_op("ptm::two_stream_attention", returns=Tuple[Tensor, Tensor, Tensor, Tensor])
def _two_stream(k: Tensor, v: Tensor, r: Tensor, params: RelativeParams, c: RelativeStream, g: RelativeStream):
    r, c, g = _expand(k, r, c, g)
    oc, lc, og, lg = backend.kernels(_OP, c.q, k).two_stream_attention_fwd(k, v, r, params, c, g)
    return oc, lc, og, lg


@TWO_STREAM_ARGS.register_fake(_two_stream)
def _(k, v, r, params, c, g):
    return _stream_fake(c, v) + _stream_fake(g, v)


@TWO_STREAM_BACKWARD_ARGS.custom_op("ptm::two_stream_attention_backward",
                                    returns=Tuple[(Tensor,) * 11])
def _two_stream_backward(dout_c: Tensor, out_c: Tensor, lse_c: Tensor, dout_g: Tensor, out_g: Tensor, lse_g: Tensor,
                         k: Tensor, v: Tensor, r: Tensor, params: RelativeParams, c: RelativeStream,
                         g: RelativeStream):
    r_full, c, g = _expand(k, r, c, g)
    *streams, dk, dv, dr = backend.kernels(_OP, c.q, k).two_stream_attention_bwd(
        dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r_full, params, c, g)
    return (*streams, dk, dv, dr.sum_to_size(r.shape).to(r.dtype))


@TWO_STREAM_BACKWARD_ARGS.register_fake(_two_stream_backward)
def _(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, params, c, g):
    return _stream_grads_fake(c) + _stream_grads_fake(g) + (k.new_empty(k.shape), v.new_empty(v.shape),
                                                            r.new_empty(r.shape))


def _ts_setup(ctx, inputs, output):
    oc, lc, og, lg = output
    ctx.mark_non_differentiable(lc, lg)
    TWO_STREAM_ARGS.save(ctx, inputs, oc, lc, og, lg)


def _ts_grad(ctx, dout_c, _dlc, dout_g, _dlg):
    (oc, lc, og, lg), (k, v, r, params, c, g) = TWO_STREAM_ARGS.saved(ctx)
    grads = TWO_STREAM_BACKWARD_ARGS.call(
        _two_stream_backward, _unit_stride(dout_c), oc, lc, _unit_stride(dout_g), og, lg, k, v, r, params, c, g)
    dk, dv, dr = grads[8:]
    return TWO_STREAM_ARGS.grads({"k": dk, "v": dv, "r": dr, **_stream_grads("c", c, *grads[:4]),
                                  **_stream_grads("g", g, *grads[4:8])})


_two_stream.register_autograd(_ts_grad, setup_context=_ts_setup)


# -------------------------------------------------------------------------------------- public API


def relative_attention(q: Tensor, k: Tensor, v: Tensor, r: Tensor, u: Optional[Tensor] = None,
                       v_bias: Optional[Tensor] = None, *, scale: Optional[float] = None,
                       r_offset: Optional[int] = None, mask: Optional[AttentionMask] = None,
                       segment_ids: Optional[Tensor] = None, key_segment_ids: Optional[Tensor] = None,
                       seg_embed: Optional[Tensor] = None, s_bias: Optional[Tensor] = None,
                       dropout_p: float = 0.0, seed: Optional[Union[int, Tensor]] = None,
                       generator: Optional[torch.Generator] = None, return_lse: bool = False):
    """Transformer-XL / XLNet relative attention, fused; see the module docstring for the position convention.

    q [B, H, Lq, D]; k, v [B, H, Lk, D] (memory first, Lk = M + Lq); r [H, R, D] or [B|1, H, R, D] (the
    projected position embeddings, decreasing distance); u, v_bias (r_w_bias, r_r_bias) [H, D] or None;
    scale: Transformer-XL and XLNet use 1/sqrt(D) (the default). Segment term (XLNet): segment_ids int [B, Lq],
    key_segment_ids int [B, Lk] (default: zeros for the memory, then segment_ids), seg_embed [2, H, D], s_bias
    (r_s_bias) [H, D] or None. mask: an AttentionMask of visibility parts (Transformer-XL: causal(); XLNet:
    dense(~perm_mask) etc.). Dropout of the probabilities as in ptm_kernels.attention. With return_lse, also
    the float32 [B, H, Lq] log-sum-exp of each row's scores.

    Returns [B, H, Lq, D] in q's dtype. Gradients flow to q, k, v, r, u, v_bias, s_bias and seg_embed.
    """
    B, H, Lq, D = _check_common(q, k, v, r, u, v_bias)
    shared, seg_fn = _shared(q, k, v, r, scale, r_offset, segment_ids, key_segment_ids, seg_embed, s_bias,
                             dropout_p, seed, generator)
    stream = _stream("mask", q, u, v_bias, seg_fn, None, mask, k.shape[2], Lq)
    out, lse = ARGS.call(_relative_attention, *shared, stream)
    return (out, lse) if return_lse else out


def two_stream_attention(q_content: Tensor, q_query: Tensor, k: Tensor, v: Tensor, r: Tensor,
                         u: Optional[Tensor] = None, v_bias: Optional[Tensor] = None, *,
                         query_positions: Optional[Tensor] = None, scale: Optional[float] = None,
                         r_offset: Optional[int] = None, content_mask: Optional[AttentionMask] = None,
                         query_mask: Optional[AttentionMask] = None, segment_ids: Optional[Tensor] = None,
                         key_segment_ids: Optional[Tensor] = None, seg_embed: Optional[Tensor] = None,
                         s_bias: Optional[Tensor] = None, dropout_p: float = 0.0,
                         seed: Optional[Union[int, Tensor]] = None, generator: Optional[torch.Generator] = None
                         ) -> Tuple[Tensor, Tensor]:
    """XLNet's two-stream attention in one op: -> (content_out [B, H, Lq, D], query_out [B, H, Lg, D]).

    q_content [B, H, Lq, D] (the h stream), q_query [B, H, Lg, D] (the g stream) attend to the same k, v, r
    with their own masks; every other argument is as in `relative_attention`. The query stream may have fewer
    rows (Lg < Lq, XLNet's target_mapping with one-hot rows): `query_positions` int [B, Lg] gives the position
    (0 <= p < Lq) of each query-stream row in the current segment; it defaults to 0..Lq-1 (then Lg must equal
    Lq). For a query-stream row, the relative position, the segment id and the analytic mask parts (causal,
    window, prefix-LM) use its position; the row-indexed parts of `query_mask` (a dense mask, segment ids of a
    segments() part) have Lg rows. HF's `einsum("mbnd,mlb->lbnd", q_g, target_mapping)` with a one-hot mapping
    is `query_positions = target_mapping.argmax(1).T`; pass `query_mask` = the visibility of those rows.
    """
    B, H, Lq, D = _check_common(q_content, k, v, r, u, v_bias)
    _checks.tensor("q_query", q_query, dim=4)
    _checks.same_dtype("q_content", q_content, q_query=q_query)
    _checks.same_device("q_content", q_content, q_query=q_query)
    Lg = q_query.shape[2]
    if q_query.shape[0] != B or q_query.shape[1] != H or q_query.shape[3] != D:
        raise ValueError(f"q_query must have shape [B={B}, H={H}, Lg, D={D}], got {tuple(q_query.shape)}")
    Lk = k.shape[2]
    if query_positions is None:
        if Lg != Lq:
            raise ValueError(f"q_query has {Lg} rows but q_content has {Lq}: pass query_positions [B, {Lg}] (the "
                             f"position of each query-stream row)")
    else:
        _checks.tensor("query_positions", query_positions, dtypes=(torch.int64, torch.int32))
        _checks.same_device("q_content", q_content, query_positions=query_positions)
        if query_positions.dim() == 1:
            query_positions = query_positions.unsqueeze(0)
        if query_positions.dim() != 2 or query_positions.shape[0] not in (1, B) or query_positions.shape[1] != Lg:
            raise ValueError(f"query_positions must have shape [B={B} or 1, Lg={Lg}], got "
                             f"{tuple(query_positions.shape)}")
        query_positions = query_positions.to(torch.int64).expand(B, Lg).contiguous()
        _checks.values_in("query_positions", query_positions, 0, Lq, f"[0, Lq = {Lq})")
    shared, seg_fn = _shared(q_content, k, v, r, scale, r_offset, segment_ids, key_segment_ids, seg_embed, s_bias,
                             dropout_p, seed, generator)
    sc = _stream("content_mask", q_content, u, v_bias, seg_fn, None, content_mask, Lk, Lq)
    sg = _stream("query_mask", q_query, u, v_bias, seg_fn, query_positions, query_mask, Lk, Lq)
    oc, _, og, _ = TWO_STREAM_ARGS.call(_two_stream, *shared, sc, sg)
    return oc, og


# ------------------------------------------------------------------------------------------- helpers


def _shared(q, k, v, r, scale, r_offset, segment_ids, key_segment_ids, seg_embed, s_bias, dropout_p, seed,
            generator):
    """(k, v, r, RelativeParams): the op arguments the streams share, and a function giving one stream's segment
    arguments."""
    B, H, Lq, D = q.shape
    Lk, R = k.shape[2], r.shape[-2]
    scale = _scale(scale, D)
    if r_offset is None:
        r_offset = Lk if R > Lk else Lk - 1
    if isinstance(r_offset, bool) or not isinstance(r_offset, int):
        raise ValueError(f"r_offset must be an int (the row of r holding relative distance 0), got {r_offset!r}")
    # Pairs use rows t = r_offset - d of r for distances d in [1 - Lq, Lk - 1]; outside this range no pair finds
    # its row and the position term would silently be 0 everywhere.
    lo, hi = 1 - Lq, R + Lk - 2
    if Lq and Lk and not lo <= r_offset <= hi:
        raise ValueError(f"r_offset must lie in [1 - Lq, R + Lk - 2] = [{lo}, {hi}] (Lq = {Lq} queries, Lk = {Lk} "
                         f"keys, R = {R} rows of r), so that some (query, key) pair's distance has a row of r; "
                         f"got {r_offset}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    r4 = r if r.dim() == 4 else r.unsqueeze(0)
    seg_fn = _segments(q, Lk, segment_ids, key_segment_ids, seg_embed, s_bias)
    k_ids = seg_fn.k_ids if seg_fn is not None else None
    params = RelativeParams(k_ids=k_ids, scale=scale, r_offset=int(r_offset), q_len=Lq,
                            dropout=Dropout(p=float(dropout_p), seed=_seed(dropout_p, seed, generator)))
    return (_unit_stride(k), _unit_stride(v), _unit_stride(r4), params), seg_fn


class _Segments:
    def __init__(self, q_ids, k_ids, seg_embed, s_bias):
        self.q_ids, self.k_ids, self.seg_embed, self.s_bias = q_ids, k_ids, seg_embed, s_bias

    def __call__(self, q, positions):
        """(seg [B, H, Lr, 2] float32, q_ids of the rows [B, Lr])."""
        cd = compute_dtype(q)
        qs = q.to(cd) if self.s_bias is None else q.to(cd) + self.s_bias.to(cd)[None, :, None, :]
        seg = torch.einsum("bhid,shd->bhis", qs, self.seg_embed.to(cd))
        ids = self.q_ids if positions is None else self.q_ids.gather(1, positions)
        return seg, ids


def _segments(q, Lk, segment_ids, key_segment_ids, seg_embed, s_bias) -> Optional[_Segments]:
    B, H, Lq, D = q.shape
    if seg_embed is None:
        if segment_ids is not None or key_segment_ids is not None or s_bias is not None:
            raise ValueError("segment_ids / key_segment_ids / s_bias need seg_embed (the [2, H, D] segment "
                             "embeddings); give seg_embed with segment_ids")
        return None
    _checks.tensor("seg_embed", seg_embed)
    _checks.shape("seg_embed", seg_embed, (2, H, D))
    _checks.same_device("q", q, seg_embed=seg_embed)
    if s_bias is not None:
        _checks.tensor("s_bias", s_bias)
        _checks.shape("s_bias", s_bias, (H, D))
        _checks.same_device("q", q, s_bias=s_bias)
    if segment_ids is None:
        raise ValueError("seg_embed needs segment_ids (int [B, Lq]: the segment of each query)")

    def ids(name, t, L):
        _checks.tensor(name, t, dtypes=(torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool))
        _checks.same_device("q", q, **{name: t})
        t = t.unsqueeze(0) if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[0] not in (1, B) or t.shape[1] != L:
            raise ValueError(f"{name} must have shape [B={B} or 1, {L}], got {tuple(t.shape)}")
        return t.to(torch.int64).expand(B, L).contiguous()

    q_ids = ids("segment_ids", segment_ids, Lq)
    if key_segment_ids is None:
        if Lk < Lq:
            raise ValueError(f"key_segment_ids is needed when Lk ({Lk}) < Lq ({Lq})")
        k_ids = torch.cat([q_ids.new_zeros(B, Lk - Lq), q_ids], dim=1)
    else:
        k_ids = ids("key_segment_ids", key_segment_ids, Lk)
    return _Segments(q_ids, k_ids, seg_embed, s_bias)


def _stream(mask_name, q, u, v_bias, seg_fn, positions, mask, Lk, Lq) -> RelativeStream:
    """One stream's op arguments: q, u, v_bias, segment term, ids, positions, visibility."""
    B, H, Lr, D = q.shape
    seg, q_ids = seg_fn(q, positions) if seg_fn is not None else (None, None)
    if mask is None:
        mask = AttentionMask()
    elif not isinstance(mask, AttentionMask):
        raise TypeError(f"{mask_name} must be an AttentionMask or None, got {type(mask).__name__}; wrap a bool "
                        f"tensor (True = visible) with AttentionMask.dense(...)")
    if mask.additive_bias is not None or mask.toeplitz_table is not None:
        raise ValueError(f"{mask_name}: relative attention takes visibility parts only (causal, sliding_window, "
                         f"key_padding, prefix_lm, segments, dense); additive bias and Toeplitz parts are not "
                         f"supported (the position term r is the relative bias)")
    return RelativeStream(q=_unit_stride(q), u=u, v_bias=v_bias, seg=seg, q_ids=q_ids, positions=positions,
                          vis=mask.visibility(B, H, Lr, Lk, q.device))


def _check_common(q, k, v, r, u, v_bias):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dim=4)
    _checks.tensor("r", r)
    _checks.same_dtype("q", q, k=k, v=v, r=r)
    _checks.same_device("q", q, k=k, v=v, r=r, u=u, v_bias=v_bias)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if tuple(k.shape) != (B, H, Lk, D):
        raise ValueError(f"k must have shape [B={B}, H={H}, Lk, D={D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if r.dim() not in (3, 4) or r.shape[-3] != H or r.shape[-1] != D or (r.dim() == 4 and r.shape[0] not in (1, B)):
        raise ValueError(f"r must have shape [H={H}, R, D={D}] or [B={B} or 1, H, R, D], got {tuple(r.shape)}")
    if r.shape[-2] == 0:
        raise ValueError("r must have at least one row (R > 0)")
    for name, t in (("u", u), ("v_bias", v_bias)):
        if t is not None:
            _checks.tensor(name, t)
            _checks.shape(name, t, (H, D))
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q, k, v, r) must be in [1, {MAX_HEAD_DIM}], got {D}")
    return B, H, Lq, D  # B, H, Lq or Lk may be 0: an empty result (zeros for rows without keys)
