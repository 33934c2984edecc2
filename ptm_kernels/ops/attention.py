"""Fused attention with arbitrary masks: `ptm::attention` and `ptm::attention_backward`.

`attention(q, k, v, mask)` takes an `AttentionMask` (ptm_kernels/attention_mask.py); `scaled_dot_product_attention`
is a drop-in for torch's, turning its attn_mask/is_causal into one. Both end in one torch.library op that takes
q, k, v and an AttentionParams (ptm_kernels/kernel_params.py), flattened by ops/_op_args.py (custom ops take
tensors, not objects); the op hands them to the backend chosen by `ptm_kernels.backend`. Broadcast masks and biases travel in their own
shapes and are expanded (stride 0, no copy) inside the op, so the bias gradient comes back in the bias's shape.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _checks, backend, fallbacks
from ..attention_mask import AttentionMask
from ..dtypes import compute_dtype
from ..kernel_params import AttentionParams, Bias, Dropout, replaced
from ._op_args import OpArgs

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256

# The ops' flat arguments, derived from the parameter objects (ops/_op_args.py): ptm::attention takes q, k, v and
# an AttentionParams; its backward the same after dout, and out and lse from the forward.
ARGS = OpArgs(("q", Tensor), ("k", Tensor), ("v", Tensor), ("", AttentionParams))
BACKWARD_ARGS = OpArgs(("dout", Tensor), ("q", Tensor), ("k", Tensor), ("v", Tensor), ("out", Tensor), ("lse", Tensor),
                       ("", AttentionParams))

# ------------------------------------------------------------------------------------------ the ops


@ARGS.custom_op("ptm::attention", returns=Tuple[Tensor, Tensor])
def _attention(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams) -> Tuple[Tensor, Tensor]:
    return tuple(backend.kernels("attention", q, k).attention_fwd(q, k, v, _expand(q, k, params)))


@ARGS.register_fake(_attention)
def _(q, k, v, params):
    B, H, Lq, D = q.shape
    return q.new_empty(B, H, Lq, D), q.new_empty(B, H, Lq, dtype=compute_dtype(q))


@BACKWARD_ARGS.custom_op("ptm::attention_backward", returns=Tuple[Tensor, Tensor, Tensor, Tensor, Tensor])
def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        params: AttentionParams) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dbias, dtoeplitz = backend.kernels("attention", q, k).attention_bwd(
        dout, q, k, v, out, lse, _expand(q, k, params))
    bias = params.bias
    if bias.dense_requires_grad:  # the kernel gives [B, H, Lq, Lk] float32: sum over the bias's broadcast dims
        dbias = dbias.sum_to_size(bias.dense.shape).to(bias.dense.dtype)
    return dq, dk, dv, dbias, dtoeplitz


@BACKWARD_ARGS.register_fake(_attention_backward)
def _(dout, q, k, v, out, lse, params):
    bias = params.bias
    dbias = bias.dense.new_empty(bias.dense.shape) if bias.dense_requires_grad else q.new_empty(0)
    dtoeplitz = bias.toeplitz.new_empty(bias.toeplitz.shape) if bias.toeplitz_requires_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dtoeplitz


def _attention_setup(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ARGS.save(ctx, inputs, out, lse)


def _attention_grad(ctx, dout, _dlse):
    (out, lse), (q, k, v, params) = ARGS.saved(ctx)
    dq, dk, dv, dbias, dtable = BACKWARD_ARGS.call(_attention_backward, _unit_stride(dout), q, k, v, out, lse, params)
    bias = params.bias
    return ARGS.grads({"q": dq, "k": dk, "v": dv, "bias.dense": dbias if bias.dense_requires_grad else None,
                       "bias.toeplitz": dtable if bias.toeplitz_requires_grad else None})


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def _expand(q: Tensor, k: Tensor, params: AttentionParams) -> AttentionParams:
    """Broadcast parts as the kernels take them: views expanded to [B, H, ...] with stride 0, no copy."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    vis = params.vis.expanded(B, H, Lq, Lk)
    bias = params.bias
    if bias.dense is not None:
        bias = replaced(bias, dense=bias.dense.expand(B, H, Lq, Lk))
    if vis is params.vis and bias is params.bias:
        return params
    return replaced(params, vis=vis, bias=bias)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.compiler.assume_constant_result
def _tile(device_type: str, dtype: torch.dtype, head_dim: int, dense: bool) -> Optional[Tuple[int, int]]:
    """The (block_m, block_n) of the backend that will run, or None when it takes no block map: none at all,
    or none without a `dense` mask part (`attention_block_map_dense_only`: it classifies the other parts itself).

    A constant under torch.compile: the backend is chosen when the graph is traced (a kernel handed a block
    map of another tile size ignores it, so a later override stays correct).
    """
    # The backend is chosen on every call (an override or PTM_KERNELS_BACKEND may have changed); its tile
    # function's answer is cached, keyed on the function itself, so a replaced one is asked again.
    mod = backend.module(backend.choice("attention", device_type, dtype))
    tile = getattr(mod, "attention_tile", None)
    if tile is None or (not dense and getattr(mod, "attention_block_map_dense_only", False)):
        return None
    return _tile_of(tile, device_type, dtype, head_dim)


@functools.lru_cache(maxsize=64)
def _tile_of(tile, device_type: str, dtype: torch.dtype, head_dim: int) -> Tuple[int, int]:
    return tuple(int(b) for b in tile(head_dim, dtype, torch.device(device_type)))


# -------------------------------------------------------------------------------------- public API


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[AttentionMask] = None, *,
              scale: Optional[float] = None, dropout_p: float = 0.0, seed: Optional[Union[int, Tensor]] = None,
              generator: Optional[torch.Generator] = None, return_lse: bool = False):
    """softmax(scale * q @ k^T + biases, masked) @ v, fused; q [B, H, Lq, D], k and v [B, Hk, Lk, D].

    Any strides with a unit last-dimension stride are read in place (a [B, L, H, D] projection can be passed
    as `.transpose(1, 2)`); k/v may have fewer heads than q (GQA/MQA: H % Hk == 0, query head h reads kv head
    h // (H // Hk)). Head dims 16 to 256; float16, bfloat16, float32 (float64 runs on the reference backend).
    `scale` defaults to 1/sqrt(D) (T5 wants 1.0). A query row that sees no key returns zeros (zero gradients);
    a NaN or +inf score at a key the row sees makes the row NaN, as in torch's SDPA. B, H, Lq or Lk may be 0:
    an empty result, or zeros for Lk = 0, as torch gives.

    Dropout of the attention probabilities happens inside the kernel. The mask is drawn from `seed` (an int:
    the same seed gives the same result on the same backend), else from `generator`, else from torch's default
    generator, so torch.manual_seed makes training reproducible. Under torch.compile, pass neither (or an
    int seed): a generator object is not traceable.

    With `return_lse`, also returns the log-sum-exp of each row's scores, float32 [B, H, Lq] (-inf for a row
    that sees no key); it carries no gradient.
    """
    _check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if mask is None:
        mask = AttentionMask()
    elif not isinstance(mask, AttentionMask):
        raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}; wrap a bool tensor "
                        f"with AttentionMask.dense(...) and a float one with AttentionMask.bias(...), or use "
                        f"ptm_kernels.scaled_dot_product_attention")
    scale = _scale(scale, D)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")

    params = attention_params(q, k, mask, scale, dropout_p, seed, generator)
    out, lse = ARGS.call(_attention, _unit_stride(q), _unit_stride(k), _unit_stride(v), params)
    return (out, lse) if return_lse else out


def op_args(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float, dropout_p: float, seed=None,
            generator=None) -> tuple:
    """The flat arguments of ptm::attention for checked inputs (see `attention_params`)."""
    return ARGS.flatten(_unit_stride(q), _unit_stride(k), _unit_stride(v),
                        attention_params(q, k, mask, scale, dropout_p, seed, generator))


def attention_params(q: Tensor, k: Tensor, mask: AttentionMask, scale: float, dropout_p: float, seed=None,
                     generator=None) -> AttentionParams:
    """The mask resolved for these shapes, with the block map at the tile of the backend that will run (none
    when it takes none), the biases (a gradient for each that requires one), the dropout seed."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    empty = q.numel() == 0 or k.numel() == 0  # runs on the reference, which takes no block map
    vis = mask.visibility(B, H, Lq, Lk, q.device)
    tile = _tile(q.device.type, q.dtype, D, vis.dense_mask is not None) if mask.has_visibility and not empty else None
    if tile is not None:
        vis = mask.visibility(B, H, Lq, Lk, q.device, tile)
    bias, table = mask.scores(B, H, Lq, Lk, q)
    return AttentionParams(
        scale=scale, vis=vis,
        bias=Bias(dense=bias, toeplitz=table, dense_requires_grad=bias is not None and bias.requires_grad,
                  toeplitz_requires_grad=table is not None and table.requires_grad),
        dropout=Dropout(p=float(dropout_p), seed=_seed(dropout_p, seed, generator)))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """A drop-in for torch.nn.functional.scaled_dot_product_attention (same arguments, same meaning).

    What the kernels cover runs on them: 2-D to 4-D q, k, v of one float dtype and device with equal batch
    dims, head dims 16 to 256 (the value's equal to the query's), no empty dimension, k and v of one shape
    (fewer heads with enable_gqa), an attn_mask that is bool or of q's dtype and broadcasts to [..., L, S],
    dropout_p in [0, 1), a finite scale, and not is_causal together with attn_mask. Everything else
    is handed to torch's own function, which computes it or raises its own error, and is counted in
    `ptm_kernels.fallbacks` with the reason; so this function raises exactly where torch does.

    attn_mask: bool (True = takes part) or float (added to the scores). is_causal is top-left aligned like
    torch's (key j visible to query i iff j <= i, also when L != S; our AttentionMask.causal() is bottom-right
    aligned). A bool mask of shape [B|1, 1, 1, S] becomes key padding (lengths when each row is a prefix), a
    float mask made only of 0 and -inf becomes a bool mask, other masks take the dense path with block
    skipping. A row with no visible key gives zeros, like torch 2.13 on CPU for bool and -inf masks alike.
    A NaN propagates as in torch's math kernel (torch's fused CPU kernel instead gives 0 for a query row that
    holds a NaN when there is no mask, and NaN rows for is_causal with a negative scale). Dropout draws from
    torch's default generator, as torch does, but a different mask.
    """
    reason = _sdpa_uncovered(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        fallbacks.record("scaled_dot_product_attention", reason)  # after torch accepted it: not for errors
        return out
    dims = query.dim()
    q, k, v = (t.view((1,) * (4 - dims) + tuple(t.shape)) for t in (query, key, value))
    mask = AttentionMask.causal(align="top_left") if is_causal else AttentionMask()
    if attn_mask is not None:
        _check_sdpa_mask_broadcast(attn_mask, query, key)
        mask = _sdpa_mask(attn_mask, dims, q)
    out = attention(q, k, v, mask, scale=scale, dropout_p=dropout_p)
    return out.view(query.shape)


def _sdpa_uncovered(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """Why the kernels do not cover these SDPA arguments (then torch's SDPA runs them), or None.

    Also every argument torch refuses ends here, so torch raises its own error for it."""
    qkv = (query, key, value)
    if not all(isinstance(t, Tensor) for t in qkv) or not isinstance(is_causal, bool) or \
            not isinstance(enable_gqa, bool):
        return "argument types"
    if any(t.layout != torch.strided or t.is_nested for t in qkv):
        return "nested or sparse tensors"
    if not 2 <= query.dim() <= 4:
        return f"{query.dim()}-D inputs"
    if key.dim() != query.dim() or value.dim() != query.dim():
        return "q, k, v of different ranks"
    if len({t.dtype for t in qkv}) > 1 or query.dtype not in _checks.FLOAT_DTYPES:
        return f"dtype {query.dtype}" if query.dtype not in _checks.FLOAT_DTYPES else "mixed dtypes"
    if len({t.device for t in qkv}) > 1:
        return "q, k, v on different devices"
    if query.device.type not in ("cpu", "cuda"):
        return f"device {query.device.type}"
    if value.shape[-1] != query.shape[-1]:
        return "value head dim != query head dim"
    if not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if key.shape != value.shape or key.shape[-1] != query.shape[-1] or key.shape[:-3] != query.shape[:-3]:
        return "q, k, v shapes the kernels do not take (broadcast batch, different k and v)"
    if enable_gqa and query.dim() < 3:  # torch looks for the heads at dim -3
        return "enable_gqa with 2-D inputs"
    if query.dim() >= 3:
        H, Hk = query.shape[-3], key.shape[-3]
        if H != Hk and not (enable_gqa and Hk > 0 and H % Hk == 0):
            return "q, k heads differ without grouped-query attention"
    if any(n == 0 for t in qkv for n in t.shape):
        return "an empty dimension"
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype not in (torch.bool, query.dtype):
            return "attn_mask dtype"
        if attn_mask.layout != torch.strided or attn_mask.is_nested:
            return "nested or sparse attn_mask"
        if not 2 <= attn_mask.dim() <= query.dim():
            return "attn_mask rank"
        if attn_mask.device != query.device:
            return "attn_mask on another device"
        if is_causal:  # torch's kernels differ: some apply both, some refuse
            return "is_causal with attn_mask"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return "dropout_p outside [0, 1)"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return "scale not a finite number"
    return None


def _check_sdpa_mask_broadcast(attn_mask: Tensor, query: Tensor, key: Tensor) -> None:
    """torch raises RuntimeError for an attn_mask that does not broadcast to [..., L, S]; so do we, saying which."""
    scores = tuple(query.shape[:-1]) + (key.shape[-2],)  # [..., H, L, S]: the query's heads also under GQA
    if any(m not in (1, f) for m, f in zip(attn_mask.shape[::-1], scores[::-1])):
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention "
                           f"scores' shape {list(scores)} (L = {scores[-2]} queries, S = {scores[-1]} keys)")


def _sdpa_mask(attn_mask: Tensor, dims: int, q: Tensor) -> AttentionMask:
    """An SDPA attn_mask as an AttentionMask: recognise key padding, else dense (bool) or bias (float)."""
    m = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.dtype != torch.bool and not m.requires_grad and not torch.compiler.is_compiling():
        hidden = torch.isneginf(m)
        if bool((hidden | (m == 0)).all()):  # an additive 0 / -inf mask is a visibility mask
            m = ~hidden
    if m.dtype != torch.bool:
        return AttentionMask.bias(m)
    if m.shape[1] == 1 and m.shape[2] == 1 and m.shape[3] > 1:  # [B|1, 1, 1, S]: key padding
        return AttentionMask.key_padding(mask=m.view(m.shape[0], m.shape[3]))
    return AttentionMask.dense(m)


# ------------------------------------------------------------------------------------------- checks


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, dim=4)
    _checks.same_dtype("q", q, k=k, v=v)
    _checks.same_device("q", q, k=k, v=v)
    B, H, Lq, D = q.shape
    _, Hk, Lk, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, Hk, Lk, D={D}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)} (batch, kv heads, keys, and the head dim of q), "
                         f"got {tuple(v.shape)}")
    if (H % Hk if Hk else H):  # B, H, Lq or Lk may be 0 (an empty result, as torch's SDPA gives)
        raise ValueError(f"q has {H} heads, not a multiple of k's {Hk} heads (GQA/MQA need H % Hk == 0)")
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (last dim of q, k, v) must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {D}")


def _scale(scale, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None (1/sqrt(head dim)), got {scale!r}")
    return float(scale)


def _seed(dropout_p: float, seed, generator) -> Optional[Tensor]:
    """The dropout seed as an int64 scalar tensor (a tensor so that torch.compile can draw it in-graph)."""
    if dropout_p == 0:
        return None
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, generator=generator, device=device)
    if isinstance(seed, Tensor):
        _checks.tensor("seed", seed, dtypes=(torch.int64, torch.int32))
        if seed.numel() != 1:
            raise ValueError(f"seed must be an int or a one-element tensor, got shape {tuple(seed.shape)}")
        return seed.reshape(()).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)
