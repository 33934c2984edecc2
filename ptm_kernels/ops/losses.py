"""Fused losses: cross_entropy, linear_cross_entropy (the [N, V] logits never exist) and mlm_loss.

cross_entropy: public function -> checks -> `ptm::cross_entropy` (per-row loss and logsumexp, computed by the
backend chosen for the "cross_entropy" family) with `ptm::cross_entropy_backward`; the reduction is plain
PyTorch on the per-row losses.

linear_cross_entropy is one op, `ptm::linear_cross_entropy`, so that torch.compile sees one node: its forward
walks the rows in chunks; per chunk, logits = hidden @ weight^T (+ bias) by torch.matmul, the cross-entropy
kernel gives the chunk's losses and then overwrites the logits with their gradient, and that gradient is
multiplied into the gradients of hidden, weight and bias right away (as Liger-Kernel does). The backward only
scales them by the incoming scalar gradient. With reduction="none" the incoming gradient is one number per
row, which cannot scale a weight gradient summed over rows: the forward then only computes losses and
`ptm::linear_cross_entropy_backward` repeats the chunked pass with the given per-row gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import backend
from .. import _checks
from ..dtypes import compute_dtype as _loss_dtype

REDUCTIONS = ("mean", "sum", "none")


@dataclasses.dataclass(frozen=True)
class CrossEntropyOptions:
    """What changes a cross-entropy's math, besides its inputs (the custom ops take these fields flat)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0

    def flat(self) -> Tuple[int, float, float]:
        return int(self.ignore_index), float(self.label_smoothing), float(self.z_loss)


def _check_options(ignore_index, label_smoothing, z_loss, reduction) -> CrossEntropyOptions:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return CrossEntropyOptions(ignore_index, float(label_smoothing), float(z_loss))


def _check_labels_in_range(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """IndexError (torch's type) for a label outside [0, V) that is not ignore_index. Runs inside the ops'
    implementations, where the data is real (under torch.compile too), never in their fake ones."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if labels.numel() and bool(bad.any()):
        first = labels[bad][0].item()
        raise IndexError(f"labels: target {first} is out of bounds: expected values in [0, {num_classes}) "
                         f"or ignore_index={ignore_index}")


# --------------------------------------------------------------------------------------- cross_entropy


@torch.library.custom_op("ptm::cross_entropy", mutates_args=())
def _cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int, label_smoothing: float,
                   z_loss: float) -> Tuple[Tensor, Tensor]:
    _check_labels_in_range(labels, logits.shape[1], ignore_index)
    return tuple(backend.kernels("cross_entropy", logits).cross_entropy_fwd(logits, labels, ignore_index,
                                                                             label_smoothing, z_loss))


@_cross_entropy.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss):
    rows = logits.new_empty(logits.shape[0], dtype=_loss_dtype(logits))
    return rows, rows.new_empty(rows.shape)


@torch.library.custom_op("ptm::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                            label_smoothing: float, z_loss: float) -> Tensor:
    return backend.kernels("cross_entropy", logits).cross_entropy_bwd(
        dloss, logits, labels, lse, ignore_index, label_smoothing, z_loss, False)


@_cross_entropy_backward.register_fake
def _(dloss, logits, labels, lse, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape)


def _cross_entropy_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.options = (ignore_index, label_smoothing, z_loss)
    ctx.save_for_backward(logits, labels, output[1])


def _cross_entropy_grad(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    dlogits = _cross_entropy_backward(dloss.to(lse.dtype).contiguous(), logits, labels, lse, *ctx.options)
    return dlogits, None, None, None, None


_cross_entropy.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


def _reduce(rows: Tensor, labels: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """torch's reductions: "mean" divides by the number of labelled rows (NaN when there is none, as torch)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum()


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of logits [..., V] against class labels [...] (int64), fused forward and backward.

    The value of `torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=, label_smoothing=,
    reduction=)` with the classes in the LAST dimension (torch wants them in dimension 1), plus
    `z_loss * logsumexp(logits)**2` per labelled row (PaLM's z-loss) when z_loss > 0. Accumulates in
    float32: the loss is float32 for half-precision logits (float64 for float64), the gradient has the
    logits' dtype. "mean" averages over the rows whose label is not ignore_index: NaN when there is none,
    as in torch. A label outside [0, V) other than ignore_index raises IndexError.
    """
    options = _check_options(ignore_index, label_smoothing, z_loss, reduction)
    _checks.tensor("logits", logits, min_dim=1)
    _check_label_tensor(labels, logits.shape[:-1], "logits", logits)
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"logits must have at least one class in its last dimension, got shape {tuple(logits.shape)}")
    flat_labels = labels.reshape(-1).contiguous()
    rows, _ = _cross_entropy(_checks.rows(logits), flat_labels, *options.flat())
    if reduction == "none":
        return rows.view(labels.shape)
    return _reduce(rows, flat_labels, options.ignore_index, reduction)


def _check_label_tensor(labels, expected_shape, ref_name: str, ref: Tensor) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64 class indices, got {labels.dtype} (class probabilities are not "
                        f"supported)")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} ({ref_name}'s shape without its last "
                         f"dimension), got {tuple(labels.shape)}")
    _checks.same_device(ref_name, ref, labels=labels)


# ------------------------------------------------------------------------------- linear_cross_entropy


# Each chunk reads the weight twice (logits, then the hidden gradient) and its float32 gradient once more (read
# and written): V x D each time. Below a few hundred rows per chunk that traffic costs more than the chunk's
# GEMMs (measured on 2 CPU cores at N 1024, D 512, V 32000: 32-row chunks 2.5x slower than unfused eager,
# 256-row chunks faster than it), so chunks have at least this many rows.
MIN_CHUNK_ROWS = 256


def default_chunk_rows(num_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk: Liger-Kernel's rule, chunk logits [rows, V] about as large as the hidden states [N, D]
    (N / ceil(V / D), rounded up to a power of two), but at least MIN_CHUNK_ROWS rows (or all of them)."""
    chunks_factor = max(1, -(-vocab_size // max(hidden_size, 1)))
    rows = max(1, -(-num_rows // chunks_factor))
    rows = max(rows, min(num_rows, MIN_CHUNK_ROWS))
    return 1 << (rows - 1).bit_length()


def _chunked_pass(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                  options: CrossEntropyOptions, dloss: Optional[Tensor], chunk_rows: int,
                  want: Tuple[bool, bool, bool]):
    """The fused linear cross-entropy over chunks of rows.

    dloss: each row's loss gradient [N] (or None: losses only). Returns (loss rows [N] float32, dhidden,
    dweight, dbias); a gradient is None unless `want` asks for it and dloss is given. The weight and bias
    gradients accumulate in float32 across chunks and are rounded once.
    """
    N, V = hidden.shape[0], weight.shape[0]
    kernels = backend.kernels("cross_entropy", hidden)
    flat = options.flat()
    rows = hidden.new_empty(N, dtype=_loss_dtype(hidden))
    grads = dloss is not None
    want_h, want_w, want_b = (w and grads for w in want)
    acc = _loss_dtype(hidden)
    dhidden = torch.empty_like(hidden) if want_h else None
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    dbias = torch.zeros(V, dtype=acc, device=weight.device) if want_b else None
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        h, y = hidden[start:end], labels[start:end]
        logits = torch.matmul(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
        loss, lse = kernels.cross_entropy_fwd(logits, y, *flat)
        rows[start:end] = loss
        if not grads:
            continue
        dlogits = kernels.cross_entropy_bwd(dloss[start:end], logits, y, lse, *flat, True)
        if want_h:
            torch.matmul(dlogits, weight, out=dhidden[start:end])
        if want_w:
            if dlogits.dtype == acc:
                dweight.addmm_(dlogits.t(), h)
            else:  # the half-precision product, added into float32
                dweight.add_(torch.matmul(dlogits.t(), h))
        if want_b:
            dbias += dlogits.sum(0, dtype=acc)
    cast = lambda g, like: None if g is None else g.to(like.dtype)
    return rows, dhidden, cast(dweight, weight), cast(dbias, bias if bias is not None else weight)


def _empty_or(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent gradient is an empty tensor."""
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("ptm::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
                          ignore_index: int, label_smoothing: float, z_loss: float, reduction: str,
                          chunk_rows: int, grad_hidden: bool, grad_weight: bool,
                          grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    options = CrossEntropyOptions(ignore_index, label_smoothing, z_loss)
    _check_labels_in_range(labels, weight.shape[0], ignore_index)
    dloss = None
    if reduction != "none":
        # d(loss)/d(row loss): 1 for "sum", 1 / (labelled rows) for "mean" (ignored rows get no gradient).
        count = (labels != ignore_index).sum() if reduction == "mean" else torch.ones((), device=labels.device)
        dloss = (1.0 / count.to(_loss_dtype(hidden))).expand(hidden.shape[0]).contiguous()
    rows, dh, dw, db = _chunked_pass(hidden, weight, labels, bias, options, dloss, chunk_rows,
                                     (grad_hidden, grad_weight, grad_bias and bias is not None))
    loss = _reduce(rows, labels, ignore_index, reduction)
    return loss, _empty_or(dh, hidden), _empty_or(dw, weight), _empty_or(db, weight)


@_linear_cross_entropy.register_fake
def _(hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_rows, grad_hidden,
      grad_weight, grad_bias):
    scalar = reduction != "none"
    loss = hidden.new_empty(() if scalar else (hidden.shape[0],), dtype=_loss_dtype(hidden))
    dh = hidden.new_empty(hidden.shape if scalar and grad_hidden else (0,))
    dw = weight.new_empty(weight.shape if scalar and grad_weight else (0,))
    db = weight.new_empty((weight.shape[0],) if scalar and grad_bias and bias is not None else (0,),
                          dtype=bias.dtype if bias is not None else weight.dtype)
    return loss, dh, dw, db


@torch.library.custom_op("ptm::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward(dloss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor,
                                   bias: Optional[Tensor], ignore_index: int, label_smoothing: float,
                                   z_loss: float, chunk_rows: int, grad_hidden: bool, grad_weight: bool,
                                   grad_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients for per-row loss gradients dloss [N] (reduction="none"): the chunked pass again."""
    options = CrossEntropyOptions(ignore_index, label_smoothing, z_loss)
    _, dh, dw, db = _chunked_pass(hidden, weight, labels, bias, options, dloss, chunk_rows,
                                  (grad_hidden, grad_weight, grad_bias and bias is not None))
    return _empty_or(dh, hidden), _empty_or(dw, weight), _empty_or(db, weight)


@_linear_cross_entropy_backward.register_fake
def _(dloss, hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, chunk_rows, grad_hidden,
      grad_weight, grad_bias):
    return (hidden.new_empty(hidden.shape if grad_hidden else (0,)),
            weight.new_empty(weight.shape if grad_weight else (0,)),
            weight.new_empty((weight.shape[0],) if grad_bias and bias is not None else (0,),
                             dtype=bias.dtype if bias is not None else weight.dtype))


def _linear_cross_entropy_setup(ctx, inputs, output):
    (hidden, weight, labels, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_rows, grad_hidden,
     grad_weight, grad_bias) = inputs  # the op's schema, by name
    ctx.n_inputs = len(inputs)
    ctx.wants = (grad_hidden, grad_weight, grad_bias)
    ctx.reduction = reduction
    ctx.args = (ignore_index, label_smoothing, z_loss, chunk_rows)
    ctx.has_bias = bias is not None
    if reduction == "none":  # the backward repeats the pass
        ctx.save_for_backward(hidden, weight, labels, bias)
    else:  # the forward already computed the gradients
        ctx.save_for_backward(*output[1:])


def _linear_cross_entropy_grad(ctx, dloss, _ddh, _ddw, _ddb):
    want_h, want_w, want_b = ctx.wants
    if ctx.reduction == "none":
        hidden, weight, labels, bias = ctx.saved_tensors
        dh, dw, db = _linear_cross_entropy_backward(dloss.to(_loss_dtype(hidden)).contiguous(), hidden, weight,
                                                    labels, bias, *ctx.args, want_h, want_w, want_b)
    else:
        # dloss is a 0-dim float32 tensor: the product is computed in float32 and rounded once to g's dtype
        dh, dw, db = (g * dloss for g in ctx.saved_tensors)
    grads = (dh if want_h else None, dw if want_w else None, None, db if want_b and ctx.has_bias else None)
    return grads + (None,) * (ctx.n_inputs - len(grads))  # the options after bias take no gradient


_linear_cross_entropy.register_autograd(_linear_cross_entropy_grad, setup_context=_linear_cross_entropy_setup)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
    """`cross_entropy(hidden @ weight.T + bias, labels, ...)` without ever materialising the [N, V] logits.

    hidden [..., D], weight [V, D], bias [V] or None (all of one dtype), labels [...] int64. The rows are
    processed `chunk_size` at a time (default: chunks whose logits are about as large as hidden, but at
    least MIN_CHUNK_ROWS = 256 rows, see default_chunk_rows); the
    gradients of hidden, weight and bias (only those that require grad) are computed chunk by chunk in the
    forward and scaled by the loss's gradient in the backward, as Liger-Kernel does. Same value, dtypes
    and options as `cross_entropy`.
    """
    options = _check_options(ignore_index, label_smoothing, z_loss, reduction)
    _checks.tensor("hidden", hidden, min_dim=1)
    _checks.tensor("weight", weight, dim=2)
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape [V, {D}] (hidden's last dimension), got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (class), got shape {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias)
        _checks.shape("bias", bias, (weight.shape[0],))
    _checks.same_dtype("hidden", hidden, weight=weight, bias=bias)
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    _check_label_tensor(labels, hidden.shape[:-1], "hidden", hidden)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    h = _checks.rows(hidden)
    chunk_rows = chunk_size or default_chunk_rows(h.shape[0], D, weight.shape[0])
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    flat_labels = labels.reshape(-1).contiguous()
    loss, _, _, _ = _linear_cross_entropy(h, weight.contiguous(), flat_labels,
                                          None if bias is None else bias.contiguous(), *options.flat(),
                                          reduction, chunk_rows, *wants)
    return loss.view(labels.shape) if reduction == "none" else loss


# ------------------------------------------------------------------------------------------------ mlm_loss


def mlm_loss(hidden: Tensor, labels: Tensor, head_transform: Optional[Callable[[Tensor], Tensor]],
             weight: Tensor, bias: Optional[Tensor] = None, *, ignore_index: int = -100, **ce_kwargs) -> Tensor:
    """A masked-LM head and its loss on the labelled rows only.

    Gathers the rows of hidden [..., D] whose label is not ignore_index ([n_labelled, D]), applies
    `head_transform` (any callable, e.g. BERT's dense + GELU + LayerNorm; None for none), then
    `linear_cross_entropy` with the decoder weight [V, D'] and bias. `ce_kwargs`: label_smoothing, z_loss,
    chunk_size. Returns the mean loss over the labelled rows. Unlike torch's cross-entropy, which gives NaN
    for a mean over no row, a batch with no labelled row gives a loss of 0 whose gradients are zeros: a
    training step on such a batch is a no-op instead of poisoning the weights with NaN.
    """
    unknown = set(ce_kwargs) - {"label_smoothing", "z_loss", "chunk_size"}
    if unknown:
        raise TypeError(f"mlm_loss got unexpected keyword argument(s) {sorted(unknown)}; it takes label_smoothing, "
                        f"z_loss and chunk_size (the loss is always the mean over the labelled rows)")
    _checks.tensor("hidden", hidden, min_dim=1)
    _check_label_tensor(labels, hidden.shape[:-1], "hidden", hidden)
    labelled = (labels != ignore_index).reshape(-1)
    rows = hidden.reshape(-1, hidden.shape[-1])[labelled]
    targets = labels.reshape(-1)[labelled]
    if head_transform is not None:
        rows = head_transform(rows)
    total = linear_cross_entropy(rows, weight, targets, bias, ignore_index=ignore_index, reduction="sum",
                                 **ce_kwargs)
    return total / labelled.sum().clamp(min=1)
