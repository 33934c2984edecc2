"""Relative attention launchers: tile config, the GPU launch ladder, stream argument packing, and the kernel
interface functions."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _common as C
from .._common import SUPPORTED_DTYPES
from ...kernel_params import RelativeParams, RelativeStream, replaced
from .args import KeyGrads, StreamGrads, StreamOut, dims_args, dropout_args, keys_args, rows, stream_args
from .backward import _rel_bwd_kernel
from .forward import _rel_fwd_kernel


def _config(D: int, dtype, device):
    block_d = max(16, triton.next_power_of_2(D))
    if C.interpreted(device):
        cfg, warps = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, D_CHUNK=min(block_d, 16)), 4
    else:
        cfg, warps = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, D_CHUNK=8), 8
    # rows of r one (row tile, key tile) pair uses when its rows are consecutive: BLOCK_M + BLOCK_N - 1
    cfg["BAND"] = triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"])
    return cfg, warps


# GPU launch options (band path?, num_stages), fastest first. The band path keeps r_band and more dot operands in
# shared memory, and software pipelining multiplies the loads' buffers. Compiled for sm_90 (triton 3.6 and 3.7)
# with 3 stages, 16-bit inputs need 64 / 128 KB (forward) and 100 / 205 KB (backward) at D = 64 / 128, float32
# up to twice that; an H100 / H200 block may have 227 KB, so float32 at D = 128 runs with 2 stages (forward) or
# 1 (backward with tf32x3), D = 256 with 1 or 2 stages or (float32 backward) the gather path. A kernel that does
# not fit raises OutOfResources when it is loaded, before it runs (nothing written yet), and the next option is
# tried; the choice is kept per specialisation. Last resort: every stream on the gather path (BAND = 0), the
# form that needs the least shared memory. GPUs with less shared memory per block step down the same way.
_GPU_OPTIONS = ((True, 3), (True, 2), (True, 1), (False, 3), (False, 1))
_GPU_CHOICE: dict = {}


def _specialisation(args) -> tuple:
    """What tells the kernel's specialisations apart: dtypes, absent parts (None) and constexpr fields."""
    out = []
    for a in args:
        if isinstance(a, tuple):
            out.append(_specialisation(a))
        elif isinstance(a, Tensor):
            out.append(a.dtype)
        elif a is None or isinstance(a, tl.constexpr):
            out.append(a if a is None else a.value)
    return tuple(out)


def _launch(kernel, grid, device, cfg, warps, *args, **kw):
    if C.interpreted(device):  # the interpreter: no resource limits
        kernel[grid](*args, num_warps=warps, **cfg, **kw)
        return
    key = (kernel.fn.__name__, device.index, *sorted(kw.items()), *sorted(cfg.items()), warps,
           _specialisation(args))

    def launch(option):
        band, stages = option
        kernel[grid](*args, num_warps=warps, num_stages=stages, **dict(cfg, BAND=cfg["BAND"] if band else 0), **kw)

    C.first_that_fits(_GPU_CHOICE, key, _GPU_OPTIONS, launch)


def _check(*ts):
    for t in ts:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton: relative attention supports float32, float16, bfloat16, "
                             f"got {t.dtype}")


def _fwd(k, v, r, p: RelativeParams, streams: list) -> list:
    """-> [(out, lse)] per stream; both streams in one launch (grid axis 2)."""
    _check(k, v, r, streams[0].qu)
    B, H, Lk, D = k.shape
    cfg, warps = _config(D, k.dtype, k.device)
    outs = [StreamOut(rows(torch.empty(B, H, s.qu.shape[2], D, dtype=s.qu.dtype, device=k.device)),
                      torch.empty(B, H, s.qu.shape[2], dtype=torch.float32, device=k.device)) for s in streams]
    args = [stream_args(s) for s in streams] + [None] * (2 - len(streams))
    grid = (triton.cdiv(max(s.qu.shape[2] for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    _launch(_rel_fwd_kernel, grid, k.device, cfg, warps, *args, *outs, *[None] * (2 - len(streams)),
            keys_args(k, v, r, p), dims_args(H, p), dropout_args(p.dropout), D=D,
            PREC=C.precision(k.dtype, k.device), UPCAST=C.upcast(k.dtype, k.device))
    return [(o.o.ptr, o.lse) for o in outs]


def _bwd(douts: list, outs_lses: list, k, v, r, p: RelativeParams, streams: list):
    """-> ([(dqu, dqv, dseg)] per stream, dk, dv, dr); dk, dv, dr summed over the streams."""
    B, H, Lk, D = k.shape
    cfg, warps = _config(D, k.dtype, k.device)
    key_grads = KeyGrads(torch.zeros(B, H, Lk, D, dtype=torch.float32, device=k.device),
                         torch.zeros(B, H, Lk, D, dtype=torch.float32, device=k.device),
                         torch.zeros(B, H, r.shape[2], D, dtype=torch.float32, device=k.device))
    # dqu is written with qu's strides and dqv is contiguous: the backward takes qu / qv contiguous
    streams = [replaced(s, qu=s.qu.contiguous(), qv=s.qv.contiguous()) for s in streams]
    grads = []
    for s, do, (out, lse) in zip(streams, douts, outs_lses):
        do = do.contiguous() if do.stride(-1) != 1 else do
        Lr = s.qu.shape[2]
        grads.append(StreamGrads(
            rows(do), lse.contiguous(), (do.float() * out.float()).sum(-1).contiguous(), rows(torch.empty_like(s.qu)),
            torch.zeros(B, H, Lr, D, dtype=torch.float32, device=k.device),
            torch.zeros(B, H, Lr, 2, dtype=torch.float32, device=k.device) if s.seg is not None else None, key_grads))
    args = [stream_args(s) for s in streams] + [None] * (2 - len(streams))
    grid = (triton.cdiv(max(s.qu.shape[2] for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    _launch(_rel_bwd_kernel, grid, k.device, cfg, warps, *args, *grads, *[None] * (2 - len(streams)),
            keys_args(k, v, r, p), dims_args(H, p), dropout_args(p.dropout), D=D,
            PREC=C.precision(k.dtype, k.device), UPCAST=C.upcast(k.dtype, k.device))
    res = [(g.dqu.ptr, g.dqv.to(s.qv.dtype), g.dseg if g.dseg is not None else s.qu.new_empty(0, dtype=torch.float32))
           for s, g in zip(streams, grads)]
    return res, key_grads.dk.to(k.dtype), key_grads.dv.to(v.dtype), key_grads.dr


# ============================================================================ the kernel interface (Python)
# The signatures of ptm_kernels.reference_relative: the parameter objects of ptm_kernels/kernel_params.py.


def relative_attention_fwd(k, v, r, p: RelativeParams, s: RelativeStream):
    (out, lse), = _fwd(k, v, r, p, [s])
    return out, lse


def relative_attention_bwd(dout, out, lse, k, v, r, p: RelativeParams, s: RelativeStream):
    res, dk, dv, dr = _bwd([dout], [(out, lse)], k, v, r, p, [s])
    dqu, dqv, dseg = res[0]
    return dqu, dqv, dk, dv, dr, dseg


def two_stream_attention_fwd(k, v, r, p: RelativeParams, c: RelativeStream, g: RelativeStream):
    (oc, lc), (og, lg) = _fwd(k, v, r, p, [c, g])
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, p: RelativeParams,
                             c: RelativeStream, g: RelativeStream):
    res, dk, dv, dr = _bwd([dout_c, dout_g], [(out_c, lse_c), (out_g, lse_g)], k, v, r, p, [c, g])
    (dqu_c, dqv_c, dseg_c), (dqu_g, dqv_g, dseg_g) = res
    return dqu_c, dqv_c, dseg_c, dqu_g, dqv_g, dseg_g, dk, dv, dr
