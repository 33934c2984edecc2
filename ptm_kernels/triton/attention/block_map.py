"""Block maps (FlexAttention-style) converted to the tile lists the kernels walk: per row tile, the partial tiles
and the full tiles, at any tile size (conservatively), cached while the map is alive."""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
from torch import Tensor

_LIST_CACHE: "OrderedDict" = OrderedDict()
_LIST_CACHE_SIZE = 64


def _convert_map(block_map: Tensor, src_bm: int, src_bn: int, dst_bm: int, dst_bn: int, Lq: int, Lk: int) -> Tensor:
    """The block map at tile (dst_bm, dst_bn), conservatively, with the broadcast B/H dims kept at size 1."""
    bmap = block_map
    if bmap.shape[0] > 1 and bmap.stride(0) == 0:
        bmap = bmap[:1]
    if bmap.shape[1] > 1 and bmap.stride(1) == 0:
        bmap = bmap[:, :1]
    bmap = bmap.to(torch.int8)
    nMt, nNt = triton.cdiv(Lq, dst_bm), triton.cdiv(Lk, dst_bn)
    if (src_bm, src_bn) == (dst_bm, dst_bn):
        t = bmap.clone()
    else:
        nMs, nNs = bmap.shape[2], bmap.shape[3]
        dev = bmap.device

        def ranges(n_t, dst, src, L, n_s):
            i = torch.arange(n_t, device=dev)
            lo = (i * dst) // src
            hi = ((torch.clamp((i + 1) * dst, max=L) - 1) // src + 1).clamp(max=n_s)
            return lo, hi

        r0, r1 = ranges(nMt, dst_bm, src_bm, Lq, nMs)
        c0, c1 = ranges(nNt, dst_bn, src_bn, Lk, nNs)

        def rect(x):  # sums of x over each target tile's source range (2-D prefix sums)
            p = torch.nn.functional.pad(x.to(torch.int32).cumsum(-2).cumsum(-1), (1, 0, 1, 0))
            return (p[..., r1[:, None], c1[None, :]] - p[..., r0[:, None], c1[None, :]]
                    - p[..., r1[:, None], c0[None, :]] + p[..., r0[:, None], c0[None, :]])

        area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
        any_vis = rect(bmap != 0) > 0
        all_full = rect(bmap == 2) == area
        t = torch.where(all_full & any_vis, 2, torch.where(any_vis, 1, 0)).to(torch.int8)
    # A ragged last tile (keys past Lk, queries past Lq) is never "full": full tiles are loaded without bounds
    # masks, and the forward must mask keys past Lk.
    if Lk % dst_bn:
        t[..., -1] = torch.clamp(t[..., -1], max=1)
    if Lq % dst_bm:
        t[..., -1, :] = torch.clamp(t[..., -1, :], max=1)
    return t


def _tile_lists(block_map: Tensor, src_bm: int, src_bn: int, dst_bm: int, dst_bn: int, Lq: int, Lk: int,
                transpose: bool):
    """-> (cnt_partial, idx_partial, cnt_full, idx_full) int32 lists per (b, h, row tile) (per key tile when
    transpose), broadcast dims of size 1; cached while the map is alive and unmodified."""
    try:
        version = block_map._version
    except Exception:  # inference tensors have no version counter: no caching
        version = None
    key = (block_map.data_ptr(), tuple(block_map.shape), tuple(block_map.stride()), version, str(block_map.device),
           src_bm, src_bn, dst_bm, dst_bn, Lq, Lk, transpose)
    if version is not None and key in _LIST_CACHE:
        ref, lists = _LIST_CACHE[key]
        _LIST_CACHE.move_to_end(key)
        return lists
    t = _convert_map(block_map, src_bm, src_bn, dst_bm, dst_bn, Lq, Lk)
    if transpose:
        t = t.transpose(-1, -2)
    lists = []
    for val in (1, 2):
        sel = t == val
        cnt = sel.sum(-1, dtype=torch.int32).contiguous()
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
        lists += [cnt, idx]
    lists = tuple(lists)
    if version is not None:
        # Holding the map keeps its memory from being reused by another map while the entry lives.
        _LIST_CACHE[key] = (block_map, lists)
        if len(_LIST_CACHE) > _LIST_CACHE_SIZE:
            _LIST_CACHE.popitem(last=False)
    return lists


def _map_usable(block_map, B, H, Lq, Lk, block_m, block_n) -> bool:
    if block_map is None or block_m is None or block_n is None or block_m <= 0 or block_n <= 0:
        return False
    return (block_map.dim() == 4 and block_map.shape[0] in (1, B) and block_map.shape[1] in (1, H)
            and tuple(block_map.shape[2:]) == (triton.cdiv(Lq, block_m), triton.cdiv(Lk, block_n)))

