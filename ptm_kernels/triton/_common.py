"""The Triton toolkit of the attention kernel families (attention, relative attention): constants, the
interpreter / device checks, the precision policy of their dots, the out-of-resources fallback ladder, TMA
descriptors of [B, H, L, D] operands, the visibility predicate of the analytic mask parts, and the one dropout
RNG.

Host helpers are plain functions; the compile-for-sm_90 harness (tests/compile/triton_sm90.py) patches
`interpreted`, `capability` and `num_sms` here, so every family sees the device it pretends to be.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .utils import SUPPORTED_DTYPES

try:  # raised when a launch needs more shared memory / registers than the device has
    from triton.runtime.errors import OutOfResources
except Exception:  # pragma: no cover - older layouts
    class OutOfResources(Exception):
        pass

try:  # host-side TMA descriptors (triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

__all__ = ["LOG2E", "LN2", "SUPPORTED_DTYPES", "OutOfResources", "interpreted", "capability", "num_sms",
           "precision", "upcast", "first_that_fits", "block_d", "TensorDescriptor", "tma_strides", "tma_rows", "dot",
           "load", "analytic_visible", "dropout_seed", "dropout_threshold", "opaque", "dropout_keep"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ================================================================================================ host side
def interpreted(device) -> bool:
    """True when kernels on `device` run under the Triton interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return torch.device(device).type != "cuda"


@functools.lru_cache(maxsize=None)
def _device_props(index: int):
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, (p.major, p.minor)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return _device_props(_index(device))[0]
    return 4  # interpreter: a token number, so small test shapes still exercise the split paths


def capability(device):
    device = torch.device(device)
    if device.type != "cuda":
        return (0, 0)
    return _device_props(_index(device))[1]


def block_d(D: int) -> int:
    """The head dim padded to a power of two (at least 16, the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(D))


# float32 dots on a GPU: "tf32x3" splits each operand into two tf32 parts and runs three tensor-core products
# (~1e-6 relative error, float32-level); "ieee" (CUDA-core FMA) is exact but slow and register-hungry.
FP32_PRECISION = "tf32x3"


def precision(dtype: torch.dtype, device) -> str:
    """input_precision of the float32 dots: exact ("ieee") under the interpreter; on a GPU "tf32" for the
    float32 operands derived from 16-bit inputs (probabilities, dS) and for float32 inputs when
    torch.backends.cuda.matmul.allow_tf32 is set, else FP32_PRECISION. 16-bit operands ignore it."""
    if interpreted(device):
        return "ieee"
    if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return FP32_PRECISION


def upcast(dtype: torch.dtype, device) -> bool:
    """Widen 16-bit dot operands to float32 first: the interpreter multiplies bfloat16 tiles as their raw bits
    (exact for float16 too, so both are widened; compiled away on a GPU)."""
    return dtype != torch.float32 and interpreted(device)


def tma_strides(t: torch.Tensor):
    """The strides of a [B, H, L, D] operand as a TMA descriptor takes them, or None where TMA cannot read it
    (base or a stride not a multiple of 16 bytes, a broadcast (stride 0) dim, D not unit-stride)."""
    strides = list(t.stride())
    for i in range(2, -1, -1):  # a size-1 dim's stride is never used: give it a valid one
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    if t.data_ptr() % 16 or strides[-1] != 1 or any(s <= 0 or s * t.element_size() % 16 for s in strides[:-1]):
        return None
    return strides


def tma_rows(t: torch.Tensor, rows: int, block_d: int):
    """A TMA descriptor of the [B, H, L, D] operand t (tma_strides must accept it) whose loads are boxes of
    `rows` rows of one (b, h) and block_d columns; rows outside [0, L) and columns past D read as zeros."""
    return TensorDescriptor(t, list(t.shape), tma_strides(t), [1, 1, rows, block_d])


def first_that_fits(cache: dict, key, options, launch):
    """launch(option) with the first of `options` that fits the device, starting at the one that fitted last
    time for `key`. A launch that does not fit raises OutOfResources when the kernel is loaded, before it runs
    (nothing written yet), so the next option is simply tried. Under the interpreter the first one runs."""
    err = None
    for i in range(cache.get(key, 0), len(options)):
        try:
            out = launch(options[i])
        except OutOfResources as e:
            err = e
            continue
        cache[key] = i
        return out
    raise err


# Under the interpreter (TRITON_INTERPRET=1 when the kernels are imported) kernels run as Python: no inline PTX
_INTERPRETING = tl.constexpr(triton.knobs.runtime.interpret if hasattr(triton, "knobs")
                             else os.environ.get("TRITON_INTERPRET", "0") == "1")


def dropout_seed(seed) -> int:
    """The Philox key of a dropout seed: its low 63 bits (an int64 kernel argument)."""
    return int(seed) & 0x7FFFFFFFFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The 8-bit threshold of dropout_keep: an element is dropped when its random byte is below it, so the
    drop rate is p rounded to a multiple of 1/256 (as FlashAttention-2's uint8 threshold)."""
    return min(256, max(0, round(float(p) * 256)))


# ============================================================================================== device side
@triton.jit
def dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc) (acc may be None). UPCAST: see upcast()."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:  # 16-bit operands: tensor cores, float32 accumulation
        return tl.dot(a, b, acc)


@triton.jit
def load(ptrs, mask, USE_MASK: tl.constexpr):
    """tl.load with a bounds mask only where one is needed (full tiles load without)."""
    if USE_MASK:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def analytic_visible(vis, qi, cols, klen, plen, wl, wr, CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_KLEN: tl.constexpr):
    """vis & the analytic mask parts at query positions qi (in key coordinates) and key indices cols
    (broadcastable index blocks): causal (keys up to the query, or inside the prefix), the window
    qi - wl <= col <= qi + wr, and the key length."""
    if CAUSAL:
        cv = cols <= qi
        if HAS_PREFIX:
            cv = cv | (cols < plen)
        vis = vis & cv
    if HAS_WINDOW:
        vis = vis & (qi - cols <= wl) & (cols - qi <= wr)
    if HAS_KLEN:
        vis = vis & (cols < klen)
    return vis


@triton.jit
def opaque(x):
    """x (a 32- or 64-bit integer), as a value the compiler can neither move out of the loop it is computed in
    nor merge with an equal value computed elsewhere: a volatile inline-PTX copy. What is derived from it is
    computed where it is used, rather than once and held in registers. Under the interpreter: x."""
    if _INTERPRETING:
        return x
    if x.dtype.primitive_bitwidth == 64:
        return tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x], dtype=x.dtype, is_pure=False, pack=1)
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)


@triton.jit
def dropout_keep(seed, bh64, rows, col0, Lq, Lk, threshold, BLOCK_N: tl.constexpr, TRANS: tl.constexpr = False,
                 RECOMPUTE_KEYS: tl.constexpr = False):
    """Dropout keep-mask [len(rows), BLOCK_N] (TRANS: its transpose) of head bh64, query rows `rows` (1-D), keys
    col0 + [0, BLOCK_N) (col0 a multiple of 16).

    The mask: key j of row i belongs to group g = j // 16; one Philox4x32-10 call per (row, group), on the
    counter n = (bh * Lq + i) * ceil(Lk / 16) + g (64 bits: low word, high word, 0, 0) and key `seed`, gives
    4 x 32 bits = 16 random bytes, one per key of the group: byte (j % 4) of word (j % 16) // 4. The key is
    kept when its byte >= threshold (dropout_threshold). Every Philox output is used (16 elements per call);
    the mask depends only on (seed, bh, i, j, Lq, Lk), not on the tile shape or orientation, so the forward,
    both backward kernels and the mask kernel agree.

    RECOMPUTE_KEYS: derive Philox's 20 round keys from the seed at each call. Left to itself the compiler derives
    them once, before the caller's key loop, and holds them in 20 registers across it: in the relative dq kernel
    at D = 128 (sm_90, bf16, every mask + dropout) that made most of its 68 / 52 spill bytes (16 / 8 with them
    derived per call, none in a loop), for about 40 more instructions a key step (670 -> 707). The mask is the
    same either way (opaque)."""
    BLOCK_M: tl.constexpr = rows.shape[0]
    NG: tl.constexpr = BLOCK_N // 16
    # one Philox call per (row, group), laid out 1-D (group-major when TRANS) so no two threads make the same call
    flat = tl.arange(0, BLOCK_M * NG)
    if TRANS:
        row = tl.reshape(tl.broadcast_to(rows[None, :], [NG, BLOCK_M]), [BLOCK_M * NG])
        grp = flat // BLOCK_M
    else:
        row = tl.reshape(tl.broadcast_to(rows[:, None], [BLOCK_M, NG]), [BLOCK_M * NG])
        grp = flat % NG
    n = (bh64 * Lq + row.to(tl.int64)) * ((Lk + 15) // 16) + (col0 // 16 + grp)  # int64
    c0 = n.to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    z = c0 * 0
    if RECOMPUTE_KEYS:
        seed = opaque(tl.to_tensor(seed).to(tl.int64))
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, z, z)
    # key 16 g + 4 w + b is byte b of word w: [calls, word 2 x + y, byte 2 u + v]
    words = tl.join(tl.join(w0, w1), tl.join(w2, w3))
    b0 = (words & 0xFF) >= threshold
    b1 = ((words >> 8) & 0xFF) >= threshold
    b2 = ((words >> 16) & 0xFF) >= threshold
    b3 = (words >> 24) >= threshold
    keep = tl.join(tl.join(b0, b1), tl.join(b2, b3))
    if TRANS:  # calls (g, m) -> [g, m, 16] -> [g, 16, m] -> [BLOCK_N, BLOCK_M]
        keep = tl.reshape(keep, [NG, BLOCK_M, 16])
        return tl.reshape(tl.permute(keep, (0, 2, 1)), [BLOCK_N, BLOCK_M])
    else:  # calls (m, g) -> [BLOCK_M, BLOCK_N]
        return tl.reshape(keep, [BLOCK_M, BLOCK_N])
