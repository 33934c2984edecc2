"""AttentionMask: which keys each query sees, and what is added to its scores, as parts that compose.

    mask = AttentionMask.causal() & AttentionMask.key_padding(lengths=lens)   # a decoder with right padding
    out = ptm_kernels.attention(q, k, v, mask)

Parts, for query i and key j, with i' = i + Lk - Lq the query's position in key coordinates (so a KV cache,
Lq < Lk, lines up at the bottom right, like FlashAttention):

    causal()                      visible iff j <= i'       (align="top_left": j <= i, SDPA's is_causal)
    sliding_window(left, right)   visible iff i' - left <= j <= i' + right      (None: unbounded side)
    key_padding(lengths=...)      visible iff j < lengths[b]
    key_padding(mask=...)         visible iff mask[b, j]            (True / nonzero = a real token)
    prefix_lm(lengths)            visible iff j < lengths[b] or j <= i'   (bidirectional prefix, causal after)
    segments(q_ids, k_ids)        visible iff q_ids[b, i] == k_ids[b, j]  (packed documents)
    dense(mask)                   visible iff mask[b, h, i, j]      (bool, broadcastable to [B, H, Lq, Lk])
    bias(b)                       adds b[b, h, i, j] to the scaled scores (broadcastable; gets a gradient)
    toeplitz(table)               adds table[h, i - j + Lk - 1]     (T5 buckets, ALiBi; gets a gradient)

`a & b` keeps what both keep and adds both biases. Two parts of the same kind combine the same way:
causal twice is causal; two windows intersect; two key paddings or two prefix-LMs take the smaller
length; dense masks AND; biases and Toeplitz tables add. Two exceptions raise: two `segments` parts (combine
the ids yourself, e.g. `ids1 * n + ids2`), and `prefix_lm` with `causal` (prefix-LM already is causal after
the prefix; AND-ing plain causal in would silently cancel the bidirectional prefix).

A bool key-padding mask becomes lengths when every row is a prefix of True (checked once, when the part is
built or rebuilt; under torch.compile it is not checked); otherwise it is a dense part of shape [B, 1, 1, Lk], O(Lk)
memory, broadcast over heads and queries.

The mask does not know the shapes until it is used; then every part checks its sizes against q and k (an
error names the part and both sizes). `block_map(...)` and the kernel arguments are computed per
(B, H, Lq, Lk, device, tile) and cached on the object, so every layer of a model reuses them. A tensor given
to a part may still be changed in place (or `set_` to other storage) later: each use compares the tensors'
version counters and data pointers with those the mask was built from, and on a change rebuilds the mask
from its parts, so the result follows the new values. (Under torch.compile this check is not made: a traced
graph reads the mask's tensors as they were built.) Dropout is not a mask part: it is
`attention(..., dropout_p=)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _checks
from .dtypes import compute_dtype
from .kernel_params import Visibility  # the kernels' form of a mask's visibility parts

_ALL_VISIBLE = Visibility()  # what a mask without visibility parts gives for any shapes
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_CACHE_SIZE = 12  # entries per mask: a few shapes (e.g. train and eval lengths) per mask object, 3 each

Lengths = Union[Tensor, int, Sequence[int]]


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionMask:
    """An immutable attention mask built from parts; see the module docstring. Build it with the class
    methods and combine with `&`; `AttentionMask()` masks nothing."""

    is_causal: bool = False
    is_causal_top_left: bool = False
    window_left: Optional[int] = None
    window_right: Optional[int] = None
    key_lengths: Optional[Tensor] = None  # int64 [B] or [1]
    prefix_lengths: Optional[Tensor] = None  # int64 [B] or [1]
    q_ids: Optional[Tensor] = None  # int [B|1, Lq]
    k_ids: Optional[Tensor] = None  # int [B|1, Lk]; None: the same as q_ids
    dense_mask: Optional[Tensor] = None  # bool, 4-D
    additive_bias: Optional[Tensor] = None  # float, 4-D
    toeplitz_table: Optional[Tensor] = None  # float [H|1, Lq + Lk - 1]
    key_mask_widths: Tuple[int, ...] = ()  # the Lk each key_padding(mask=) part was given (its column count)
    _cache: Dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    # How to rebuild the mask from the user's tensors when one changes in place: the constructor calls it was
    # built from (a mask made with AttentionMask(...) directly stands for itself), and the stamp
    # (version, data pointer) of each of their tensors at build time.
    _parts: Tuple = dataclasses.field(default=(), init=False, repr=False)
    _stamp: Tuple = dataclasses.field(default=(), init=False, repr=False)
    _rebuilt: Dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------------------------------ parts

    @classmethod
    def causal(cls, align: str = "bottom_right") -> "AttentionMask":
        """Key j visible iff j <= i + Lk - Lq ("bottom_right"), or iff j <= i ("top_left", SDPA's is_causal).

        They differ only when Lq != Lk. Bottom-right is what a KV cache needs (the last query sees every key).
        """
        if align not in ("bottom_right", "top_left"):
            raise ValueError(f"causal: align must be 'bottom_right' or 'top_left', got {align!r}")
        return cls(is_causal=align == "bottom_right", is_causal_top_left=align == "top_left")

    @classmethod
    def sliding_window(cls, left: Optional[int], right: Optional[int]) -> "AttentionMask":
        """Key j visible iff i' - left <= j <= i' + right (i' = i + Lk - Lq); None leaves that side unbounded.

        GPT-Neo's local layers: `causal() & sliding_window(255, 0)` (or `sliding_window(255, 0)` alone).
        """
        for name, w in (("left", left), ("right", right)):
            if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
                raise ValueError(f"sliding_window: {name} must be a non-negative int or None, got {w!r}")
        return cls(window_left=left, window_right=right)

    @classmethod
    def key_padding(cls, lengths: Optional[Lengths] = None, *, mask: Optional[Tensor] = None) -> "AttentionMask":
        """Padded keys: `lengths` (int [B]: keys j < lengths[b] are real) or `mask` (bool or 0/1 [B, Lk]:
        True = real token, like transformers' attention_mask; note torch.nn.MultiheadAttention's
        key_padding_mask means the opposite)."""
        if (lengths is None) == (mask is None):
            raise ValueError("key_padding: give exactly one of lengths= or mask=")
        if lengths is not None:
            return _built_from(cls(key_lengths=_lengths("key_padding lengths", lengths)), "key_padding", lengths)
        _checks.tensor("key_padding mask", mask, dtypes=(torch.bool,) + INT_DTYPES)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        if mask.dim() != 2:
            raise ValueError(f"key_padding mask must be [B, Lk] or [Lk], got shape {tuple(mask.shape)}")
        given, mask, width = mask, mask.bool(), (mask.shape[1],)
        if not torch.compiler.is_compiling():  # a data-dependent check: one sync, once per mask (and rebuild)
            n = mask.sum(-1)
            if torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < n[:, None]):
                return _built_from(cls(key_lengths=n.to(torch.int64), key_mask_widths=width), "key_padding",
                                   mask=given)
        return _built_from(cls(dense_mask=mask[:, None, None, :], key_mask_widths=width), "key_padding", mask=given)

    @classmethod
    def prefix_lm(cls, lengths: Lengths) -> "AttentionMask":
        """Prefix-LM (UniLM seq2seq, GLM): keys j < lengths[b] are visible to every query (the bidirectional
        prefix); after it, attention is causal (bottom-right aligned). Includes the causal part."""
        return _built_from(cls(prefix_lengths=_lengths("prefix_lm lengths", lengths)), "prefix_lm", lengths)

    @classmethod
    def segments(cls, q_ids: Tensor, k_ids: Optional[Tensor] = None) -> "AttentionMask":
        """Packed sequences: key j visible to query i iff their ids are equal. q_ids int [B, Lq] (or [Lq]),
        k_ids int [B, Lk]; without k_ids the keys use q_ids (self-attention, Lq == Lk)."""

        def ids(name, t):
            _checks.tensor(name, t, dtypes=INT_DTYPES)
            t = t.unsqueeze(0) if t.dim() == 1 else t
            if t.dim() != 2:
                raise ValueError(f"{name} must be [B, L] or [L], got shape {tuple(t.shape)}")
            return t

        mask = cls(q_ids=ids("segments q_ids", q_ids), k_ids=None if k_ids is None else ids("segments k_ids", k_ids))
        return _built_from(mask, "segments", q_ids, k_ids)

    @classmethod
    def dense(cls, mask: Tensor) -> "AttentionMask":
        """Any visibility pattern: bool, True = visible, broadcastable to [B, H, Lq, Lk] (2 to 4 dims).
        Costs O(its size) memory; the kernels still skip its empty tiles (see `block_map`)."""
        _checks.tensor("dense mask", mask, dtypes=(torch.bool,))
        return _built_from(cls(dense_mask=_four_d("dense mask", mask)), "dense", mask)

    @classmethod
    def bias(cls, bias: Tensor) -> "AttentionMask":
        """An additive float bias, broadcastable to [B, H, Lq, Lk]; gets a gradient (summed over the
        broadcast dimensions) when it requires grad. -inf entries mask, like SDPA's float masks."""
        _checks.tensor("bias", bias)
        return _built_from(cls(additive_bias=_four_d("bias", bias)), "bias", bias)

    @classmethod
    def toeplitz(cls, table: Tensor) -> "AttentionMask":
        """A relative-position bias: adds table[h, i - j + Lk - 1] (table [H, Lq + Lk - 1], or [Lq + Lk - 1]
        shared by the heads). See `alibi` and `t5_relative_table` for the two usual tables."""
        _checks.tensor("toeplitz table", table)
        table = table.unsqueeze(0) if table.dim() == 1 else table
        if table.dim() != 2:
            raise ValueError(f"toeplitz table must be [H, Lq + Lk - 1] or [Lq + Lk - 1], got shape "
                             f"{tuple(table.shape)}")
        return _built_from(cls(toeplitz_table=table), "toeplitz", table)

    @classmethod
    def alibi(cls, slopes: Tensor, Lq: int, Lk: int) -> "AttentionMask":
        """ALiBi: adds -slopes[h] * |i' - j| (use with causal() for decoders). slopes: `alibi_slopes(H)`."""
        return cls.toeplitz(alibi_table(slopes, Lq, Lk))

    # -------------------------------------------------------------------------------------- combining

    def __and__(self, other: "AttentionMask") -> "AttentionMask":
        if not isinstance(other, AttentionMask):
            return NotImplemented
        a, b = self, other
        if (a.prefix_lengths is not None and (b.is_causal or b.is_causal_top_left)) or \
                (b.prefix_lengths is not None and (a.is_causal or a.is_causal_top_left)):
            raise ValueError("prefix_lm already is causal after the prefix; combining it with causal() would "
                             "cancel the bidirectional prefix. Use prefix_lm alone.")
        if a.q_ids is not None and b.q_ids is not None:
            raise ValueError("two segments parts: combine the ids into one part (e.g. ids1 * n + ids2)")
        both = AttentionMask(
            is_causal=a.is_causal or b.is_causal,
            is_causal_top_left=a.is_causal_top_left or b.is_causal_top_left,
            window_left=_combine(min, a.window_left, b.window_left),
            window_right=_combine(min, a.window_right, b.window_right),
            key_lengths=_combine(torch.minimum, a.key_lengths, b.key_lengths),
            prefix_lengths=_combine(torch.minimum, a.prefix_lengths, b.prefix_lengths),
            q_ids=a.q_ids if a.q_ids is not None else b.q_ids,
            k_ids=a.k_ids if a.q_ids is not None else b.k_ids,
            dense_mask=_combine(_broadcasting(torch.logical_and, "dense masks"), a.dense_mask, b.dense_mask),
            additive_bias=_combine(_broadcasting(torch.add, "biases"), a.additive_bias, b.additive_bias),
            toeplitz_table=_combine(_broadcasting(torch.add, "toeplitz tables"), a.toeplitz_table,
                                    b.toeplitz_table),
            key_mask_widths=a.key_mask_widths + b.key_mask_widths,
        )
        if not torch.compiler.is_compiling():  # the stamps at the parts' construction, so a change made
            # to a tensor between building a part and this `&` is still seen
            object.__setattr__(both, "_parts", a._recipe() + b._recipe())
            object.__setattr__(both, "_stamp", a._built_stamp() + b._built_stamp())
        return both

    def __repr__(self) -> str:
        parts = []
        if self.is_causal:
            parts.append("causal()")
        if self.is_causal_top_left:
            parts.append("causal(align='top_left')")
        if self.window_left is not None or self.window_right is not None:
            parts.append(f"sliding_window({self.window_left}, {self.window_right})")
        for name, t in (("key_padding", self.key_lengths), ("prefix_lm", self.prefix_lengths),
                        ("segments", self.q_ids), ("dense", self.dense_mask), ("bias", self.additive_bias),
                        ("toeplitz", self.toeplitz_table)):
            if t is not None:
                parts.append(f"{name}({list(t.shape)})")
        return "AttentionMask(" + " & ".join(parts) + ")"

    @property
    def has_visibility(self) -> bool:
        """Whether any part hides keys (bias and Toeplitz only add to the scores)."""
        return (self.is_causal or self.is_causal_top_left or self.window_left is not None
                or self.window_right is not None or self.prefix_lengths is not None or self.key_lengths is not None
                or self.q_ids is not None or self.dense_mask is not None)

    # ------------------------------------------------------------------------------ kernel arguments

    def visibility(self, B: int, H: int, Lq: int, Lk: int, device,
                   tile: Optional[Tuple[int, int]] = None) -> Visibility:
        """The kernel's Visibility for these shapes, checked (cached); with a (block_m, block_n) tile, it also
        carries the block map at that tile."""
        if not self.has_visibility:  # no mask, or only scores: nothing to check, and a mask rebuilt from the same
            return _ALL_VISIBLE  # parts hides nothing either (a fresh AttentionMask() per call finds no cache)
        current = self._current()
        if current is not self:
            return current.visibility(B, H, Lq, Lk, device, tile)
        device = torch.device(device)
        if tile is None:
            return self._cached(("visibility", B, H, Lq, Lk, device),
                                lambda: self._visibility(B, H, Lq, Lk, device))

        def with_map():
            vis = self.visibility(B, H, Lq, Lk, device)
            block_map = self.block_map(B, H, Lq, Lk, *tile, device)
            return vis if block_map is None else dataclasses.replace(vis, block_map=block_map, block_m=tile[0],
                                                                    block_n=tile[1])
        return self._cached(("visibility", B, H, Lq, Lk, device, tile), with_map)

    def _visibility(self, B, H, Lq, Lk, device) -> Visibility:
        full = (B, H, Lq, Lk)
        for width in self.key_mask_widths:
            if width != Lk:
                raise ValueError(f"key_padding mask has {width} columns but there are Lk = {Lk} keys; it must be "
                                 f"[B, Lk] = [{B} or 1, {Lk}]")
        left = -1 if self.window_left is None else self.window_left
        right = -1 if self.window_right is None else self.window_right
        causal = self.is_causal or self.prefix_lengths is not None
        dense = self.dense_mask
        if dense is not None:
            _check_broadcast("dense mask", dense, full)
            if dense.device != device:
                raise ValueError(f"dense mask is on {dense.device} but q is on {device}")
        if self.is_causal_top_left:  # j <= i, i.e. j - i' <= Lq - Lk: a window when Lq >= Lk
            if Lq == Lk:
                causal = True
            elif Lq > Lk:
                right = Lq - Lk if right < 0 else min(right, Lq - Lk)
            else:  # a negative window side cannot be expressed (-1 means unbounded): a broadcast dense part
                tril = torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril().view(1, 1, Lq, Lk)
                dense = tril if dense is None else dense & tril
        q_seg = k_seg = None
        if self.q_ids is not None:
            if self.k_ids is None and Lq != Lk:
                raise ValueError(f"segments(q_ids) without k_ids needs Lq == Lk, got Lq={Lq}, Lk={Lk}; "
                                 f"pass k_ids for cross-attention or a KV cache")
            q_seg = _per_batch("segments q_ids", self.q_ids, B, Lq, device)
            k_seg = q_seg if self.k_ids is None else _per_batch("segments k_ids", self.k_ids, B, Lk, device)
        return Visibility(causal=causal, window_left=left, window_right=right,
                          key_lengths=_batch_lengths("key_padding lengths", self.key_lengths, B, Lk, device),
                          prefix_lengths=_batch_lengths("prefix_lm lengths", self.prefix_lengths, B, Lk, device),
                          q_segments=q_seg, k_segments=k_seg, dense_mask=dense)

    def scores(self, B: int, H: int, Lq: int, Lk: int, q: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(bias, toeplitz table) as the kernels take them: bias 4-D broadcastable in q's dtype or float32,
        table [H, Lq + Lk - 1] in float32 (float64 for float64 q). Differentiable, so never cached."""
        current = self._current()
        if current is not self:
            return current.scores(B, H, Lq, Lk, q)
        bias = table = None
        if self.additive_bias is not None:
            bias = self.additive_bias
            _check_broadcast("bias", bias, (B, H, Lq, Lk))
            _checks.same_device("q", q, bias=bias)
            if bias.dtype not in (q.dtype, torch.float32):  # strides kept: a broadcast bias stays small
                bias = bias.to(compute_dtype(q))
        if self.toeplitz_table is not None:
            table = self.toeplitz_table
            if table.shape[0] not in (1, H) or table.shape[1] != Lq + Lk - 1:
                raise ValueError(f"toeplitz table must have shape [{H} or 1, Lq + Lk - 1 = {Lq + Lk - 1}] for "
                                 f"H={H}, Lq={Lq}, Lk={Lk}, got {tuple(table.shape)}")
            _checks.same_device("q", q, **{"toeplitz table": table})
            table = table.to(compute_dtype(q)).expand(H, -1).contiguous()
        return bias, table

    # ------------------------------------------------------------------------------------- block map

    def block_map(self, B: int, H: int, Lq: int, Lk: int, block_m: int, block_n: int,
                  device=None) -> Optional[Tensor]:
        """Per tile of block_m queries x block_n keys: 0 = no visible entry (skip the tile), 1 = some may be
        visible (apply the mask per element), 2 = every entry visible (no mask work). int8
        [B|1, H|1, ceil(Lq / block_m), ceil(Lk / block_n)]; None when no part hides anything.

        Exact for 0 and 2 (a tile is 2 only if all its entries are visible, 0 only if none is); a tile
        where each part alone shows something but their AND shows nothing may be 1, and a tile that extends
        past Lq or Lk (the last row or column of tiles when block_m or block_n does not divide it) is never 2,
        since its out-of-range entries still need masking. Analytic parts use
        range arithmetic per tile, segments per-tile min/max of the ids, dense masks any/all reductions:
        no [Lq, Lk] tensor is built for the analytic parts. Cached per shapes, tile and device.
        """
        if not self.has_visibility:
            return None
        current = self._current()
        if current is not self:
            return current.block_map(B, H, Lq, Lk, block_m, block_n, device)
        device = torch.device(device) if device is not None else self._device()
        key = ("block_map", B, H, Lq, Lk, block_m, block_n, device)
        return self._cached(key, lambda: self._block_map(B, H, Lq, Lk, block_m, block_n, device))

    def _block_map(self, B, H, Lq, Lk, bm, bn, device) -> Tensor:
        vis = self.visibility(B, H, Lq, Lk, device)
        nm, nn = -(-Lq // bm), -(-Lk // bn)
        r0 = torch.arange(nm, device=device) * bm  # first and last row of each query tile
        r1 = torch.clamp(r0 + bm, max=Lq) - 1
        c0 = torch.arange(nn, device=device) * bn  # first and last column of each key tile
        c1 = torch.clamp(c0 + bn, max=Lk) - 1
        # d = i' - j over a tile takes every integer in [dmin, dmax]
        dmin = (r0 + Lk - Lq).view(-1, 1) - c1.view(1, -1)
        dmax = (r1 + Lk - Lq).view(-1, 1) - c0.view(1, -1)
        states = []

        # causal, window and top-left causal together are one band lo <= d <= hi
        lo = [-self.window_right] if self.window_right is not None else []
        if self.is_causal:
            lo.append(0)
        if self.is_causal_top_left:
            lo.append(Lk - Lq)
        hi = self.window_left
        if lo or hi is not None:
            lo_ = max(lo) if lo else None
            any_ = torch.ones_like(dmin, dtype=torch.bool)
            all_ = torch.ones_like(dmin, dtype=torch.bool)
            if lo_ is not None:
                any_, all_ = any_ & (dmax >= lo_), all_ & (dmin >= lo_)
            if hi is not None:
                any_, all_ = any_ & (dmin <= hi), all_ & (dmax <= hi)
            states.append(_state(any_, all_).view(1, 1, nm, nn))
        if vis.prefix_lengths is not None:  # visible iff d >= 0 or j < p
            p = vis.prefix_lengths.view(B, 1, 1)
            states.append(_state((dmax >= 0) | (c0.view(1, -1) < p), (dmin >= 0) | (c1.view(1, -1) < p))
                          .view(B, 1, nm, nn))
        if vis.key_lengths is not None:  # visible iff j < n
            n = vis.key_lengths.view(B, 1)
            states.append(_state(c0.view(1, -1) < n, c1.view(1, -1) < n).view(B, 1, 1, nn))
        if vis.q_segments is not None:
            qmin, qmax = _tile_min_max(vis.q_segments, bm)
            kmin, kmax = _tile_min_max(vis.k_segments, bn)
            qmin, qmax, kmin, kmax = qmin[:, :, None], qmax[:, :, None], kmin[:, None, :], kmax[:, None, :]
            all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
            any_ = (qmax >= kmin) & (kmax >= qmin)  # the id ranges overlap
            states.append(_state(any_, all_).unsqueeze(1))
        if self.dense_mask is not None:  # the user's dense part (top-left causal is in the band above)
            states.append(_dense_state(self.dense_mask, bm, bn))
        out = states[0]
        for s in states[1:]:
            out = torch.minimum(out, s)  # AND of parts: 0 if any part is 0, 2 if all are 2
        b = B if out.shape[0] != 1 else 1
        h = H if out.shape[1] != 1 else 1
        out = out.expand(b, h, nm, nn).contiguous()
        # a tile that sticks out past Lq or Lk still needs its out-of-range rows/columns masked: never 2
        if Lq % bm:
            out[:, :, -1].clamp_(max=1)
        if Lk % bn:
            out[..., -1].clamp_(max=1)
        return out

    # ---------------------------------------------------------------------------------------- helpers

    def _device(self) -> torch.device:
        for t in (self.dense_mask, self.key_lengths, self.prefix_lengths, self.q_ids, self.additive_bias):
            if t is not None:
                return t.device
        return torch.device("cpu")

    def _recipe(self) -> Tuple:
        """The parts to rebuild this mask from: its constructor calls, or the mask itself if made directly."""
        return self._parts if self._parts else (self,)

    def _built_stamp(self) -> Tuple:
        return self._stamp if self._parts else _stamp((self,))

    def _current(self) -> "AttentionMask":
        """This mask, or, if a tensor it was built from changed in place since, the mask rebuilt from its parts
        (kept until the next change: its own cache then serves the later calls)."""
        if not self._parts or torch.compiler.is_compiling():
            return self
        stamp = _stamp(self._parts)
        if stamp == self._stamp:
            return self
        hit = self._rebuilt.get("mask")
        if hit is None or hit[0] != stamp:
            parts = (p if isinstance(p, AttentionMask) else getattr(AttentionMask, p[0])(*p[1], **p[2])
                     for p in self._parts)
            hit = self._rebuilt["mask"] = (stamp, functools.reduce(operator.and_, parts))
        return hit[1]

    def _cached(self, key, compute):
        if torch.compiler.is_compiling():  # no side effects inside a traced graph
            return compute()
        hit = self._cache.get(key)
        if hit is None:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            hit = self._cache[key] = compute()
        return hit


# ----------------------------------------------------------------------------- relative-position tables


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi head slopes (Press et al.; BLOOM's recipe for head counts that are not powers of two)."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(p) + powers(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_table(slopes: Tensor, Lq: int, Lk: int) -> Tensor:
    """Toeplitz table [H, Lq + Lk - 1] of -slopes[h] * |i' - j| (i' = i + Lk - Lq)."""
    t = torch.arange(Lq + Lk - 1, device=slopes.device, dtype=torch.float32)
    return -slopes.float().view(-1, 1) * (t - (Lq - 1)).abs()  # i' - j = t - (Lq - 1) for t = i - j + Lk - 1


def t5_relative_table(weight: Tensor, Lq: int, Lk: int, *, bidirectional: bool = True, num_buckets: int = 32,
                      max_distance: int = 128) -> Tensor:
    """T5's bucketed relative-position bias as a Toeplitz table [H, Lq + Lk - 1].

    weight: the relative_attention_bias embedding weight [num_buckets, H]; the gradient flows back to it.
    Positions are bottom-right aligned (relative position j - i'), like transformers' T5 with a cache.
    """
    rel = (Lq - 1) - torch.arange(Lq + Lk - 1, device=weight.device)  # j - i' for t = i - j + Lk - 1
    return weight[t5_bucket(rel, bidirectional, num_buckets, max_distance)].t()


def t5_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position (memory - query): exact for small distances, log-spaced after."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    log_bucket = exact + (torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                          * (num_buckets - exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, log_bucket)


# ---------------------------------------------------------------------------------------------- helpers


def _built_from(built: AttentionMask, constructor: str, *args, **kwargs) -> AttentionMask:
    """Record on a new mask the constructor call that built it (to rebuild it if its tensors change)."""
    if torch.compiler.is_compiling():  # no stamps of fake tensors; a traced mask is not rebuilt
        return built
    parts = ((constructor, args, kwargs),)
    object.__setattr__(built, "_parts", parts)
    object.__setattr__(built, "_stamp", _stamp(parts))
    return built


def _stamp(parts: Tuple) -> Tuple:
    """(version counter, data pointer) of every tensor the parts were built from: any in-place change bumps
    the version, `set_` or a new storage changes the pointer."""
    tensors = []
    for p in parts:
        if isinstance(p, AttentionMask):
            tensors += [getattr(p, f.name) for f in dataclasses.fields(p)]
        else:
            tensors += list(p[1]) + list(p[2].values())
    return tuple(_tensor_stamp(t) for t in tensors if isinstance(t, Tensor))


def _tensor_stamp(t: Tensor) -> Tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change in place later)
        version = None
    return version, t.data_ptr()


def _combine(fn, a, b):
    if a is None:
        return b
    if b is None:
        return a
    return fn(a, b)


def _broadcasting(fn, what):
    def combine(a, b):
        try:
            return fn(a, b)
        except RuntimeError as exc:
            raise ValueError(f"cannot combine two {what} of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                             f"they do not broadcast") from exc
    return combine


def _four_d(name: str, t: Tensor) -> Tensor:
    if not 2 <= t.dim() <= 4:
        raise ValueError(f"{name} must have 2 to 4 dimensions (broadcastable to [B, H, Lq, Lk]), got shape "
                         f"{tuple(t.shape)}")
    return t.view((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _check_broadcast(name: str, t: Tensor, full) -> None:
    if any(s not in (1, f) for s, f in zip(t.shape, full)):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to [B, H, Lq, Lk] = {list(full)}")


def _lengths(name: str, lengths: Lengths) -> Tensor:
    if not isinstance(lengths, Tensor):
        lengths = torch.tensor(lengths, dtype=torch.int64)
    _checks.tensor(name, lengths, dtypes=INT_DTYPES)
    if lengths.dim() > 1:
        raise ValueError(f"{name} must be an int or a 1-D [B] tensor, got shape {tuple(lengths.shape)}")
    return lengths.reshape(-1).to(torch.int64)


def _batch_lengths(name: str, lengths: Optional[Tensor], B: int, Lk: int, device) -> Optional[Tensor]:
    if lengths is None:
        return None
    if lengths.shape[0] not in (1, B):
        raise ValueError(f"{name} must have {B} entries (the batch size) or 1, got {lengths.shape[0]}")
    lengths = lengths.to(device).expand(B).contiguous()
    _checks.values_in(name, lengths, 0, Lk + 1, f"[0, Lk = {Lk}]")  # once per mask: it is cached
    return lengths


def _per_batch(name: str, ids: Tensor, B: int, L: int, device) -> Tensor:
    if ids.shape[0] not in (1, B) or ids.shape[1] != L:
        raise ValueError(f"{name} must have shape [{B} or 1, {L}], got {tuple(ids.shape)}")
    return ids.to(device=device, dtype=torch.int64).expand(B, L).contiguous()


def _state(any_: Tensor, all_: Tensor) -> Tensor:
    """0 / 1 / 2 = no entry / some / all visible (all implies any)."""
    return any_.to(torch.int8) + all_.to(torch.int8)


def _tile_min_max(ids: Tensor, block: int) -> Tuple[Tensor, Tensor]:
    """Per-tile min and max of [B, L] ids over tiles of `block` positions."""
    B, L = ids.shape
    n = -(-L // block)
    padded = torch.cat([ids, ids[:, -1:].expand(B, n * block - L)], dim=1)  # repeats change no min/max
    tiles = padded.view(B, n, block)
    return tiles.amin(-1), tiles.amax(-1)


def _dense_state(mask: Tensor, bm: int, bn: int) -> Tensor:
    """any/all of a 4-D bool mask per tile; a broadcast (size-1) query or key dim stays size 1."""
    any_ = all_ = mask
    for dim, block in ((2, bm), (3, bn)):
        L = mask.shape[dim]
        if L == 1:
            continue
        n = -(-L // block)
        pad = [0, 0] * (3 - dim) + [0, n * block - L]  # F.pad order: last dim first

        def tiles(t, value):
            t = torch.nn.functional.pad(t, pad, value=value) if n * block != L else t
            return t.unflatten(dim, (n, block))

        any_ = tiles(any_, False).any(dim + 1)
        all_ = tiles(all_, True).all(dim + 1)
    return _state(any_, all_)
