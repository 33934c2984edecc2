"""`attn_implementation="ptm"`: transformers' attention on `ptm_kernels.attention`, its masks as analytic parts.

    import ptm_kernels.hf
    ptm_kernels.hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ptm")   # or model.set_attn_implementation("ptm")

transformers builds a model's mask once per forward through the *mask interface*: it calls our `mask_function`
with the shapes, the cache offsets, the 2-D `attention_mask` and a `mask_function(b, h, q_idx, kv_idx)` closure
that describes the pattern (causal, sliding window, packed sequences, ...). Every attention layer then gets what we
returned and calls our `attention_forward`.

We read the closure instead of evaluating it: transformers composes its patterns from a handful of factories
(`causal_mask_function`, `sliding_window_overlay`, `and_masks`, `padding_mask_function`,
`packed_sequence_mask_function`, `remap_positions_for_packed_sequence`), and each maps to an `AttentionMask` part:

    causal_mask_function                       -> causal()                        (bottom-right: the KV cache offset)
    sliding_window_overlay(w)  (kv > q - w)    -> sliding_window(w - 1, None)     (Mistral: w - 1 earlier keys + itself)
    sliding_window_bidirectional_overlay(w)    -> sliding_window(w, w)
    bidirectional_mask_function                -> nothing (every key)
    the 2-D attention_mask (padding)           -> key_padding(mask=...): lengths for right padding, an O(L) [B,1,1,Lk]
                                                  part for left padding (generate)
    packed sequences (position_ids restarts)   -> segments(ids)  (DataCollatorWithFlattening)

Anything else (or_masks, chunked attention, block overlays, user mask functions, offsets that do not line up with
the bottom-right alignment, e.g. a static cache) is evaluated by transformers' own `sdpa_mask` and handed to the
kernel as a dense part: still exact, only slower (counted in `ptm_kernels.fallbacks` as "hf_attention_mask").

A query row that sees no key at all (the padded positions of a left-padded batch) gives zeros, as torch's SDPA
does; transformers' eager path gives an average over the masked keys there. Those rows are padding either way
(generate never reads them; a loss must not label them).

The attention function refuses (raises) what it cannot honour and the kernel does not do: soft-capping, attention
sinks, head masks, returning the attention weights. Head dims outside the kernel's 16..256 or a value head dim
different from the query's go to torch's SDPA (counted in `ptm_kernels.fallbacks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor
from transformers import masking_utils
from transformers.integrations.sdpa_attention import create_position_bias_mask, repeat_kv
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .. import fallbacks
from ..attention_mask import AttentionMask
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, attention, scaled_dot_product_attention
from ..reference_kernels import attention_mask_dense

NAME = "ptm"

# kwargs transformers may pass that change the math and that the kernel does not do
_REFUSED = {"softcap": "soft-capping", "s_aux": "attention sinks", "sinks": "attention sinks",
            "head_mask": "a head mask"}


def register() -> None:
    """Register "ptm" with transformers' attention and mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_function)


# ------------------------------------------------------------------------------------------- the mask


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function: Callable = masking_utils.causal_mask_function,
                  attention_mask: Optional[Tensor] = None, device="cpu", **kwargs) -> AttentionMask:
    """transformers' mask interface (same arguments as `masking_utils.sdpa_mask`): an `AttentionMask`."""
    if isinstance(attention_mask, AttentionMask):  # one we made before (generate prepares them for static caches)
        return attention_mask
    mask = _analytic_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    if mask is None:
        fallbacks.record("hf_attention_mask", "mask function not analysed: dense part")
        dense = masking_utils.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, use_vmap=kwargs.get("use_vmap", False), device=device)
        mask = AttentionMask.dense(dense)
    return PreparedMask(**{f.name: getattr(mask, f.name) for f in dataclasses.fields(mask) if f.init})


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedMask(AttentionMask):
    """The AttentionMask our mask function returns. generate (static caches) builds masks ahead and hands them
    back to the model as its `attention_mask`; transformers tells a prepared mask from a 2-D padding mask by
    `.ndim` (4 = prepared, use as is), so this one says 4."""

    ndim = 4  # a class attribute, not a mask part


def _analytic_mask(B, Lq, Lk, q_offset, kv_offset, fn, attention_mask) -> Optional[AttentionMask]:
    """The AttentionMask of transformers' pattern `fn` AND the 2-D padding mask, or None if not analysable."""
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)):
        return None  # a static cache under compile hands tensor offsets
    # the patterns are in absolute positions (q_offset + i, kv_offset + j); ours are bottom-right aligned
    # (i' = i + Lk - Lq), so a relative pattern carries over iff the two alignments agree
    aligned = q_offset - kv_offset == Lk - Lq
    terms = _terms(fn)
    if terms is None:
        return None
    mask = AttentionMask()
    for kind, arg in terms:
        if kind in ("causal", "window", "remapped") and not aligned:
            return None
        if kind in ("causal", "window"):
            mask = mask & _relative_part(kind, arg)
        elif kind == "remapped":  # relative parts evaluated on positions: see _remap_is_relative
            for inner_kind, inner_arg in arg[1]:
                mask = mask & _relative_part(inner_kind, inner_arg)
        elif kind == "padding":
            mask = _and_key_padding(mask, arg, Lk, kv_offset)
        elif kind == "segments":
            ids = arg
            if ids.shape[-1] < max(q_offset + Lq, kv_offset + Lk):
                return None
            mask = mask & AttentionMask.segments(ids[:, q_offset:q_offset + Lq], ids[:, kv_offset:kv_offset + Lk])
    if any(kind == "remapped" for kind, _ in terms) and not _remap_is_relative(terms):
        return None
    if attention_mask is not None:  # sdpa_mask ANDs the 2-D padding mask in the same way
        mask = _and_key_padding(mask, attention_mask, Lk, kv_offset)
    return mask


def _relative_part(kind: str, arg) -> AttentionMask:
    return AttentionMask.causal() if kind == "causal" else AttentionMask.sliding_window(*arg)


def _and_key_padding(mask: AttentionMask, padding: Tensor, Lk: int, kv_offset: int) -> AttentionMask:
    """mask & the keys that transformers' padding mask keeps: it reads padding[b, kv_offset + j] (zero-padded on
    the right if shorter). A mask that keeps every key adds nothing: left out (one sync outside torch.compile,
    as transformers' own sdpa_mask does), which saves building the part on every decode step of `generate`."""
    padding = masking_utils.prepare_padding_mask(padding, Lk, kv_offset)[:, kv_offset:kv_offset + Lk]
    if not torch.compiler.is_compiling() and padding.shape[-1] == Lk and bool(padding.all()):
        return mask
    return mask & AttentionMask.key_padding(mask=padding)


def _remap_is_relative(terms) -> bool:
    """remap_positions_for_packed_sequence evaluates the inner pattern on position_ids instead of indices. Our
    causal/window parts are in indices: the same thing iff, within each packed segment, positions step by one
    (how transformers finds the segments). Checked (one sync) outside torch.compile."""
    segments = [arg for kind, arg in terms if kind == "segments"]
    remaps = [arg for kind, arg in terms if kind == "remapped"]
    if len(segments) != 1:
        return False
    if torch.compiler.is_compiling():
        return True  # transformers derives both from the same position_ids
    ids = segments[0]
    for position_ids, _ in remaps:
        if position_ids.shape != ids.shape:
            return False
        same_segment = ids[:, 1:] == ids[:, :-1]
        if not bool(((position_ids[:, 1:] - position_ids[:, :-1] == 1) | ~same_segment).all()):
            return False
    return True


def _closure(fn) -> Dict[str, Any]:
    names = fn.__code__.co_freevars
    return {n: c.cell_contents for n, c in zip(names, fn.__closure__ or ())}


def _factory_code(make) -> Any:
    try:
        return make().__code__
    except Exception:  # a transformers version without this factory: patterns built with it go dense
        return None


_t = torch.zeros(1, 1, dtype=torch.bool)
_CODE = {
    "and": _factory_code(lambda: masking_utils.and_masks(masking_utils.causal_mask_function)),
    "window": _factory_code(lambda: masking_utils.sliding_window_overlay(1)),
    "bidirectional_window": _factory_code(lambda: masking_utils.sliding_window_bidirectional_overlay(1)),
    "padding": _factory_code(lambda: masking_utils.padding_mask_function(_t)),
    "segments": _factory_code(lambda: masking_utils.packed_sequence_mask_function(_t)),
    "remap": _factory_code(lambda: masking_utils.remap_positions_for_packed_sequence(
        masking_utils.causal_mask_function, _t)),
}
del _t


def _terms(fn) -> Optional[List[tuple]]:
    """The AND-ed terms of a transformers mask function, or None if it contains anything else."""
    if fn is masking_utils.causal_mask_function:
        return [("causal", None)]
    if fn is masking_utils.bidirectional_mask_function:
        return []
    code = getattr(fn, "__code__", None)
    if code is None or code not in _CODE.values():
        return None
    env = _closure(fn)
    if code is _CODE["and"]:
        out = []
        for inner in env["mask_functions"]:
            t = _terms(inner)
            if t is None:
                return None
            out += t
        return out
    if code is _CODE["window"]:  # kv > q - w: w - 1 keys before the query, and itself
        return [("window", (int(env["sliding_window"]) - 1, None))]
    if code is _CODE["bidirectional_window"]:  # |q - kv| <= w
        w = int(env["sliding_window"])
        return [("window", (w, w))]
    if code is _CODE["padding"]:
        return [("padding", env["padding_mask"])]
    if code is _CODE["segments"]:
        return [("segments", env["packed_sequence_mask"])]
    if code is _CODE["remap"]:
        inner = _terms(env["mask_function"])
        if inner is None or any(kind not in ("causal", "window") for kind, _ in inner):
            return None  # only relative patterns survive the remapping unchanged
        return [("remapped", (env["position_ids"], inner))]
    return None


# -------------------------------------------------------------------------------------- the attention


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs) -> tuple:
    """transformers' attention interface: q [B, H, Lq, D], k/v [B, Hk, Lk, D] -> ([B, Lq, H, D], None)."""
    for name, what in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='ptm' does not do {what} ({name}={kwargs[name]!r}); use "
                             f"attn_implementation='eager' for this model")
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='ptm' does not return attention weights (output_attentions=True); "
                         "use attn_implementation='eager' to get them")
    position_bias = kwargs.get("position_bias")
    Lq, D = query.shape[2], query.shape[3]
    if not isinstance(attention_mask, AttentionMask):
        # not built by our mask function: None (a model that makes no mask) or a tensor the user passed as 4-D
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        is_causal = bool(is_causal) and Lq > 1 and attention_mask is None  # exactly as transformers' sdpa
        if attention_mask is None:
            attention_mask = AttentionMask.causal("top_left") if is_causal else AttentionMask()
        else:
            if position_bias is not None:
                attention_mask = create_position_bias_mask(position_bias, attention_mask, False, query, key)
            if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and value.shape[-1] == D):
                return _torch_sdpa(module, query, key, value, attention_mask, dropout, scaling)
            out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                               scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
    mask = attention_mask
    if position_bias is not None:
        mask = mask & AttentionMask.bias(position_bias)
    if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and value.shape[-1] == D):
        B, H, Lk = query.shape[0], query.shape[1], key.shape[2]
        vis = mask.visibility(B, H, Lq, Lk, query.device)
        dense = attention_mask_dense(B, H, Lq, Lk, query.device, vis)
        bias, table = mask.scores(B, H, Lq, Lk, query)
        if bias is not None or table is not None:
            raise ValueError(f"attn_implementation='ptm': head dim {D} (value {value.shape[-1]}) is outside the "
                             f"kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM} and the mask has a bias: use 'sdpa'")
        return _torch_sdpa(module, query, key, value, dense, dropout, scaling)
    out = attention(query, key, value, mask, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _torch_sdpa(module, query, key, value, mask, dropout, scaling) -> tuple:
    """Head dims the kernel does not take: torch's SDPA, counted."""
    fallbacks.record("hf_attention", f"head dim {query.shape[-1]} / value head dim {value.shape[-1]}")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None
