"""Cross-entropy over the rows of a contiguous [N, V] logits tensor, forward and backward.

One program per row, looping over V in blocks of BLOCK columns (V need not be a multiple of it):
- forward: an online logsumexp (Liger-Kernel's: a running max m and sum d of exp(x - m), rescaled when m
  grows), the label's logit and, with label smoothing, the row's sum; writes the row's loss and logsumexp;
- backward: softmax from the saved logsumexp, one read and one write per element; the gradient may be
  written over the logits (in place), which the fused linear cross-entropy does with its chunk of logits.

The interface (arguments, results, dtypes, NaN/Inf behaviour) is `ptm_kernels.reference_kernels`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import cast_to, check_dtype, num_warps_for

# Columns per loop step: a 32k vocabulary row takes 4 steps. Tests lower it to exercise the loop.
MAX_BLOCK = 8192


def _block(V: int):
    block = min(MAX_BLOCK, max(16, triton.next_power_of_2(V)))
    return block, num_warps_for(block)


@triton.jit
def _cross_entropy_fwd_kernel(LOSS, LSE, X, Y, V, ignore_index, label_smoothing, z_loss,
                              HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * V may pass 2**31
    x_row = X + row * V
    cols = tl.arange(0, BLOCK)
    m = -float("inf")
    d = 0.0
    sum_x = 0.0
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Shift by 0 while every logit so far is -inf: exp(-inf - -inf) would be NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    # As torch's log_softmax: NaN for a row with a NaN or a +inf (d is NaN then) or of -inf only (m is -inf).
    finite = (m - m) == 0.0
    lse = tl.where(finite, m + tl.log(d), float("nan"))
    tl.store(LSE + row, lse)
    y = tl.load(Y + row)
    valid = y != ignore_index
    x_y = tl.load(x_row + tl.where(valid, y, 0)).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * x_y
    if HAS_SMOOTHING:  # not at 0: 0 * inf is NaN
        loss -= label_smoothing / V * sum_x
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))


@triton.jit
def _cross_entropy_bwd_kernel(DX, X, Y, LSE, DLOSS, V, ignore_index, label_smoothing, z_loss,
                              BLOCK: tl.constexpr):
    # dx = scale * (softmax(x) * (1 + 2 z lse) - s / V) - scale * (1 - s) at the label; scale = 0 if ignored.
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * V
    dx_row = DX + row * V  # may be x_row: each block is read before it is written, by this program only
    cols = tl.arange(0, BLOCK)
    y = tl.load(Y + row)
    valid = y != ignore_index
    lse = tl.load(LSE + row)
    scale = tl.where(valid, tl.load(DLOSS + row), 0.0)
    p_scale = scale * (1.0 + 2.0 * z_loss * lse)
    shift = scale * label_smoothing / V
    label_col = tl.where(valid, y, -1)
    for start in range(0, V, BLOCK):
        mask = start + cols < V
        x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * p_scale - shift
        g = tl.where(start + cols == label_col, g - scale * (1.0 - label_smoothing), g)
        tl.store(dx_row + start + cols, cast_to(g, DX.dtype.element_ty), mask=mask)


def _check(logits: Tensor, labels: Tensor) -> None:
    check_dtype("logits", logits)
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"ptm_kernels.triton: logits must be a contiguous [N, V] tensor, got {tuple(logits.shape)}")
    if labels.dtype != torch.int64 or labels.shape != logits.shape[:1] or not labels.is_contiguous():
        raise ValueError(f"ptm_kernels.triton: labels must be contiguous int64 [{logits.shape[0]}], got "
                         f"{labels.dtype} {tuple(labels.shape)}")


def cross_entropy_fwd(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float, z_loss: float):
    _check(logits, labels)
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss, lse
    block, num_warps = _block(V)
    _cross_entropy_fwd_kernel[(N,)](loss, lse, logits, labels, V, ignore_index, float(label_smoothing),
                                    float(z_loss), HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss > 0,
                                    BLOCK=block, num_warps=num_warps)
    return loss, lse


def cross_entropy_bwd(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                      label_smoothing: float, z_loss: float, inplace: bool) -> Tensor:
    _check(logits, labels)
    N, V = logits.shape
    dlogits = logits if inplace else torch.empty_like(logits)
    if N == 0:
        return dlogits
    block, num_warps = _block(V)
    _cross_entropy_bwd_kernel[(N,)](dlogits, logits, labels, lse.contiguous(), dloss.float().contiguous(), V,
                                    ignore_index, float(label_smoothing), float(z_loss), BLOCK=block,
                                    num_warps=num_warps)
    return dlogits
