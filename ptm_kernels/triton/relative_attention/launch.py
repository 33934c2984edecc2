"""Relative attention launchers: tile config, the GPU launch ladder, stream argument packing, and the kernel
interface functions."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _common as C
from .._common import SUPPORTED_DTYPES
from ...kernel_params import RelativeParams, RelativeStream
from ..attention.launch import backward_delta
from .args import BandSlots, Keys, StreamGrads, StreamOut, dims_args, dropout_args, keys_args, rows, stream_args
from .backward import _rel_bwd_dkdv_kernel, _rel_bwd_dq_kernel
from .forward import _rel_fwd_kernel


# Measured and not kept (removed since): the band rolled along the key loop of the forward and dq kernels with
# 64 keys a step (the band in two 64-row pieces, the upper piece of one step the lower piece of the next, carried:
# one piece product a step). sm_90, triton 3.7.1, bf16 spill store bytes, band causal / every mask + dropout /
# two-stream: forward (3 units of 64 * 64 * D a step instead of 4) D = 64 0 / 8 / 0 B (kept: 0 / 0 / 0), D = 128
# 0 / 4 / 8 B on 2 stages (kept: 0 / 12 / 0); the other selects of the pieces tried spilled up to 324 B. dq (64
# keys a step, with dqu and dqv^T then in two accumulators) D = 64 212 / 700 / 788 B, D = 128 368 / 760 / 1316 B
# on 1 stage, the band image in two gathers a step up to 2280 B: the dq kernel's band now spans four 16-key steps
# instead (position._band_keys)


def _config(D: int, dtype, device, kernel: str = "fwd", streams: int = 1, mask_terms: int = 0):
    """(constexprs, warps) of kernel "fwd", "dq" or "dkdv" for one or two query streams, the most
    [rows x keys] terms of a stream's mask (_mask_terms) among them."""
    block_d = C.block_d(D)
    if C.interpreted(device):
        cfg, warps = dict(BLOCK_M=16, BLOCK_N=16, D_CHUNK=min(block_d, 16)), 4
    elif dtype == torch.float32:
        # tf32x3 dots on mma.sync: each operand is split into two tf32 parts, held in registers, so the tiles are
        # small: a step down for float32 (the 16-bit paths are what an H100 user runs). The largest that compile
        # without spilling (sm_90, triton 3.7.1, spill bytes over the compile harness's four mask families, 3
        # stages). Forward: 32 x 32 on 8 warps at D = 64, 16 x 32 on 4 warps at D = 128 (32 x 32: 32-744 B, 32 x 16:
        # 584-772 B). Backward: 16 x 32 on 8 warps, its head-dim dots in 16-column chunks read from memory
        # (backward._head_dim_dots; on whole tiles 16 x 16 was the largest at D = 64 and spilled 116-588 B at
        # D = 128); dq 32 x 16: 408-1096 B, 4 warps: 40-348 B. The gather form's [16, 32, D_CHUNK] products:
        # D_CHUNK 1 for dq at D = 128 (2, with 16-column dr chunks: 20-68 B; 1: 20-36 B), else 2. No float32 kernel
        # spills (the head-dim chunks of 32 columns left the two-stream dq 8 / 4 B at D = 64, 60 / 28 B at D = 128)
        if kernel == "fwd":
            cfg, warps = (dict(BLOCK_M=32, BLOCK_N=32, D_CHUNK=8), 8) if D <= 64 else \
                (dict(BLOCK_M=16, BLOCK_N=32, D_CHUNK=8), 4)
        else:
            cfg, warps = dict(BLOCK_M=16, BLOCK_N=32, D_CHUNK=1 if kernel == "dq" and D > 64 else 2), 8
    else:
        # 16-bit: tiles of 64 rows, wgmma's smallest M, for every dot, on 8 warps (4 warps spilled 2-4x more: the
        # accumulators then take twice the registers per thread). The dq kernel's band dots have M = BAND, so it
        # takes 16 keys a step (its band terms leave few registers: with dqu and dqv^T apart, 212 spill bytes at
        # D = 128 with every mask against 292 with 32 keys and 732 with 64, sm_90, triton 3.7.1; with one dq^T
        # accumulator 132 against 252 with 32 keys, and 32 keys spilled more in every config but the two-stream
        # one at D = 64: 108 -> 280 B with every mask at D = 64, 20 -> 72 band causal at D = 128). Its band of
        # BAND = 128 rows covers 64 keys of a 64-row tile, so one band product serves four 16-key steps
        # (position._band_keys; backward._stream_dq): per 64 keys 3 units of 128 * 64 * D for the band (product,
        # dq^T, dr) instead of 12: per 16 keys 9.2 K multiply-adds per head-dim column instead of 27.6 K. Its spill
        # bytes all lie outside the 16-key loop (sm90_artefacts inner_loop_spill_bytes: 0; in the loop before,
        # up to 96 B at D = 128); the 64-key loop around it reloads up to 16 B (D = 128 every mask + dropout;
        # 148 B while the band product and dS's band image were held in registers, with 2.1-3.2x the
        # instructions per key step: backward._stream_dq).
        # Measured and not kept there: 32-key steps (two a band; 72 - 380 B, in the loop), the band image or the
        # position terms carried as [64, 64] tiles (376 - 648 B), dS's band image summed in float32 (+32 - 40 B),
        # the four steps unrolled (0.9 - 2.7 KB), the band image packed two 16-bit values per int32 (D = 64 band
        # causal 36 -> 48 B, D = 128 68 -> 76 B), dS stored per step to a scratch buffer and the band image loaded
        # from it after the four steps (no image in registers during them, but [BAND, 64] addresses after: 80 - 424
        # B), qv re-read per band product (D = 128 68 -> 124 B). The dk / dv
        # dots have M = BLOCK_N (DKDV_T below turns them to M = D): 64 keys at D = 64; at D = 128 the two [64, 128]
        # accumulators beside the recomputed tile spilled 708 bytes with 64 keys, 360 with 32 keys. Recomputing
        # the dk / dv kernel's tile key-major instead (S^T = k qu^T, dP^T = v dO^T, the band term gathered to
        # [BLOCK_N, BLOCK_M], dropout_keep TRANS, as the tutorial's dkdv) spilled more in every config: worst
        # 956/968 B with 64 keys at D = 128 (1172/1048 with 32 keys; 2196/2328 with 128), 456/380 at D = 64 with 64
        # keys (152/120 row-major), 864/852 on 4 warps; not kept
        # dk / dv at D = 64 with four [rows x keys] mask terms (a dense mask, segment visibility, the segment term,
        # dropout): 32 keys, as at D = 128. Each term holds a [64, BLOCK_N] tile of predicates or values beside the
        # scores; with 64 keys that spilled 136 / 124 B, with 32 none (band causal and two-stream with three terms
        # spill nothing either way), for 33% more tensor-core work per key (the band product stays [128, 64] x D a
        # step: 32.8 K multiply-adds per key against 24.6 K)
        n = {"dq": 16, "dkdv": 64 if D <= 64 and mask_terms < 4 else 32}.get(kernel, 64)
        cfg, warps = dict(BLOCK_M=64, BLOCK_N=n), 8
        # The band in two 64-row pieces, one band-major [64, 64] dot each (removed since), measured: dk / dv at D =
        # 128, one stream, 244/240 -> 132/128 spill bytes with every mask + dropout, 72/64 -> 4/4 band causal
        # (DKDV_T), where it ran until the row halves below replaced it. Not elsewhere: a 64-row piece is held by
        # both warpgroups (a chained dot's warps lie along M), which cost more than it saved with two streams (0 ->
        # 68/68 B at D = 128), at D = 64 (dk/dv 0 -> 56 B band causal, dq 156 -> 196 B every mask), in the forward
        # (two-stream 0 -> 4 B) and in dq at D = 128 (two-stream 116 -> 156 B; 212 -> 168 B with every mask)
        if kernel == "dkdv":  # dk / dv at D = 128, one stream: the position term per row half (ROW_HALVES below)
            cfg["ROW_HALVES"] = D > 64 and streams == 1
        # Also measured for dq (dqu and dqv^T then apart) and not kept: its position gradients (dqv, dr) in a second
        # pass over the keys, so that dqu and dqv^T are never live together, with qu / dO re-read each step: 108/88 ->
        # 32/20 B band causal, 212/188 -> 128/124 every mask + dropout, 116/88 -> 48/36 two-stream (bf16 D = 128; 231
        # KB of shared memory), still spilling at 255 registers, for the scores, band product and dO V^T computed
        # twice: +37% multiply-adds per step (1.31 M on 3.54 M); at D = 64 it spilled more (0 -> 8 B band causal)
        # Measured for dk/dv and not kept: the key tile's dk / dv columns in two halves (grid axis 2), each program
        # recomputing the scores, band product and dO V^T over all of D. With 32 keys at D = 128 (band pieces):
        # every mask + dropout 208/204 -> 28/24 B, two-stream 128/128 -> 0; at D = 64 (64 keys) 152/120 -> 56/40
        # and 12/8 -> 4/4; with 64 keys at D = 128 (wgmma dk / dv dots) 492/464 B on 1 stage. Still spilling, for
        # +75% multiply-adds per dk/dv step at D = 128 (3.67 M against 2.10 M), +67% at D = 64 (2.62 M / 1.57 M)
        # Measured and not kept: tiles of 128 query rows on 8 warps, so that each warpgroup owns 64 rows of every
        # chained dot (bf16, spill store/load bytes over band causal, every mask + dropout, two-stream). The band
        # whole (BAND = next_pow2(128 + BLOCK_N) = 256, band-major): dq (16 keys) 1440-2088 B at D = 64 (1 stage),
        # 2572-3060 B at D = 128 and no stage fits (288 KB), dk/dv (32 keys, two 128-row pieces) 756-1512 B, 240 KB
        # on 1 stage. Each 64-row half against its own 128-row band (two band-major [128, 64] dots, the halves'
        # position terms joined): forward D = 64 0 / 228 / 212 B (was 0 / 0 / 0), D = 128 88 / 228 / 724 B on 1
        # stage (was 0 / 12 / 0); dk/dv D = 64 with 64 keys 228 / 532 / 128 B (was 0 / 152 / 12), with 32 keys
        # 16 / 400 / 28 B; D = 128 with 32 keys 68 / 424 / 36 B (240 KB on 1 stage), with 16 keys 16 / 84 / 8 B
        # (qv halves loaded apart: 44 / 108 / 4 B) but 237568 B of shared memory on 1 stage, over the 232448 an
        # H100 block may have, so the launcher ran the gather form (position term on CUDA cores)
        # the gather form's [BLOCK_M, BLOCK_N, D_CHUNK] products: 32 floats per thread, as 32 x 32 x 8 on 8 warps
        cfg["D_CHUNK"] = max(1, 8 * 32 * 32 // (cfg["BLOCK_M"] * cfg["BLOCK_N"]))
    cfg["BLOCK_D"] = block_d
    if kernel == "dkdv":
        # 16-bit: dk^T and dv^T accumulated (backward._rel_bwd_dkdv_kernel), so that their dots have M = D >= 64
        # and run on wgmma; the 32-key tiles at D = 128 ran them on mma.sync (M = BLOCK_N). Spill bytes (sm_90,
        # triton 3.7.1, bf16; band causal / every mask + dropout / two-stream) at D = 128: 0 / 208 / 128 -> 4 / 132
        # / 0 (two streams unsplit, above); at D = 64 (64 keys, wgmma either way): 0 / 152 / 12 -> 0 / 136 / 0.
        # With 64 keys at D = 128 it spilled 208 / 528 / 448 B on 1 stage. Float32 (tf32x3 on mma.sync, 32 keys)
        # keeps [BLOCK_N, D], the layout measured to spill nothing there
        cfg["DKDV_T"] = dtype != torch.float32
        # 16-bit at D = 128, one stream: the position term per row half (position._pos_row_halves), each half
        # against a band of 64 rows, instead of the band in two 64-row pieces (above), which both warpgroups
        # computed whole: half the band multiply-adds per warpgroup, and spill bytes (sm_90, triton 3.7.1, bf16;
        # band causal / every mask + dropout) 4 / 132 -> 0 / 4 B, none in the row-tile loop (4 / 120 B before).
        # Two streams keep the band whole (the halves: 0 -> 84 B)
        cfg.setdefault("ROW_HALVES", False)
    # rows of r one (row tile, key tile) pair uses when its rows are consecutive: BLOCK_M + BLOCK_N - 1
    cfg["BAND"] = triton.next_power_of_2(cfg["BLOCK_M"] + cfg["BLOCK_N"])
    return cfg, warps


def _gather_form(cfg: dict) -> dict:
    """cfg for the gather form: BAND = 0, and ROW_HALVES off (no band to take per row half), so that the compile
    (the sm_90 report) names the form it runs."""
    return dict(cfg, BAND=0, **({"ROW_HALVES": False} if "ROW_HALVES" in cfg else {}))


def _gather_only(cfg: dict, warps: int, streams: list):
    """(cfg, warps), the gather form's (_gather_form) where no stream can take the band form (every stream's rows
    sit at given positions): the kernel then compiles the gather form alone."""
    return (_gather_form(cfg) if all(s.positions is not None for s in streams) else cfg), warps


# GPU launch options (band path?, num_stages), fastest first. The band path keeps r_band and more dot operands in
# shared memory, and software pipelining multiplies the loads' buffers. Compiled for sm_90 (triton 3.7.1), 16-bit
# inputs with 3 stages need 147 / 262 KB (forward), 143 / 254 KB (dq) and 206 / 378 KB (dk/dv) at D = 64 / 128;
# an H100 / H200 block may have 227 KB, so at D = 128 the forward and dq run with 2 stages, dk/dv with 1. Float32
# tiles fit with 3 stages (at most 170 KB, the forward at D = 128). A kernel that does not fit raises
# OutOfResources when it is loaded, before it runs (nothing written yet), and the next option is tried; the
# choice is kept per specialisation.
# Last resort: every stream on the gather path (BAND = 0), the form that needs the least shared memory. GPUs with
# less shared memory per block step down the same way.
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
        elif C.TensorDescriptor is not None and isinstance(a, C.TensorDescriptor):
            out.append(("tma", tuple(a.block_shape)))
    return tuple(out)


def _launch(kernel, grid, device, cfg, warps, args, **kw) -> tuple:
    """Launch kernel with the first of _GPU_OPTIONS that fits (the interpreter: cfg as it is). args: its positional
    arguments, or a function that builds them for the band form (True) or the gather form (False). -> the
    arguments it ran with."""
    build = args if callable(args) else (lambda band: args)
    built = {}

    def args_for(band: bool) -> tuple:
        if band not in built:
            built[band] = build(band)
        return built[band]

    if C.interpreted(device):  # the interpreter: no resource limits
        kernel[grid](*args_for(cfg["BAND"] > 0), num_warps=warps, **cfg, **kw)
        return built[cfg["BAND"] > 0]
    key = (kernel.fn.__name__, device.index, *sorted(kw.items()), *sorted(cfg.items()), warps,
           _specialisation(args_for(cfg["BAND"] > 0)))

    def launch(option):
        band, stages = option
        band = band and cfg["BAND"] > 0
        kernel[grid](*args_for(band), num_warps=warps, num_stages=stages, **(cfg if band else _gather_form(cfg)),
                     **kw)
        return built[band]

    return C.first_that_fits(_GPU_CHOICE, key, _GPU_OPTIONS, launch)


def _check(*ts):
    for t in ts:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton: relative attention supports float32, float16, bfloat16, "
                             f"got {t.dtype}")


def _check_head_offsets(rows: int, R: int, D: int) -> None:
    """The dq kernel addresses one head's rows of dr (and, 16-bit, of dq) at int32 offsets (row * D + column):
    refuse a head past them rather than wrap."""
    if max(rows, R) * D >= 2 ** 31:
        raise ValueError(f"ptm_kernels.triton: relative attention backward needs fewer than 2 ** 31 elements per head "
                         f"of q and r (Lq = {rows}, R = {R}, D = {D})")


# Test hook (not API): force the forward's TMA loads on (where the operands allow them; the interpreter runs
# them) or off.
_FORCE_TMA: Optional[bool] = None


def _tma_loads(keys: Keys, k: Tensor, v: Tensor, r: Tensor, cfg: dict, streams: int) -> Keys:
    """keys with the forward's TMA descriptors (Hopper, 16-bit; the pointer loads elsewhere): r's band
    (position._band) and the key tiles of k and v (scores._key_tile), as measured below.

    A TMA load is one instruction for the whole tile, so the kernel holds no per-thread addresses for it: the
    band of 128 rows x D took 8 64-bit addresses per thread at D = 128. Spill bytes of the 16-bit forward (sm_90,
    triton 3.7.1, bf16 / fp16; band causal, every mask + dropout, two-stream), registers of band causal: by
    pointers D = 64 0 / 0 / 0 B, 186 registers; D = 128 0 / 12 / 0 B (4 B of them in the key loop), 232. r's band
    by TMA: D = 64 0 / 4 / 0 B, 168; D = 128 0 / 0 / 0 B at one stream, 204, but two streams 12 / 8 B (fp16).
    With k and v by TMA too: D = 64 0 / 0 / 0 B; D = 128 two streams 4 / 4 B. So r's band by TMA at D = 64 and
    at one stream, k and v at D = 64: no forward spills. The dq and dk / dv kernels keep pointer loads. In the dq
    kernel, while it held its band tiles in registers, r's band by TMA moved its spills (D = 128: 68 / 188 / 216 ->
    32 / 184 / 176 B, but 4 B of them into its key loop, where there were none; D = 64 36 / 112 / 84 -> 40 / 108 /
    92 B, 8 B in the loop), k and v by TMA as well did not lower them. With the band tiles in its slots
    (backward._stream_dq), by pointers it spills nothing at D = 64, and at D = 128 0 / 92 / 84 B against
    0 / 108 / 96 B by TMA (4 B of them in the key loop)."""
    use = _FORCE_TMA if _FORCE_TMA is not None else (
        not C.interpreted(k.device) and C.capability(k.device)[0] >= 9 and k.dtype != torch.float32)
    if not use or C.TensorDescriptor is None:
        return keys
    D, bd = k.shape[-1], cfg["BLOCK_D"]
    shared = r.stride(0) == 0  # r shared by the batch (a stride-0 view): its first row stands for all
    r_one = r[:1] if shared else r
    if cfg["BAND"] and (D <= 64 or streams == 1) and C.tma_strides(r_one) is not None:
        keys = keys._replace(r_band=C.tma_rows(r_one, cfg["BAND"], bd), r_batch_step=0 if shared else 1)
    if D <= 64 and C.tma_strides(k) is not None and C.tma_strides(v) is not None:
        keys = keys._replace(k=keys.k._replace(tma=C.tma_rows(k, cfg["BLOCK_N"], bd)),
                             v=keys.v._replace(tma=C.tma_rows(v, cfg["BLOCK_N"], bd)))
    return keys


def _fwd(k, v, r, p: RelativeParams, streams: list) -> list:
    """-> [(out, lse)] per stream; both streams in one launch (grid axis 2)."""
    _check(k, v, r, streams[0].q)
    B, H, Lk, D = k.shape
    cfg, warps = _gather_only(*_config(D, k.dtype, k.device), streams)
    outs = [StreamOut(rows(torch.empty(B, H, s.q.shape[2], D, dtype=s.q.dtype, device=k.device)),
                      torch.empty(B, H, s.q.shape[2], dtype=torch.float32, device=k.device)) for s in streams]
    args = [stream_args(s, *s.biased()) for s in streams] + [None] * (2 - len(streams))
    grid = (triton.cdiv(max(s.q.shape[2] for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    keys = _tma_loads(keys_args(k, v, r, p), k, v, r, cfg, len(streams))
    _launch(_rel_fwd_kernel, grid, k.device, cfg, warps,
            (*args, *outs, *[None] * (2 - len(streams)), keys, dims_args(H, p), dropout_args(p.dropout)), D=D,
            PREC=C.precision(k.dtype, k.device), UPCAST=C.upcast(k.dtype, k.device))
    return [(o.o.ptr, o.lse) for o in outs]


def _bwd(douts: list, outs_lses: list, k, v, r, p: RelativeParams, streams: list):
    """-> ([(dq, du, dv_bias, dseg)] per stream, dk, dv, dr); dk, dv, dr summed over the streams. Two launches: dq
    (row tiles of both streams, with dr) and dk / dv (key tiles)."""
    B, H, Lk, D = k.shape
    R = r.shape[2]
    _check_head_offsets(max(s.q.shape[2] for s in streams), R, D)
    f32 = dict(dtype=torch.float32, device=k.device)
    dr = torch.zeros(B, H, R, D, **f32)
    biased = [tuple(t.contiguous() for t in s.biased()) for s in streams]  # the backward reads them contiguous
    grads = []
    for s, (qu, _), do, (out, lse) in zip(streams, biased, douts, outs_lses):
        do = do.contiguous() if do.stride(-1) != 1 else do
        Lr = qu.shape[2]
        grads.append(StreamGrads(
            rows(do), lse.contiguous(), backward_delta(out, do),
            torch.empty(B, H, Lr, D, **f32), None,
            torch.zeros(B, H, Lr, 2, **f32) if s.seg is not None else None, dr,
            torch.zeros(B, H, R, **f32) if s.u is not None or s.v_bias is not None else None))
    none = [None] * (2 - len(streams))
    kw = dict(D=D, PREC=C.precision(k.dtype, k.device), UPCAST=C.upcast(k.dtype, k.device))
    cfg, warps = _gather_only(*_config(D, k.dtype, k.device, "dq"), streams)

    def dq_args(band: bool) -> tuple:  # a zeroed dqv buffer for each stream whose form adds dqv up in memory
        gs = [g._replace(dqv=torch.zeros(B, H, g.dq.shape[2], D, **f32))
              if _dqv_in_memory(s, band, kw["PREC"], cfg["BLOCK_D"]) else g for s, g in zip(streams, grads)]
        gs = [g._replace(band_slots=_band_slots(B * H, g.dq.shape[2], s.q.dtype, k.device, cfg))
              if _band_slots_in_memory(s, band, kw["PREC"], cfg) else g for s, g in zip(streams, gs)]
        return (*[stream_args(s, qu, qv) for s, (qu, qv) in zip(streams, biased)], *none, *gs, *none,
                keys_args(k, v, r, p), dims_args(H, p), dropout_args(p.dropout))

    grid = (triton.cdiv(max(s.q.shape[2] for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    args = _launch(_rel_bwd_dq_kernel, grid, k.device, cfg, warps, dq_args, **kw)
    grads = args[2:2 + len(streams)]
    dk = torch.empty(B, H, Lk, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, H, Lk, D, dtype=v.dtype, device=k.device)
    cfg, warps = _gather_only(*_config(D, k.dtype, k.device, "dkdv", len(streams),
                                       max(_mask_terms(s, p) for s in streams)), streams)
    _launch(_rel_bwd_dkdv_kernel, (triton.cdiv(Lk, cfg["BLOCK_N"]), B * H), k.device, cfg, warps, (*args, dk, dv),
            **kw)
    res = [(*_query_grads(s, g, r), g.dseg if g.dseg is not None else s.q.new_empty(0))
           for s, g in zip(streams, grads)]
    return res, dk, dv, dr


def _head_dim_chunked(prec: str, block_d: int) -> bool:
    """backward._head_dim_chunked on the host (a jit function cannot be called here): the float32 (tf32x3)
    backward at D >= 64 runs its head-dim dots in chunks read from memory."""
    return prec == "tf32x3" and block_d >= 64


def _dqv_in_memory(s: RelativeStream, band: bool, prec: str, block_d: int) -> bool:
    """Whether the dq kernel adds stream s's dqv up in a float32 buffer: the gather form (rows at given positions,
    or the launch without a band) and the float32 head-dim chunks (backward._head_dim_chunked: tf32x3 at D >= 64);
    the band form keeps dqv in its dq accumulator, and no buffer is zeroed and summed for it. The dq kernel does
    not compile a form that needs the buffer without one (tl.static_assert)."""
    return s.positions is not None or not band or _head_dim_chunked(prec, block_d)


def _band_slots_in_memory(s: RelativeStream, band: bool, prec: str, cfg: dict) -> bool:
    """Whether the dq kernel takes stream s's band products and dS's band images through memory (_band_slots,
    backward._stream_dq): its band-major band form, row tiles of 64 (16-bit on a GPU; the kernel's DQ_T). The
    kernel does not compile that form without the slots (tl.static_assert)."""
    return band and s.positions is None and cfg["BLOCK_M"] >= 64 and not _head_dim_chunked(prec, cfg["BLOCK_D"])


def _band_slots(bh: int, rows: int, dtype, device, cfg: dict) -> BandSlots:
    """The dq kernel's band slots (backward._stream_dq): float32 [BLOCK_M, BLOCK_M + BAND] for the band product,
    then the same of q's dtype for dS's band image, both skewed (position._slot_skewed), 72 KB in 16-bit; each
    written and read once per 64 keys, the product read back per key step. A pool of two per SM (a dq program
    fills an SM's registers, so at most one runs on each), not one per program: the programs take a free slot for
    their run (backward._take_slot), so the pool stays 19.5 MB on an H100 whatever B, H and Lr (one per program:
    72 MB at B = 8, H = 16, Lr = 512)."""
    words = (cfg["BLOCK_M"] + cfg["BAND"]) * cfg["BLOCK_M"] * (4 + dtype.itemsize) // 4
    count = min(bh * triton.cdiv(rows, cfg["BLOCK_M"]), 2 * C.num_sms(device))
    return BandSlots(torch.empty(count, words, dtype=torch.float32, device=device),
                     torch.zeros(count, dtype=torch.int32, device=device), count)


def _mask_terms(s: RelativeStream, p: RelativeParams) -> int:
    """How many [rows x keys] terms stream s adds to its scores and mask: a dense mask, segment visibility, the
    segment term, dropout (each a tile of predicates or values beside the scores: _config)."""
    return sum((s.vis.dense_mask is not None, s.vis.q_segments is not None, s.seg is not None, p.dropout.p > 0))


def _query_grads(s: RelativeStream, g: StreamGrads, r: Tensor):
    """(dq in q's dtype, du, dv_bias): the sums of dqu and dqv over batch and rows (float32 [H, D]; empty where the
    bias is None). dqv's: sum_t band_sums[t] r[t] (band form) plus the dqv the gather and chunked forms left in
    memory (each form writes one of the two; the other stays 0); dqu's: dq's sum less dqv's. That difference loses the
    float32 rounding of the larger sum (~1e-7 of it), as adding dqu and dqv did; the kernels spilled when they
    also summed dS over the rows for dqu (dk/dv at D = 64 with every mask: 136 -> 228 spill bytes, sm_90)."""
    if g.band_sums is None:
        return g.dq.to(s.q.dtype), s.q.new_empty(0), s.q.new_empty(0)
    if r.stride(0) == 0:  # r shared by the batch (expanded): not copied B times by the float32 einsum
        band = torch.einsum("ht,htd->hd", g.band_sums.sum(0), r[0].float())
    else:
        band = torch.einsum("bht,bhtd->hd", g.band_sums, r.float())
    dqv_sum = band + g.dqv.sum((0, 2)) if g.dqv is not None else band
    du = g.dq.sum((0, 2)) - dqv_sum if s.u is not None else s.q.new_empty(0)
    return g.dq.to(s.q.dtype), du, dqv_sum if s.v_bias is not None else s.q.new_empty(0)


# ============================================================================ the kernel interface (Python)
# The signatures of ptm_kernels.reference_relative: the parameter objects of ptm_kernels/kernel_params.py.


def relative_attention_fwd(k, v, r, p: RelativeParams, s: RelativeStream):
    (out, lse), = _fwd(k, v, r, p, [s])
    return out, lse


def relative_attention_bwd(dout, out, lse, k, v, r, p: RelativeParams, s: RelativeStream):
    res, dk, dv, dr = _bwd([dout], [(out, lse)], k, v, r, p, [s])
    dq, du, dv_bias, dseg = res[0]
    return dq, du, dv_bias, dk, dv, dr, dseg


def two_stream_attention_fwd(k, v, r, p: RelativeParams, c: RelativeStream, g: RelativeStream):
    (oc, lc), (og, lg) = _fwd(k, v, r, p, [c, g])
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, p: RelativeParams,
                             c: RelativeStream, g: RelativeStream):
    res, dk, dv, dr = _bwd([dout_c, dout_g], [(out_c, lse_c), (out_g, lse_g)], k, v, r, p, [c, g])
    return (*res[0], *res[1], dk, dv, dr)
