"""The relative-attention kernels' arguments: small NamedTuples built from the parameter objects
(ptm_kernels/kernel_params.py). An absent part is None, so the kernel code that reads it is compiled only where
it is present (no placeholder tensors); device code reads every field by name."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton.language as tl
from torch import Tensor

from .. import _common as C
from ...kernel_params import Dropout, RelativeParams, RelativeStream


class Rows(NamedTuple):
    """A [B, H, L, D] tensor with unit stride in D: its pointer and batch / head / row strides, and where the
    kernel loads its tiles through TMA (launch._tma_loads), a descriptor whose boxes are those tiles."""
    ptr: Tensor
    s_b: int
    s_h: int
    s_l: int
    tma: Optional[object] = None  # _common.tma_rows: boxes of one key tile (scores._key_tile)


def rows(t: Tensor) -> Rows:
    return Rows(t, t.stride(0), t.stride(1), t.stride(2))


class Window(NamedTuple):
    """The window mask part: key j visible to a row at position p iff p - left <= j <= p + right."""
    left: int
    right: int


class DenseMask(NamedTuple):
    """A bool [B, H, Lr, Lk] mask (a stride-0 view where broadcast) read as uint8."""
    ptr: Tensor
    s_b: int
    s_h: int
    s_m: int
    s_n: int


class StreamArgs(NamedTuple):
    """One query stream (RelativeStream) as kernel arguments."""
    qu: Rows
    qv: Rows
    Lr: int  # the stream's rows
    causal: tl.constexpr
    window: Optional[Window]
    seg: Optional[Tensor]  # float32 [B, H, Lr, 2] contiguous: the segment term (same, other segment)
    q_ids: Optional[Tensor]  # int64 [B, Lr] contiguous: the rows' segment ids of the segment term
    positions: Optional[Tensor]  # int64 [B, Lr] contiguous: rows at these positions (the gather form)
    key_lengths: Optional[Tensor]  # int64 [B]
    prefix_lengths: Optional[Tensor]  # int64 [B]
    q_segments: Optional[Tensor]  # int64 [B, Lr] contiguous: visible where equal to the key's segment
    k_segments: Optional[Tensor]  # int64 [B, Lk] contiguous
    dense: Optional[DenseMask]


class Keys(NamedTuple):
    """What the streams share: keys, values, r and the keys' segment ids (of the segment term)."""
    k: Rows
    v: Rows
    r: Rows
    k_ids: Optional[Tensor]  # int64 [B, Lk] contiguous
    Lk: int
    R: int  # rows of r
    r_band: Optional[object] = None  # _common.tma_rows of r (r[:1] where the batch shares it): boxes of one band
    r_batch_step: int = 1  # r_band's batch coordinate per batch row: 0 where the batch shares r


class Dims(NamedTuple):
    H: int
    q_len: int  # rows of the current segment: query positions are 0 .. q_len - 1
    r_offset: int  # the row of r holding relative distance 0
    scale2: float  # scale * log2(e): the kernels' softmax is in base 2
    scale: float


class DropoutArgs(NamedTuple):
    """In-kernel dropout (_common.dropout_keep). The query stream draws with query_seed = seed + 1 modulo 2 ** 63
    (as dropout_seed takes it), in int64: a seed below 2 ** 31 is an int32 argument, where seed + 1 wrapped to a
    negative number (another mask) at 2 ** 31 - 1."""
    seed: int
    query_seed: int
    threshold: int
    scale: float  # 1 / (1 - p)


class StreamOut(NamedTuple):
    """The forward's results of one stream."""
    o: Rows
    lse: Tensor  # float32 [B, H, Lr] contiguous


class BandSlots(NamedTuple):
    """The dq kernel's band slots (launch._band_slots): a pool smaller than its grid, each program taking a free
    slot for its run (lock 0 -> 1) and giving it back (-> 0)."""
    words: Tensor  # float32 [count, words per slot]: the band product, then dS's band image
    locks: Tensor  # int32 [count], zeroed: 1 while a program holds the slot
    count: int


class StreamGrads(NamedTuple):
    """The backward's inputs and results of one stream, and the dr buffer it adds to."""
    do: Rows
    lse: Tensor  # float32 [B, H, Lr] contiguous
    delta: Tensor  # float32 [B, H, Lr] contiguous: rowsum(dO * O)
    dq: Tensor  # float32 [B, H, Lr, D] contiguous: the gradient of q (through q + u and q + v_bias)
    dqv: Optional[Tensor]  # float32 [B, H, Lr, D] contiguous, zeroed, where the stream's form adds dqv up in memory
    #                        (the gather and chunked forms: launch._dqv_in_memory); None for the band form
    dseg: Optional[Tensor]  # float32 [B, H, Lr, 2] contiguous (with seg)
    dr: Tensor  # float32 [B, H, R, D] contiguous, zeroed: both streams' programs add into it
    band_sums: Optional[Tensor]  # float32 [B, H, R] contiguous, zeroed (with u or v_bias): the band form's dS band
    #                              image summed over the rows, per row of r (backward._band_sums)
    band_slots: Optional["BandSlots"] = None  # the dq kernel's, where its form takes the band product and dS's band
    #                                         image through memory (launch._band_slots_in_memory)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def stream_args(s: RelativeStream, qu: Tensor, qv: Tensor) -> StreamArgs:
    """The stream's kernel arguments; qu, qv: its biased queries (RelativeStream.biased)."""
    vis = s.vis
    wl, wr = int(vis.window_left), int(vis.window_right)
    window = None
    if wl >= 0 or wr >= 0:  # a negative side is unbounded: a distance no (row, key) pair reaches
        window = Window(wl if wl >= 0 else 1 << 62, wr if wr >= 0 else 1 << 62)
    dense = None
    if vis.dense_mask is not None:
        d = vis.dense_mask.view(torch.uint8)
        dense = DenseMask(d, *d.stride())
    return StreamArgs(
        rows(qu), rows(qv), qu.shape[2], tl.constexpr(bool(vis.causal)), window,
        None if s.seg is None else s.seg.float().contiguous(), _contiguous(s.q_ids), _contiguous(s.positions),
        _contiguous(vis.key_lengths), _contiguous(vis.prefix_lengths), _contiguous(vis.q_segments),
        _contiguous(vis.k_segments), dense)


def keys_args(k: Tensor, v: Tensor, r: Tensor, p: RelativeParams) -> Keys:
    return Keys(rows(k), rows(v), rows(r), _contiguous(p.k_ids), k.shape[2], r.shape[2])


def dims_args(H: int, p: RelativeParams) -> Dims:
    return Dims(H, int(p.q_len), int(p.r_offset), float(p.scale) * C.LOG2E, float(p.scale))


def dropout_args(d: Dropout) -> Optional[DropoutArgs]:
    """None without dropout (the kernels compile it out)."""
    if d.p <= 0:
        return None
    p = float(d.p)
    return DropoutArgs(C.dropout_seed(d.seed_value), C.dropout_seed(d.seed_value + 1), C.dropout_threshold(p),
                       1.0 / (1.0 - p) if p < 1.0 else 0.0)
