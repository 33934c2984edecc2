"""Attention tile configs per head dim, dtype, device and mask weight."""

from __future__ import annotations

import torch
import triton

from .. import _common as C
from .._common import block_d

# Test hook (not API): override the tile configs, keyed ("fwd" | "bwd", block_d, dtype, heavy).
_CONFIG_OVERRIDE: dict = {}


# Config tables, chosen by compiling for sm_90 offline (ptxas register / spill / shared-memory reports) among
# FlexAttention's and the Triton tutorial's known-good points; "heavy" variants (additive bias, Toeplitz,
# dense mask or dropout: extra per-element loads, multi-buffered in shared memory, or philox registers) use
# fewer pipeline stages and thinner backward tiles so they fit without spills. Forward tiles of a heavy variant
# equal the light ones (the block map is built at attention_tile()), except Hopper's at D = 128: 32-key tiles
# (64: 255 registers, spilling; a map at another tile is converted conservatively). Not yet timed on a GPU:
# see the report.
def _fwd_configs(D: int, dtype: torch.dtype, device, heavy: bool = False, tma: bool = False) -> list:
    """Forward configs (BLOCK_M, BLOCK_N, num_warps, num_stages), best first; later ones use less memory.
    tma: Q / K / V load through TMA descriptors (no per-thread address registers: larger tiles fit)."""
    bd = block_d(D)
    key = ("fwd", bd, dtype, heavy)
    if key in _CONFIG_OVERRIDE:
        return list(_CONFIG_OVERRIDE[key])
    if C.interpreted(device):  # small enough that short test sequences span several tiles
        return [(64, 32, 4, 1)]
    cap = C.capability(device)
    if dtype == torch.float32:
        # tf32x3 dots split each operand into two tf32 parts held in registers (q: 2 x BLOCK_M x D / threads of
        # them for the whole loop), so the tiles are small: no spills on sm_90 (was 172-344 B at D = 128 with
        # 64 x 32 tiles, 160 B at D = 64 with the heavy masks on 128 x 64). At D = 128 the largest that do not
        # spill: 32 x 16 with 1 stage (254-255 registers; 2 stages: 4-8 B, heavy 4 B) and for the heavy
        # variants 16 x 32 with 2 stages (238); 32 x 32: 24-64 B, 64 x 16 (wgmma): 104-480 B, 16 x 64: 124-252 B
        if bd <= 64:
            cfgs = [(32, 32, 4, 2)] if heavy else [(128, 64, 8, 2), (64, 64, 4, 2)]
        elif bd <= 128:
            cfgs = [(16, 32, 4, 2)] if heavy else [(32, 16, 4, 1), (16, 32, 4, 2)]
        else:
            cfgs = [(32, 32, 4, 2), (32, 16, 4, 1)]
    elif cap[0] >= 9:  # Hopper
        if bd <= 64:  # with TMA 8 warps take 121 registers (4 warps: 253)
            cfgs = [(128, 64, 8, 2)] if heavy else [(128, 64, 8, 3), (128, 64, 4, 3)] if tma else [(128, 64, 4, 3)]
        elif bd <= 128:  # 128 x 128 with 3 stages, TMA: 187 registers (causal 202), no spills; spills without TMA
            cfgs = [(128, 32, 8, 2)] if heavy else [(128, 128, 8, 3), (128, 64, 8, 3)] if tma else [(128, 64, 8, 3)]
        else:
            cfgs = [(64, 32, 8, 2)] if heavy else [(64, 32, 4, 3)]
    else:  # Ampere and others (FlexAttention's A100 defaults)
        if bd <= 64:
            cfgs = [(128, 64, 4, 2)] if heavy else [(128, 64, 4, 3)]
        elif bd <= 128:
            cfgs = [(128, 64, 8, 2)] if heavy else [(128, 64, 8, 3)]
        else:
            cfgs = [(64, 32, 8, 2)] if heavy else [(64, 32, 4, 2)]
    # Fallbacks for devices with less shared memory / registers.
    return cfgs + [c for c in ((64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1), (16, 16, 4, 1)) if c not in cfgs]


def _bwd_configs(D: int, dtype: torch.dtype, device, heavy: bool = False) -> list:
    """Backward configs ((BLOCK_M1, BLOCK_N1, warps, stages) for dK/dV, (BLOCK_M2, BLOCK_N2, warps, stages) for
    dQ), best first. BLOCK_M1 is the query step of the dK/dV kernel, BLOCK_N1 its key tile."""
    bd = block_d(D)
    key = ("bwd", bd, dtype, heavy)
    if key in _CONFIG_OVERRIDE:
        return list(_CONFIG_OVERRIDE[key])
    if C.interpreted(device):  # differs from the forward tile: exercises the block-map conversion
        return [((32, 32, 4, 1), (32, 32, 4, 1))]
    cap = C.capability(device)
    if dtype == torch.float32:  # tf32x3 (see _fwd_configs): dK/dV holds k and v, dQ q and dO, split in registers
        # no spills on sm_90 with 16-key dK/dV tiles at D = 128 (32 x 32: 0.9-1.6 KB spilled; 32 x 16: 16-32 B,
        # 16 x 32: 0.5-1.4 KB) and with the heavy masks at D = 64 (16 x 32: 16 B), 16 x 32 otherwise; dQ at
        # D = 128: 16 x 32 (252-255 registers; 32 x 16: 40-124 B)
        if bd <= 64:
            cfgs = [((16, 16, 4, 1), (32, 32, 4, 2))] if heavy else [((16, 32, 4, 2), (64, 32, 4, 2))]
        elif bd <= 128:
            cfgs = [((16, 16, 4, 1), (16, 32, 4, 1))] if heavy else [((16, 16, 4, 1), (16, 32, 4, 2))]
        else:
            cfgs = [((16, 32, 4, 1), (32, 16, 4, 1))]
    elif cap[0] >= 9:  # Hopper (light: FlexAttention's sm90 defaults; dK/dV at D = 128 the tutorial's 32 x 128)
        # dK/dV's float32 dk and dv accumulators take half the registers: its sm_90 spills went to zero with
        # 32-row query steps at D = 128 (64 x 128: 12 B) and 64-key tiles for the heavy variants (32 x 128:
        # 16 B at D = 64, 204 B at D = 128, with every mask part, dropout and dbias)
        if heavy and bd <= 64:  # 16-row query steps: TMA loads (issue 14) left 32 x 64 at 255 registers, 16 B spilled
            cfgs = [((16, 64, 8, 2), (128, 32, 8, 2))]
        elif heavy and bd <= 128:
            cfgs = [((32, 64, 8, 2), (128, 32, 8, 2))]
        elif bd < 64:
            cfgs = [((64, 64, 4, 3), (64, 64, 4, 3))]
        elif bd < 128:
            cfgs = [((64, 128, 8, 3), (128, 64, 8, 3))]
        elif bd == 128:
            cfgs = [((32, 128, 8, 3), (128, 64, 8, 3))]
        else:
            cfgs = [((16, 64, 8, 2), (64, 32, 8, 2))]
    else:  # Ampere and others
        if heavy and bd <= 128:
            cfgs = [((32, 64, 4, 2), (64, 32, 4, 2))]
        elif bd < 64:
            cfgs = [((32, 128, 4, 3), (128, 32, 4, 3))]
        elif bd <= 128:
            cfgs = [((64, 64, 4, 2), (64, 64, 4, 2))]
        else:
            cfgs = [((16, 64, 8, 2), (64, 32, 8, 2))]
    fallbacks = (((32, 64, 4, 2), (64, 32, 4, 2)), ((16, 32, 4, 1), (32, 16, 4, 1)), ((16, 16, 4, 1), (16, 16, 4, 1)))
    return cfgs + [c for c in fallbacks if c not in cfgs]


def attention_tile(head_dim: int, dtype: torch.dtype, device) -> tuple:
    """(block_m, block_n): the tile the forward kernel uses, so the block map should be built at it."""
    bm, bn, _, _ = _fwd_configs(head_dim, dtype, device)[0]
    return bm, bn


def _shrink(block: int, L: int) -> int:
    """A tile no larger than needed for L (>= 16, the smallest tl.dot size)."""
    return max(16, min(block, triton.next_power_of_2(max(L, 1))))

