"""The kernel interface, written in plain PyTorch: the "reference" backend.

Every backend (this module, `ptm_kernels.triton`, the C++ module `ptm_kernels._C.cpu` and the CUDA module
`ptm_kernels._C.cuda`) provides these functions with the same names, arguments and results. The public ops
in `ptm_kernels/ops/` validate and reshape the user's tensors, then call one backend; so a kernel may rely on:

- row-major 2-D inputs `[N, C]` (contiguous) for norms and activations; `C` may be any size >= 1, `N` may be 0;
- weights/biases of shape `[C]`, contiguous, of x's dtype or float32;
- rope inputs `[B, H, L, D]` with stride 1 in the last dimension and arbitrary other strides;
- statistics (mean, rstd) and parameter gradients in float32.

All math is in float32 (float64 when the inputs are float64, which only this backend supports: gradcheck
runs here). Results are rounded once to the output dtype unless a convention says otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .dtypes import compute_dtype as _compute_dtype
from .kernel_params import AttentionParams
# The mask parts and dropout of the attention kernels, shared with reference_relative.py (both are part of the
# interface), and relative-position attention, which lives in its own file: this module is the whole backend.
from .reference_common import attention_dropout_mask, attention_mask_dense, empty_stats
from .reference_relative import (relative_attention_bwd, relative_attention_fwd, two_stream_attention_bwd,
                                 two_stream_attention_fwd)


# ----------------------------------------------------------------------------------------------- norms
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                 round_normed: bool):
    """-> (y, h, rstd).

    h = x + residual (rounded to x's dtype, like eager `x + residual`), or an empty tensor without residual.
    rstd[n] = 1 / sqrt(mean(h[n]^2) + eps) in float32.
    y = weight * n where n = h * rstd; when round_normed, n is rounded to x's dtype before the multiply
    (the LLaMA convention). y's dtype is promote(x.dtype, weight.dtype).
    """
    h = x + residual if residual is not None else x
    cd = _compute_dtype(x)
    hf = h.to(cd)
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    n = hf * rstd[:, None]
    if round_normed:
        n = n.to(x.dtype).to(cd)
    out_dtype = x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)
    y = n if weight is None else n * weight.to(cd)
    return y.to(out_dtype), (h if residual is not None else empty_stats(x)), rstd.float() if cd != torch.float64 else rstd


def rms_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], rstd: Tensor, dh_out: Optional[Tensor]):
    """-> (dh, dweight).

    dy: gradient of y; h: the normalized input (x, or x + residual); dh_out: gradient flowing into the
    returned residual sum h (or None). dh has h's dtype; dweight is float32 [C] (empty when weight is None).
    With n = h * rstd and g = dy * weight: dh = rstd * (g - n * mean(g * n)) + dh_out.
    """
    cd = _compute_dtype(h)
    hf, g = h.to(cd), dy.to(cd)
    r = rstd.to(cd)[:, None]
    n = hf * r
    dw = (g * n).sum(0) if weight is not None else None
    if weight is not None:
        g = g * weight.to(cd)
    dh = r * (g - n * (g * n).mean(-1, keepdim=True))
    if dh_out is not None:
        dh = dh + dh_out.to(cd)
    return dh.to(h.dtype), (dw.float() if cd != torch.float64 else dw) if dw is not None else empty_stats(h)


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
                   eps: float):
    """-> (y, h, mean, rstd). h as in rms_norm_fwd; y = ((h - mean) * rstd) * weight + bias in x's dtype."""
    h = x + residual if residual is not None else x
    cd = _compute_dtype(x)
    hf = h.to(cd)
    mean = hf.mean(-1)
    var = (hf - mean[:, None]).pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (hf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    stat = (lambda t: t) if cd == torch.float64 else (lambda t: t.float())
    return y.to(x.dtype), (h if residual is not None else empty_stats(x)), stat(mean), stat(rstd)


def layer_norm_bwd(dy: Tensor, h: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                   dh_out: Optional[Tensor], has_bias: bool):
    """-> (dh, dweight, dbias); dweight/dbias float32 [C], empty when absent.

    With n = (h - mean) * rstd and g = dy * weight: dh = rstd * (g - mean(g) - n * mean(g * n)) + dh_out.
    """
    cd = _compute_dtype(h)
    g = dy.to(cd)
    n = (h.to(cd) - mean.to(cd)[:, None]) * rstd.to(cd)[:, None]
    dw = (g * n).sum(0) if weight is not None else None
    db = g.sum(0) if has_bias else None
    if weight is not None:
        g = g * weight.to(cd)
    dh = rstd.to(cd)[:, None] * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    if dh_out is not None:
        dh = dh + dh_out.to(cd)
    stat = (lambda t: t) if cd == torch.float64 else (lambda t: t.float())
    return (dh.to(h.dtype), stat(dw) if dw is not None else empty_stats(h),
            stat(db) if db is not None else empty_stats(h))


# ----------------------------------------------------------------------------------------- activations
# `act` is one of "gelu" (erf), "gelu_tanh", "silu".
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _act(z: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
    if act == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if act == "silu":
        return z * torch.sigmoid(z)
    raise ValueError(f"unknown activation {act!r}")


def _act_grad(z: Tensor, act: str) -> Tensor:
    """d act(z) / dz."""
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + z * pdf
    if act == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"unknown activation {act!r}")


def act_fwd(x: Tensor, bias: Optional[Tensor], act: str) -> Tensor:
    """y = act(x + bias) for x [N, C], bias [C] or None; the sum is not rounded; y in x's dtype."""
    cd = _compute_dtype(x)
    z = x.to(cd) if bias is None else x.to(cd) + bias.to(cd)
    return _act(z, act).to(x.dtype)


def act_bwd(dy: Tensor, x: Tensor, bias: Optional[Tensor], act: str):
    """-> (dx, dbias): dx = dy * act'(x + bias) in x's dtype; dbias = sum over rows of dx, float32 [C]."""
    cd = _compute_dtype(x)
    z = x.to(cd) if bias is None else x.to(cd) + bias.to(cd)
    dz = dy.to(cd) * _act_grad(z, act)
    db = dz.sum(0) if bias is not None else None
    if db is not None and cd != torch.float64:
        db = db.float()
    return dz.to(x.dtype), db if db is not None else empty_stats(x)


def glu_fwd(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """y = act(gate) * up for gate, up [N, C]; y in gate's dtype."""
    cd = _compute_dtype(gate)
    return (_act(gate.to(cd), act) * up.to(cd)).to(gate.dtype)


def glu_bwd(dy: Tensor, gate: Tensor, up: Tensor, act: str):
    """-> (dgate, dup): dgate = up * (dy * act'(gate)); dup = dy * act(gate).

    act' is at most ~1.13, so multiplying it into dy first overflows only where the true dgate does (dy * up
    first overflows for up near the dtype's largest value)."""
    cd = _compute_dtype(gate)
    g, u, d = gate.to(cd), up.to(cd), dy.to(cd)
    return (u * (d * _act_grad(g, act))).to(gate.dtype), (d * _act(g, act)).to(up.dtype)


# ------------------------------------------------------------------------------------------------ rope
def rope_fwd(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, rotary_dim: int,
             inverse: bool) -> Tensor:
    """Rotate x [B, H, L, D] (last-dim stride 1) -> a new tensor with x's strides (torch.empty_like).

    cos, sin: [P, rotary_dim // 2] float32; positions: [B, L] int64 (row b of the batch uses positions[b]),
    or [1, L] shared by the batch. Pairs: (i, i + R/2) in the rotate-half layout, (2i, 2i+1) interleaved;
    pair i rotates by the angle at cos/sin[pos, i]:  o1 = x1*c - x2*s,  o2 = x2*c + x1*s.
    inverse=True rotates by minus the angle (s -> -s): that is the backward, since rotations are orthogonal.
    Dimensions >= rotary_dim are copied unchanged.
    """
    R = rotary_dim
    cd = _compute_dtype(x)
    c = cos.to(cd)[positions].unsqueeze(1)  # [B|1, 1, L, R/2]
    s = sin.to(cd)[positions].unsqueeze(1)
    if inverse:
        s = -s
    out = torch.empty_like(x)
    xf = x[..., :R].to(cd)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out[..., 0:R:2] = (x1 * c - x2 * s).to(x.dtype)
        out[..., 1:R:2] = (x2 * c + x1 * s).to(x.dtype)
    else:
        x1, x2 = xf[..., : R // 2], xf[..., R // 2:]
        out[..., : R // 2] = (x1 * c - x2 * s).to(x.dtype)
        out[..., R // 2: R] = (x2 * c + x1 * s).to(x.dtype)
    out[..., R:] = x[..., R:]
    return out


# ------------------------------------------------------------------------------------------- attention
# attention_fwd(q, k, v, params) / attention_bwd(dout, q, k, v, out, lse, params) take an AttentionParams
# (ptm_kernels/kernel_params.py): scale, vis (Visibility), bias (Bias), dropout (Dropout). Its parts arrive
# already checked, and the broadcast ones expanded, by the op (ptm_kernels/ops/attention.py, AttentionMask):
#   vis.causal        bool: key j visible to query i iff j <= i + (Lk - Lq)          (bottom-right aligned)
#   window_left/right int, -1 = unbounded: visible iff (i + Lk - Lq) - j <= left and j - (i + Lk - Lq) <= right
#   key_lengths       int64 [B] or None: visible iff j < key_lengths[b]
#   prefix_lengths    int64 [B] or None: prefix-LM. Visible iff j < prefix_lengths[b] or j <= i + (Lk - Lq)
#                     (bidirectional inside the prefix, causal after). Given together with causal=True.
#   q_segments        int64 [B, Lq] and k_segments int64 [B, Lk], or None: visible iff the ids are equal
#   dense_mask        bool, None or a view expanded to [B, H, Lq, Lk] (stride 0 on broadcast dims): True = visible
#   bias.dense        q's dtype or float32, None or a view expanded to [B, H, Lq, Lk]: added to the scaled scores
#   bias.toeplitz     float32 [H, Lq + Lk - 1] or None: adds table[h, i - j + Lk - 1] to the scaled scores
#   block_map         int8 [B, H, ceil(Lq/block_m), ceil(Lk/block_n)] (stride 0 on broadcast dims) or None:
#                     0 = no visible entry in the tile (skip it), 1 = some, 2 = every entry visible (no mask
#                     work needed); computed from all the parts above at the tile size (block_m, block_n).
#                     A tile that extends past Lq or Lk (ragged last row/column of tiles) is never 2; a 1
#                     may still hide every entry (each part shows some, their AND none).
#                     A kernel that uses other tile sizes must not rely on it (it stays correct without it).
#   dropout.p, .seed  in-kernel dropout of the probabilities (kept ones scaled by 1/(1-p)); each backend is
#                     deterministic for a given seed and exposes attention_dropout_mask() to materialize its
#                     keep-mask, so tests can replay it through the reference.
# q [B, H, Lq, D], k/v [B, Hk, Lk, D] with H % Hk == 0 (head h reads kv head h // (H // Hk)); unit stride in
# the last dimension, arbitrary other strides. Scores: s = scale * q.k + bias + toeplitz.
# A query row with no visible key gives out = 0, lse = -inf, and zero gradients. A NaN or +inf score at a visible
# key makes its row NaN (out and lse), as torch's softmax does (+inf - +inf); a hidden key's score never counts.
# Results are contiguous tensors (the ops' fake implementations say so to torch.compile).


def _attention_probs(q, k, v, p: AttentionParams):
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    cd = _compute_dtype(q)
    rep = H // max(k.shape[1], 1)  # H = Hk = 0: an empty problem
    kf = k.to(cd).repeat_interleave(rep, dim=1)
    vf = v.to(cd).repeat_interleave(rep, dim=1)
    s = p.scale * (q.to(cd) @ kf.transpose(-1, -2))
    bias, toeplitz = p.bias.dense, p.bias.toeplitz
    if bias is not None:
        s = s + bias.to(cd)
    if toeplitz is not None:
        idx = torch.arange(Lq, device=q.device)[:, None] - torch.arange(Lk, device=q.device)[None, :] + Lk - 1
        s = s + toeplitz.to(cd)[:, idx].unsqueeze(0)
    vis = attention_mask_dense(B, H, Lq, Lk, q.device, p.vis)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no visible key
    # A +inf score makes the row NaN, as torch's softmax does (exp(inf - inf)); torch.logsumexp would say +inf.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    # A row with no visible key (lse = -inf) is shifted by 0: its probabilities are exp(-inf) = 0.
    p = torch.exp(s - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    return p, lse, vf, kf, vis


def attention_fwd(q, k, v, params: AttentionParams):
    """-> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)."""
    p, lse, vf, _, _ = _attention_probs(q, k, v, params)
    drop = params.dropout
    if drop.p > 0:
        B, H, Lq, Lk = p.shape
        keep = attention_dropout_mask(drop.seed_value, drop.p, B, H, Lq, Lk, q.device)
        p = p * keep / (1.0 - drop.p)
    out = (p @ vf).to(q.dtype)
    return out, (lse if lse.dtype == torch.float64 else lse.float())


def attention_bwd(dout, q, k, v, out, lse, params: AttentionParams):
    """-> (dq, dk, dv, dbias, dtoeplitz).

    dk, dv have k's shape [B, Hk, Lk, D] (summed over the heads sharing a kv head); dbias is float32
    [B, H, Lq, Lk] (the caller sums it down to the bias's own broadcast shape), dtoeplitz float32 like the
    table; each is an empty tensor when not requested (params.bias's *_requires_grad).
    """
    cd = _compute_dtype(q)
    p, lse_, vf, kf, _ = _attention_probs(q, k, v, params)
    B, H, Lq, Lk = p.shape
    Hk = k.shape[1]
    scale, drop = params.scale, params.dropout
    do = dout.to(cd)
    if drop.p > 0:
        keep = attention_dropout_mask(drop.seed_value, drop.p, B, H, Lq, Lk, q.device).to(cd) / (1.0 - drop.p)
    else:
        keep = None
    pd = p * keep if keep is not None else p  # the probabilities that multiplied v
    dv = pd.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    if keep is not None:
        dp = dp * keep
    # delta_i = sum_j pd_ij * dp'_ij = rowsum(dout * out) (out includes dropout)
    delta = (do * out.to(cd)).sum(-1, keepdim=True)
    ds = p * (dp - delta)  # gradient of the (biased) scores
    dq = (scale * (ds @ kf)).to(q.dtype)
    dk = scale * (ds.transpose(-1, -2) @ q.to(cd))
    fold = lambda t: t.view(B, Hk, H // max(Hk, 1), Lk, t.shape[-1]).sum(2)  # heads sharing a kv head
    dk, dv = fold(dk).to(k.dtype), fold(dv).to(v.dtype)
    stat = (lambda t: t) if cd == torch.float64 else (lambda t: t.float())
    dbias = stat(ds) if params.bias.dense_requires_grad else empty_stats(q)
    if params.bias.toeplitz_requires_grad:
        idx = (torch.arange(Lq, device=q.device)[:, None] - torch.arange(Lk, device=q.device)[None, :] + Lk - 1)
        dt = torch.zeros(H, Lq + Lk - 1, dtype=cd, device=q.device)
        dt.index_add_(1, idx.flatten(), ds.sum(0).reshape(H, -1))
        dtoeplitz = stat(dt)
    else:
        dtoeplitz = empty_stats(q)
    return dq, dk, dv, dbias, dtoeplitz


# ---------------------------------------------------------------------------------------------- linear
def linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) -> [M, N] contiguous, all of one dtype (torch's linear)."""
    return torch.nn.functional.linear(x, weight, bias).contiguous()


# ---------------------------------------------------------------------------------------- cross-entropy
# logits [N, V] contiguous, labels [N] int64, each in [0, V) or equal to ignore_index (the op checks that).
# With s = label_smoothing, z = z_loss and lse = logsumexp(x) of a row x (all in float32, float64 here for
# float64 logits), a labelled row's loss is torch's (1 - s) * nll + s * mean_j(-log_softmax(x)_j) plus z * lse^2:
#     loss = lse - (1 - s) * x[y] - (s / V) * sum(x) + z * lse^2         (the sum term only when s > 0)
# and an ignored row's loss is 0. Its gradient, for an incoming dloss:
#     dx = dloss * (softmax(x) * (1 + 2 z lse) - (1 - s) * onehot(y) - s / V)
# multiplied by 0 on ignored rows (never by their dloss, which is inf for a "mean" over no labelled row: torch
# gives zeros there), so NaN logits still give NaN there, as torch's log_softmax backward does.


def cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, z_loss: float):
    """-> (loss [N], lse [N]) in float32 (float64 for float64 logits)."""
    x = logits.to(_compute_dtype(logits))
    valid = labels != ignore_index
    # max + log(sum(exp(x - max))), as torch's log_softmax computes it (torch.logsumexp instead special-cases
    # infinities): a +inf logit gives NaN (inf - inf), a row of -inf gives NaN, like F.cross_entropy.
    m = x.max(-1, keepdim=True).values if x.shape[0] else x.new_zeros(0, 1)
    lse = (m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))).squeeze(1)
    target = x.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * target
    if label_smoothing > 0:  # skipped at 0: 0 * sum(x) would turn an infinite sum into NaN
        loss = loss - (label_smoothing / x.shape[1]) * x.sum(-1)
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    return torch.where(valid, loss, torch.zeros_like(loss)), lse


def cross_entropy_bwd(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                      label_smoothing: float, z_loss: float, inplace: bool) -> Tensor:
    """-> dlogits in logits' dtype; inplace=True writes it into `logits` and returns it (the fused linear
    cross-entropy's chunk of logits is not needed afterwards)."""
    cd = _compute_dtype(logits)
    valid = labels != ignore_index
    lse_ = lse.to(cd)[:, None]
    g = torch.exp(logits.to(cd) - lse_)
    if z_loss > 0:
        g = g * (1.0 + 2.0 * z_loss * lse_)
    if label_smoothing > 0:
        g = g - label_smoothing / logits.shape[1]
    rows = torch.arange(logits.shape[0], device=logits.device)
    g[rows, torch.where(valid, labels, 0)] -= (1.0 - label_smoothing) * valid.to(cd)
    g = g * torch.where(valid, dloss.to(cd), 0.0)[:, None]
    if inplace:
        return logits.copy_(g)
    return g.to(logits.dtype)
