"""Relative attention launchers: tile config, the GPU launch ladder, stream argument packing, and the kernel
interface functions."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .. import _common as C
from .._common import LOG2E, SUPPORTED_DTYPES
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


def _leaves(args):
    for a in args:
        if isinstance(a, tuple):
            yield from _leaves(a)
        else:
            yield a


def _launch(kernel, grid, device, cfg, warps, *args, **kw):
    if C.interpreted(device):  # the interpreter: no resource limits
        kernel[grid](*args, num_warps=warps, **cfg, **kw)
        return
    key = (kernel.fn.__name__, device.index, *sorted(kw.items()), *sorted(cfg.items()), warps,
           *(a.dtype for a in _leaves(args) if isinstance(a, Tensor)))

    def launch(option):
        band, stages = option
        kernel[grid](*args, num_warps=warps, num_stages=stages, **dict(cfg, BAND=cfg["BAND"] if band else 0), **kw)

    C.first_that_fits(_GPU_CHOICE, key, _GPU_OPTIONS, launch)


class StreamFlags(NamedTuple):
    """A stream's constexpr flags (kernel argument F0 / F1, read by position in device code)."""
    causal: bool
    pos: bool  # rows at arbitrary positions (XLNet's query stream): the gather form
    seg: bool  # segment term
    klen: bool
    prefix: bool
    vseg: bool  # visibility segments
    dense: bool


class _Stream:
    """One stream's tensors, placeholders for the absent ones, strides and flags, in kernel order."""

    def __init__(self, qu, qv, seg, q_ids, positions, causal, wl, wr, kl, pl, qs, ks, dense):
        dummy = qu.new_zeros(1)
        i64 = torch.zeros(1, dtype=torch.int64, device=qu.device)
        self.qu, self.qv = qu, qv
        self.Lr = qu.shape[2]
        self.seg = seg.float().contiguous() if seg is not None else dummy.float()
        self.q_ids = q_ids.contiguous() if q_ids is not None else i64
        self.pos = positions.contiguous() if positions is not None else i64
        self.qs = qs.contiguous() if qs is not None else i64
        self.ks = ks.contiguous() if ks is not None else i64
        self.kl = kl if kl is not None else i64
        self.pl = pl if pl is not None else i64
        self.dense = dense.view(torch.uint8) if dense is not None else torch.zeros(1, 1, 1, 1, dtype=torch.uint8,
                                                                                    device=qu.device)
        self.dm_strides = tuple(self.dense.stride()) if dense is not None else (0, 0, 0, 0)
        self.causal, self.wl, self.wr = bool(causal), int(wl), int(wr)
        self.flags = StreamFlags(bool(causal), positions is not None, seg is not None, kl is not None, pl is not None,
                                 qs is not None, dense is not None)


def _stream_args(s: _Stream, out, lse):
    """The forward kernel's stream tuple S (see forward._stream_fwd)."""
    return (s.qu, s.qv, s.seg, s.q_ids, s.pos, s.qs, s.kl, s.pl, s.dense, out, lse,
            *s.qu.stride()[:3], *s.qv.stride()[:3], *s.dm_strides, *out.stride()[:3],
            s.Lr, s.wl, s.wr)


def _flag_kwargs(s0: _Stream, s1: _Stream):
    """F0 / F1: each stream's flags (CAUSAL, HAS_POS, HAS_SEG, HAS_KLEN, HAS_PREFIX, HAS_VSEG, HAS_DENSE)."""
    return dict(F0=s0.flags, F1=s1.flags)


def _dropout_args(p, seed):
    """The kernels' drop tuple (seed, threshold, scale); the query stream uses seed + 1 (in-kernel)."""
    p = float(p)
    return C.dropout_seed(seed), C.dropout_threshold(p), (1.0 / (1.0 - p) if p < 1.0 else 0.0)


def _check(*ts):
    for t in ts:
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton: relative attention supports float32, float16, bfloat16, "
                             f"got {t.dtype}")


def _shared_args(k, v, r, k_ids, ks):
    B, H, Lk, D = k.shape
    kids = k_ids.contiguous() if k_ids is not None else torch.zeros(1, dtype=torch.int64, device=k.device)
    kseg = ks.contiguous() if ks is not None else torch.zeros(1, dtype=torch.int64, device=k.device)
    return [k, v, r, kids, kseg]


def _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, streams):
    _check(k, v, r, streams[0].qu)
    B, H, Lk, D = k.shape
    s0 = streams[0]
    s1 = streams[1] if len(streams) > 1 else streams[0]
    cfg, warps = _config(D, k.dtype, k.device)
    outs = []
    for s in streams:
        outs.append((torch.empty(B, H, s.Lr, D, dtype=s.qu.dtype, device=k.device),
                     torch.empty(B, H, s.Lr, dtype=torch.float32, device=k.device)))
    o0, l0 = outs[0]
    o1, l1 = outs[1] if len(streams) > 1 else outs[0]
    # the visibility segment ids of the keys: the stream's own (ks may differ per stream)
    ks0 = s0.ks
    grid = (triton.cdiv(max(s.Lr for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    kseg = ks0 if len(streams) == 1 or s1.flags.vseg is False else ks0
    if len(streams) > 1 and s0.flags.vseg and s1.flags.vseg and not torch.equal(s0.ks, s1.ks):
        raise NotImplementedError("ptm_kernels.triton: the two streams' segments() parts must share key ids")
    if len(streams) > 1 and s1.flags.vseg and not s0.flags.vseg:
        kseg = s1.ks
    _launch(_rel_fwd_kernel, grid, k.device, cfg, warps,
        _stream_args(s0, o0, l0), _stream_args(s1, o1, l1),
        (k, v, r, (k_ids.contiguous() if k_ids is not None else s0.q_ids), kseg,
         *k.stride()[:3], *v.stride()[:3], *r.stride()[:3]),
        (H, Lk, r.shape[2], q_len, r_offset, scale * LOG2E), _dropout_args(dropout_p, seed),
        **_flag_kwargs(s0, s1), DROPOUT=dropout_p > 0, D=D, PREC=C.precision(k.dtype, k.device),
        UPCAST=C.upcast(k.dtype, k.device))
    return outs


def _bwd(douts, outs_lses, k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, streams):
    B, H, Lk, D = k.shape
    R = r.shape[2]
    cfg, warps = _config(D, k.dtype, k.device)
    dk = torch.zeros(B, H, Lk, D, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    dr = torch.zeros(B, H, R, D, dtype=torch.float32, device=k.device)
    per = []
    for s, do, (out, lse) in zip(streams, douts, outs_lses):
        do = do.contiguous() if do.stride(-1) != 1 else do
        delta = (do.float() * out.float()).sum(-1).contiguous()
        dqu = torch.empty_like(s.qu, memory_format=torch.contiguous_format)
        dqv = torch.zeros(s.qv.shape, dtype=torch.float32, device=k.device)
        dseg = torch.zeros(B, H, s.Lr, 2, dtype=torch.float32, device=k.device) if s.flags.seg else s.qu.new_empty(0)
        per.append((s, do, lse.contiguous(), delta, dqu, dqv, dseg))

    def args(p):
        s, do, lse, delta, dqu, dqv, dseg = p
        return (s.qu, s.qv, s.seg, s.q_ids, s.pos, s.qs, s.kl, s.pl, s.dense, do, lse, delta, dqu, dqv,
                dseg if dseg.numel() else s.seg,
                *s.qu.stride()[:3], *s.qv.stride()[:3], *s.dm_strides, *do.stride()[:3],
                s.Lr, s.wl, s.wr)

    # dqu / dqv are written with qu's / qv's strides: make the inputs contiguous for the backward
    fixed = []
    for (s, do, lse, delta, dqu, dqv, dseg) in per:
        s.qu, s.qv = s.qu.contiguous(), s.qv.contiguous()
        fixed.append((s, do, lse, delta, dqu, dqv, dseg))
    p0 = fixed[0]
    p1 = fixed[1] if len(fixed) > 1 else fixed[0]
    kseg = p0[0].ks if p0[0].flags.vseg or len(fixed) == 1 else p1[0].ks
    grid = (triton.cdiv(max(s.Lr for s in streams), cfg["BLOCK_M"]), B * H, len(streams))
    _launch(_rel_bwd_kernel, grid, k.device, cfg, warps,
        args(p0), args(p1),
        (k, v, r, (k_ids.contiguous() if k_ids is not None else p0[0].q_ids), kseg, dk, dv, dr,
         *k.stride()[:3], *v.stride()[:3], *r.stride()[:3]),
        (H, Lk, R, q_len, r_offset, scale * LOG2E, scale), _dropout_args(dropout_p, seed),
        **_flag_kwargs(p0[0], p1[0]), DROPOUT=dropout_p > 0, D=D, PREC=C.precision(k.dtype, k.device),
        UPCAST=C.upcast(k.dtype, k.device))
    res = [(dqu, dqv.to(s.qv.dtype), dseg) for (s, _, _, _, dqu, dqv, dseg) in fixed]
    return res, dk.to(k.dtype), dv.to(v.dtype), dr


# ============================================================================ the kernel interface (Python)


def relative_attention_fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, qu, qv, seg, q_ids, positions,
                           causal, window_left, window_right, key_lengths, prefix_lengths, q_segments, k_segments,
                           dense_mask):
    s = _Stream(qu, qv, seg, q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                q_segments, k_segments, dense_mask)
    (out, lse), = _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [s])
    return out, lse


def relative_attention_bwd(dout, out, lse, k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, qu, qv, seg,
                           q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                           q_segments, k_segments, dense_mask):
    s = _Stream(qu, qv, seg, q_ids, positions, causal, window_left, window_right, key_lengths, prefix_lengths,
                q_segments, k_segments, dense_mask)
    res, dk, dv, dr = _bwd([dout], [(out, lse)], k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [s])
    dqu, dqv, dseg = res[0]
    return dqu, dqv, dk, dv, dr, dseg


def two_stream_attention_fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, *streams):
    sc, sg = _Stream(*streams[:13]), _Stream(*streams[13:])
    (oc, lc), (og, lg) = _fwd(k, v, r, k_ids, scale, r_offset, q_len, dropout_p, seed, [sc, sg])
    return oc, lc, og, lg


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, k_ids, scale, r_offset, q_len,
                             dropout_p, seed, *streams):
    sc, sg = _Stream(*streams[:13]), _Stream(*streams[13:])
    res, dk, dv, dr = _bwd([dout_c, dout_g], [(out_c, lse_c), (out_g, lse_g)], k, v, r, k_ids, scale, r_offset,
                           q_len, dropout_p, seed, [sc, sg])
    (dqu_c, dqv_c, dseg_c), (dqu_g, dqv_g, dseg_g) = res
    return dqu_c, dqv_c, dseg_c, dqu_g, dqv_g, dseg_g, dk, dv, dr
