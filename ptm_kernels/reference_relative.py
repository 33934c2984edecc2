"""Relative-position attention (Transformer-XL / XLNet) in plain PyTorch: the kernel interface of the
"reference" backend (re-exported by reference_kernels.py, so `backend.module("reference")` provides it).

    relative_attention_fwd(k, v, r, params: RelativeParams, s: RelativeStream)
    two_stream_attention_fwd(k, v, r, params, c: RelativeStream, g: RelativeStream)    (and the _bwd of each)

The public ops (ptm_kernels/ops/relative_attention.py) hand every backend already-prepared tensors, grouped
as in ptm_kernels/kernel_params.py (a stream's fields, then what the streams share in RelativeParams):

    q    [B, H, Lr, D]; u, v_bias [H, D] or None (0): the scores take qu = q + u (content term: qu_i . k_j)
         and qv = q + v_bias (position term: qv_i . r[t(i, j)]), formed in q's dtype (RelativeStream.biased)
    seg  float32 [B, H, Lr, 2] or None: seg[b, h, i, s] = (q_i + s_bias) . seg_embed[s] (XLNet's segment term),
         added as seg[..., 0] where q_ids[b, i] == k_ids[b, j] (same segment) and seg[..., 1] otherwise
    q_ids int64 [B, Lr], k_ids int64 [B, Lk] (or None, with seg None)
    positions int64 [B, Lr] or None: the position of each query row among the q_len rows of the current
         segment (None: row i is at position i; the query stream of XLNet with target_mapping passes the
         predicted positions)
    k, v [B, H, Lk, D]; r [B, H, R, D] (expanded, stride 0 on B when shared by the batch)

Score of row i (at position p_i) and key j, with p' = p_i + (Lk - q_len) the query's index among the keys:

    d = p' - j                     relative distance (>= 0: key in the past)
    t = r_offset - d               the row of r used; the term is 0 when t is outside [0, R)
    s_ij = scale * (qu_i . k_j + qv_i . r[t] + seg[i, same(i, j) ? 0 : 1])

then the visibility parts of the attention mask (evaluated at p' for causal / window / prefix-LM, at row i for
segment ids and the dense mask), softmax (a row with no visible key gives 0 and lse = -inf), dropout
(keep-mask of attention_dropout_mask(seed, ...) for the content / single stream, seed + 1 for the query
stream), and the weighted sum of v. All math in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from .dtypes import compute_dtype as _compute_dtype
from .kernel_params import Dropout, RelativeParams, RelativeStream, Visibility
from .reference_common import attention_dropout_mask, attention_mask_dense, empty_stats


def relative_visibility(B: int, H: int, Lr: int, Lk: int, q_len: int, positions: Optional[Tensor], device,
                        vis: Visibility) -> Tensor:
    """bool [B, H, Lr, Lk]: the mask's visibility with each row at its position (reference only: O(L^2))."""
    rows = _row_positions(Lr, positions, device) + (Lk - q_len)  # [B|1, Lr]
    return attention_mask_dense(B, H, Lr, Lk, device, vis, rows=rows)


def _row_positions(Lr: int, positions: Optional[Tensor], device) -> Tensor:
    if positions is None:
        return torch.arange(Lr, device=device).view(1, Lr)
    return positions.to(torch.int64)


def relative_index(Lr: int, Lk: int, q_len: int, r_offset: int, positions: Optional[Tensor], device) -> Tensor:
    """t(i, j) = r_offset - (p_i + Lk - q_len - j), int64 [B|1, Lr, Lk] (may fall outside [0, R))."""
    ip = _row_positions(Lr, positions, device) + (Lk - q_len)
    return r_offset - (ip[:, :, None] - torch.arange(Lk, device=device).view(1, 1, Lk))


def _scores(qu, qv, k, r, seg, q_ids, k_ids, positions, scale, r_offset, q_len):
    """-> (s [B, H, Lr, Lk] scaled scores, t clamped index, valid, diff) in the compute dtype."""
    cd = _compute_dtype(qu)
    B, H, Lr, _ = qu.shape
    Lk, R = k.shape[2], r.shape[2]
    t = relative_index(Lr, Lk, q_len, r_offset, positions, qu.device)  # [B|1, Lr, Lk]
    valid = ((t >= 0) & (t < R)).unsqueeze(1)
    tc = t.clamp(0, R - 1).unsqueeze(1).expand(B, H, Lr, Lk)
    pos = (qv.to(cd) @ r.to(cd).transpose(-1, -2))  # [B, H, Lr, R]: every row against every distance
    bd = pos.gather(-1, tc) * valid
    s = qu.to(cd) @ k.to(cd).transpose(-1, -2) + bd
    diff = None
    if seg is not None:
        diff = (q_ids.view(B, 1, Lr, 1) != k_ids.view(B, 1, 1, Lk))
        sc = seg.to(cd)
        s = s + torch.where(diff, sc[..., 1:2], sc[..., 0:1])
    return s * scale, tc, valid, diff


def _probs(k, r, p: RelativeParams, st: RelativeStream, qu: Tensor, qv: Tensor):
    B, H, Lr, _ = qu.shape
    Lk = k.shape[2]
    s, tc, valid, diff = _scores(qu, qv, k, r, st.seg, st.q_ids, p.k_ids, st.positions, p.scale, p.r_offset,
                                 p.q_len)
    vis = relative_visibility(B, H, Lr, Lk, p.q_len, st.positions, qu.device, st.vis)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # A +inf score makes the row NaN, as torch's softmax does (exp(inf - inf)); torch.logsumexp would say +inf.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    # A row with no visible key (lse = -inf) is shifted by 0: its probabilities are exp(-inf) = 0.
    p = torch.exp(s - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    return p, lse, tc, valid, diff


def relative_attention_fwd(k, v, r, p: RelativeParams, s: RelativeStream):
    """One stream -> (out [B, H, Lr, D] in q's dtype, lse [B, H, Lr] float32)."""
    probs, lse, _, _, _ = _probs(k, r, p, s, *s.biased())
    drop = p.dropout
    if drop.p > 0:
        B, H, Lr, Lk = probs.shape
        keep = attention_dropout_mask(drop.seed_value, drop.p, B, H, Lr, Lk, s.q.device)
        probs = probs * keep / (1.0 - drop.p)
    out = (probs @ v.to(probs.dtype)).to(s.q.dtype)
    return out, (lse if lse.dtype == torch.float64 else lse.float())


def relative_attention_bwd(dout, out, lse, k, v, r, params: RelativeParams, s: RelativeStream):
    """One stream -> (dq, du, dv_bias, dk, dv, dr, dseg), from the gradients of qu = q + u and qv = q + v_bias:

    With P the probabilities, Pd = P * keep / (1 - p) (dropout), dP = dO V^T * keep / (1 - p),
    delta_i = sum_d dO_id O_id and G = scale * P * (dP - delta) (the gradient of the unscaled score sum):
        dqu = G K,  dk = G^T QU,  dv = Pd^T dO
        dqv_i = sum_j G_ij r[t_ij],  dr[t] = sum_{(i, j): t_ij = t} G_ij qv_i   (valid t only)
        dseg[i, 0] = sum_{j same segment} G_ij,  dseg[i, 1] = sum_{j other segment} G_ij
        dq = dqu + dqv,  du = sum_{b, i} dqu,  dv_bias = sum_{b, i} dqv
    dq in q's dtype; du, dv_bias float32 [H, D] (empty where the bias is None); dk, dv in k's dtype; dr float32
    [B, H, R, D]; dseg float32 [B, H, Lr, 2] (empty without seg). The float32 results are float64 for float64.
    """
    seg, scale, drop = s.seg, params.scale, params.dropout
    qu, qv = s.biased()
    cd = _compute_dtype(qu)
    p, _, tc, valid, diff = _probs(k, r, params, s, qu, qv)
    B, H, Lr, Lk = p.shape
    R = r.shape[2]
    do = dout.to(cd)
    keep = None
    if drop.p > 0:
        keep = attention_dropout_mask(drop.seed_value, drop.p, B, H, Lr, Lk, qu.device).to(cd) / (1.0 - drop.p)
    pd = p * keep if keep is not None else p
    dv = pd.transpose(-1, -2) @ do
    dp = do @ v.to(cd).transpose(-1, -2)
    if keep is not None:
        dp = dp * keep
    delta = (do * out.to(cd)).sum(-1, keepdim=True)
    g = scale * p * (dp - delta)
    dqu = g @ k.to(cd)
    dk = g.transpose(-1, -2) @ qu.to(cd)
    dpos = torch.zeros(B, H, Lr, R, dtype=cd, device=qu.device)
    dpos.scatter_add_(-1, tc, g * valid)  # back through the gather: one entry per (i, j)
    dqv = dpos @ r.to(cd)
    dr = dpos.transpose(-1, -2) @ qv.to(cd)
    stat = (lambda x: x) if cd == torch.float64 else (lambda x: x.float())
    if seg is not None:
        dseg = torch.stack([(g * ~diff).sum(-1), (g * diff).sum(-1)], dim=-1)
        dseg = stat(dseg)
    else:
        dseg = empty_stats(qu)
    return ((dqu + dqv).to(s.q.dtype), *_query_bias_grads(s, dqu, dqv, stat), dk.to(k.dtype), dv.to(v.dtype),
            stat(dr), dseg)


def _query_bias_grads(s: RelativeStream, dqu: Tensor, dqv: Tensor, stat) -> Tuple[Tensor, Tensor]:
    """(du, dv_bias): the row sums of dqu, dqv over batch and rows ([H, D], `stat`'s dtype), empty where the
    bias is None."""
    return tuple(stat(d.sum((0, 2))) if b is not None else empty_stats(s.q)
                 for b, d in ((s.u, dqu), (s.v_bias, dqv)))


# Two streams (XLNet): the content stream (c) and the query stream (g) against the same k, v, r. The query
# stream's dropout uses seed + 1. A backend may fuse them into one launch; here they simply run one after the
# other. dk, dv, dr are summed over the streams.

def _query_stream(p: RelativeParams) -> RelativeParams:
    """The shared parameters as the query stream draws its dropout: seed + 1."""
    if p.dropout.seed is None:
        return p
    return dataclasses.replace(p, dropout=Dropout(p=p.dropout.p, seed=p.dropout.seed + 1))


def two_stream_attention_fwd(k, v, r, p: RelativeParams, c: RelativeStream, g: RelativeStream):
    """-> (out_c, lse_c, out_g, lse_g)."""
    oc, lc = relative_attention_fwd(k, v, r, p, c)
    og, lg = relative_attention_fwd(k, v, r, _query_stream(p), g)
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, p: RelativeParams,
                             c: RelativeStream, g: RelativeStream):
    """-> (dq_c, du_c, dv_bias_c, dseg_c, dq_g, du_g, dv_bias_g, dseg_g, dk, dv, dr) (each stream's as in
    relative_attention_bwd); dk, dv, dr summed over both streams."""
    dq_c, du_c, dvb_c, dk_c, dv_c, dr_c, dseg_c = relative_attention_bwd(dout_c, out_c, lse_c, k, v, r, p, c)
    dq_g, du_g, dvb_g, dk_g, dv_g, dr_g, dseg_g = relative_attention_bwd(dout_g, out_g, lse_g, k, v, r,
                                                                         _query_stream(p), g)
    dk = (dk_c.to(_compute_dtype(k)) + dk_g.to(_compute_dtype(k))).to(k.dtype)
    dv = (dv_c.to(_compute_dtype(v)) + dv_g.to(_compute_dtype(v))).to(v.dtype)
    return dq_c, du_c, dvb_c, dseg_c, dq_g, du_g, dvb_g, dseg_g, dk, dv, dr_c + dr_g
