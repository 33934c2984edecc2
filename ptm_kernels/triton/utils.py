"""Helpers shared by the Triton launchers: dtype checks, block sizes, num_warps, grid sizes."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Rows up to this many elements are normalized in one pass, held in registers; longer rows are looped over
# in chunks of LOOP_BLOCK elements (more reads, but no register spills).
MAX_FUSED_BLOCK = 8192
LOOP_BLOCK = 2048

# Elements per program for the element-wise kernels.
ELEMENTWISE_TILE = 2048


def check_dtype(name: str, t: Optional[torch.Tensor], x_dtype: Optional[torch.dtype] = None) -> None:
    """Raise ValueError unless t is float32/float16/bfloat16 (and, for a parameter, x's dtype or float32)."""
    if t is None:
        return
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"ptm_kernels.triton: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if x_dtype is not None and t.dtype not in (x_dtype, torch.float32):
        raise ValueError(f"ptm_kernels.triton: {name} has dtype {t.dtype}; expected {x_dtype} or torch.float32")


def num_warps_for(block: int) -> int:
    """num_warps for a program working on `block` elements (as Liger-Kernel's calculate_settings)."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def row_block(C: int, backward: bool = False):
    """-> (BLOCK, ONE_PASS, num_warps) for kernels that reduce over rows of C elements."""
    # Blocks of at least 16 elements: tiny tensors are legal in Triton but gain nothing.
    block = max(16, triton.next_power_of_2(C))
    one_pass = block <= MAX_FUSED_BLOCK
    if not one_pass:
        block = LOOP_BLOCK
    num_warps = num_warps_for(block)
    if backward:  # about twice as many live row-sized values: spread them over twice the threads
        num_warps = min(16, 2 * num_warps)
    return block, one_pass, num_warps


def tile_2d(C: int, tile: int = ELEMENTWISE_TILE):
    """-> (BLOCK_N, BLOCK_C): a [rows, columns] tile of about `tile` elements for element-wise work on [N, C]."""
    block_c = min(max(16, triton.next_power_of_2(C)), tile)
    return max(1, tile // block_c), block_c


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """How many programs to spread a row reduction over: one per SM on a GPU; a few under the interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def split_rows(N: int, target_programs: int):
    """-> (programs, rows_per_program) to split N >= 1 rows into contiguous chunks, none of them empty."""
    rows_per_program = triton.cdiv(N, max(1, min(N, target_programs)))
    return triton.cdiv(N, rows_per_program), rows_per_program


# ----------------------------------------------------------------------------------- in-kernel helpers
# The interpreter (TRITON_INTERPRET=1, CPU tests) truncates float32 -> bfloat16 casts, where GPUs round to
# nearest even; under it, cast_to rounds explicitly, so CPU tests see GPU (and torch) numerics. Compiled
# kernels take the plain cast: the branch is resolved at compile time.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """Round float32 x to `dtype` (round to nearest even)."""
    if _INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16  # exactly representable now
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
