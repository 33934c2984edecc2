"""Relative-position attention (Transformer-XL / XLNet) in plain PyTorch: the kernel interface of the
"reference" backend (re-exported by reference_kernels.py, so `backend.module("reference")` provides it).

The public ops (ptm_kernels/ops/relative_attention.py) hand every backend already-prepared tensors:

    qu   [B, H, Lr, D]  q + u        (content term:  qu_i . k_j)
    qv   [B, H, Lr, D]  q + v_bias   (position term: qv_i . r[t(i, j)])
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

from typing import Optional

import torch
from torch import Tensor

from .reference_kernels import _compute_dtype, attention_dropout_mask, attention_mask_dense, empty_stats


def relative_visibility(B: int, H: int, Lr: int, Lk: int, q_len: int, positions: Optional[Tensor], device,
                        causal: bool, window_left: int, window_right: int, key_lengths, prefix_lengths,
                        q_segments, k_segments, dense_mask) -> Tensor:
    """bool [B, H, Lr, Lk]: the mask's visibility with each row at its position (reference only: O(L^2))."""
    rows = _row_positions(Lr, positions, device) + (Lk - q_len)  # [B|1, Lr]
    return attention_mask_dense(B, H, Lr, Lk, device, causal, window_left, window_right, key_lengths,
                                prefix_lengths, q_segments, k_segments, dense_mask, rows=rows)


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


def _probs(qu, qv, k, r, seg, q_ids, k_ids, positions, scale, r_offset, q_len, vis_args):
    B, H, Lr, _ = qu.shape
    Lk = k.shape[2]
    s, tc, valid, diff = _scores(qu, qv, k, r, seg, q_ids, k_ids, positions, scale, r_offset, q_len)
    vis = relative_visibility(B, H, Lr, Lk, q_len, positions, qu.device, *vis_args)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # A +inf score makes the row NaN, as torch's softmax does (exp(inf - inf)); torch.logsumexp would say +inf.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    # A row with no visible key (lse = -inf) is shifted by 0: its probabilities are exp(-inf) = 0.
    p = torch.exp(s - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    return p, lse, tc, valid, diff


def relative_attention_fwd(k, v, r, k_ids, scale: float, r_offset: int, q_len: int, dropout_p: float, seed: int,
                           qu, qv, seg, q_ids, positions, causal: bool, window_left: int, window_right: int,
                           key_lengths, prefix_lengths, q_segments, k_segments, dense_mask):
    """One stream -> (out [B, H, Lr, D] in qu's dtype, lse [B, H, Lr] float32)."""
    vis_args = (causal, window_left, window_right, key_lengths, prefix_lengths, q_segments, k_segments, dense_mask)
    p, lse, _, _, _ = _probs(qu, qv, k, r, seg, q_ids, k_ids, positions, scale, r_offset, q_len, vis_args)
    if dropout_p > 0:
        B, H, Lr, Lk = p.shape
        p = p * attention_dropout_mask(seed, dropout_p, B, H, Lr, Lk, qu.device) / (1.0 - dropout_p)
    out = (p @ v.to(p.dtype)).to(qu.dtype)
    return out, (lse if lse.dtype == torch.float64 else lse.float())


def relative_attention_bwd(dout, out, lse, k, v, r, k_ids, scale: float, r_offset: int, q_len: int,
                           dropout_p: float, seed: int, qu, qv, seg, q_ids, positions, causal: bool,
                           window_left: int, window_right: int, key_lengths, prefix_lengths, q_segments,
                           k_segments, dense_mask):
    """One stream -> (dqu, dqv, dk, dv, dr, dseg).

    With P the probabilities, Pd = P * keep / (1 - p) (dropout), dP = dO V^T * keep / (1 - p),
    delta_i = sum_d dO_id O_id and G = scale * P * (dP - delta) (the gradient of the unscaled score sum):
        dqu = G K,  dk = G^T QU,  dv = Pd^T dO
        dqv_i = sum_j G_ij r[t_ij],  dr[t] = sum_{(i, j): t_ij = t} G_ij qv_i   (valid t only)
        dseg[i, 0] = sum_{j same segment} G_ij,  dseg[i, 1] = sum_{j other segment} G_ij
    dqu, dqv in qu's dtype; dk, dv in k's dtype; dr float32 [B, H, R, D]; dseg float32 [B, H, Lr, 2] (empty
    without seg).
    """
    cd = _compute_dtype(qu)
    vis_args = (causal, window_left, window_right, key_lengths, prefix_lengths, q_segments, k_segments, dense_mask)
    p, _, tc, valid, diff = _probs(qu, qv, k, r, seg, q_ids, k_ids, positions, scale, r_offset, q_len, vis_args)
    B, H, Lr, Lk = p.shape
    R = r.shape[2]
    do = dout.to(cd)
    keep = None
    if dropout_p > 0:
        keep = attention_dropout_mask(seed, dropout_p, B, H, Lr, Lk, qu.device).to(cd) / (1.0 - dropout_p)
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
    return dqu.to(qu.dtype), dqv.to(qv.dtype), dk.to(k.dtype), dv.to(v.dtype), stat(dr), dseg


# Two streams (XLNet): the content stream (c) and the query stream (g) against the same k, v, r. The query
# stream's dropout uses seed + 1. A backend may fuse them into one launch; here they simply run one after the
# other. dk, dv, dr are summed over the streams.

def two_stream_attention_fwd(k, v, r, k_ids, scale: float, r_offset: int, q_len: int, dropout_p: float, seed: int,
                             qu_c, qv_c, seg_c, q_ids_c, positions_c, causal_c: bool, wl_c: int, wr_c: int,
                             kl_c, pl_c, qs_c, ks_c, dense_c,
                             qu_g, qv_g, seg_g, q_ids_g, positions_g, causal_g: bool, wl_g: int, wr_g: int,
                             kl_g, pl_g, qs_g, ks_g, dense_g):
    """-> (out_c, lse_c, out_g, lse_g)."""
    shared = (k, v, r, k_ids, scale, r_offset, q_len, dropout_p)
    oc, lc = relative_attention_fwd(*shared, seed, qu_c, qv_c, seg_c, q_ids_c, positions_c, causal_c, wl_c, wr_c,
                                    kl_c, pl_c, qs_c, ks_c, dense_c)
    og, lg = relative_attention_fwd(*shared, seed + 1, qu_g, qv_g, seg_g, q_ids_g, positions_g, causal_g, wl_g,
                                    wr_g, kl_g, pl_g, qs_g, ks_g, dense_g)
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, k_ids, scale: float,
                             r_offset: int, q_len: int, dropout_p: float, seed: int,
                             qu_c, qv_c, seg_c, q_ids_c, positions_c, causal_c: bool, wl_c: int, wr_c: int,
                             kl_c, pl_c, qs_c, ks_c, dense_c,
                             qu_g, qv_g, seg_g, q_ids_g, positions_g, causal_g: bool, wl_g: int, wr_g: int,
                             kl_g, pl_g, qs_g, ks_g, dense_g):
    """-> (dqu_c, dqv_c, dseg_c, dqu_g, dqv_g, dseg_g, dk, dv, dr); dk, dv, dr summed over both streams."""
    shared = (k, v, r, k_ids, scale, r_offset, q_len, dropout_p)
    c = relative_attention_bwd(dout_c, out_c, lse_c, *shared, seed, qu_c, qv_c, seg_c, q_ids_c, positions_c,
                               causal_c, wl_c, wr_c, kl_c, pl_c, qs_c, ks_c, dense_c)
    g = relative_attention_bwd(dout_g, out_g, lse_g, *shared, seed + 1, qu_g, qv_g, seg_g, q_ids_g, positions_g,
                               causal_g, wl_g, wr_g, kl_g, pl_g, qs_g, ks_g, dense_g)
    dk = (c[2].to(_compute_dtype(k)) + g[2].to(_compute_dtype(k))).to(k.dtype)
    dv = (c[3].to(_compute_dtype(v)) + g[3].to(_compute_dtype(v))).to(v.dtype)
    return c[0], c[1], c[5], g[0], g[1], g[5], dk, dv, c[4] + g[4]
