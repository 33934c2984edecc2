"""Attention launchers: argument checks and packing, config fallback, key splits (decoding), GQA group splits."""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from .. import _common as C
from .._common import LOG2E, SUPPORTED_DTYPES, block_d
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _bwd_preprocess_kernel
from .block_map import _map_usable, _tile_lists
from .configs import _bwd_configs, _fwd_configs, _shrink
from .forward import _attn_combine_kernel, _attn_fwd_kernel, _dropout_mask_kernel

# Test hooks (not API): force the number of key splits of the forward / of GQA group splits of dK/dV.
_FORCE_SPLITS: Optional[int] = None
_FORCE_GROUP_SPLITS: Optional[int] = None

# per (direction, block_d, dtype, device, heavy): the index of the first config that fitted the device
_FALLBACK: dict = {}


# --------------------------------------------------------------------------------------- argument packing
class _Masks:
    """The mask parts as kernel arguments (dummy pointers and zero strides for absent parts)."""

    def __init__(self, q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths,
                 q_segments, k_segments, dense_mask, bias, toeplitz, dropout_p, seed):
        dummy = q
        self.causal = bool(causal)
        self.has_prefix = self.causal and prefix_lengths is not None
        wl = int(window_left) if window_left is not None else -1
        wr = int(window_right) if window_right is not None else -1
        # A bound that no (query, key) pair can exceed is no bound (also keeps the index math in int32):
        # i + Lk - Lq - j <= Lk - 1 and j - (i + Lk - Lq) <= Lq - 1 always; Lq + Lk stands for "unbounded".
        has_wl = 0 <= wl < Lk - 1
        has_wr = 0 <= wr < Lq - 1
        self.has_window = has_wl or has_wr
        self.wl = wl if has_wl else Lq + Lk
        self.wr = wr if has_wr else Lq + Lk
        self.has_klen = key_lengths is not None
        self.klen = key_lengths.clamp(0, Lk).to(torch.int32).contiguous() if self.has_klen else dummy
        self.plen = prefix_lengths.clamp(0, Lk).to(torch.int32).contiguous() if self.has_prefix else dummy
        self.has_seg = q_segments is not None and k_segments is not None
        if self.has_seg:
            self.qseg, self.kseg = q_segments, k_segments
            self.s_qs = (q_segments.stride(0), q_segments.stride(1))
            self.s_ks = (k_segments.stride(0), k_segments.stride(1))
        else:
            self.qseg = self.kseg = dummy
            self.s_qs = self.s_ks = (0, 0)
        self.has_dense = dense_mask is not None
        if self.has_dense:
            dm = dense_mask.expand(B, H, Lq, Lk)
            self.dmask = dm.view(torch.uint8) if dm.dtype == torch.bool else (dm != 0).view(torch.uint8)
            self.s_d = tuple(self.dmask.stride())
        else:
            self.dmask, self.s_d = dummy, (0, 0, 0, 0)
        self.has_bias = bias is not None
        if self.has_bias:
            self.bias = bias.expand(B, H, Lq, Lk)
            self.s_b = tuple(self.bias.stride())
        else:
            self.bias, self.s_b = dummy, (0, 0, 0, 0)
        self.has_toep = toeplitz is not None
        if self.has_toep:
            self.toep = toeplitz.to(torch.float32).contiguous()
            self.s_t = self.toep.stride(0)
        else:
            self.toep, self.s_t = dummy, 0
        self.p = float(dropout_p)
        self.has_dropout = self.p > 0.0
        self.rdrop = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0
        self.threshold = C.dropout_threshold(self.p)
        self.seed = C.dropout_seed(seed) if self.has_dropout else 0

    @property
    def elementwise(self) -> bool:
        return self.has_seg or self.has_dense

    @property
    def heavy(self) -> bool:
        return self.has_bias or self.has_toep or self.has_dense or self.has_dropout

    def tensors(self):
        return (self.klen, self.plen, self.qseg, self.kseg, self.dmask, self.bias, self.toep)

    def strides(self):
        return (*self.s_qs, *self.s_ks, *self.s_d, *self.s_b, self.s_t)

    def flags(self) -> dict:
        return dict(CAUSAL=self.causal, HAS_PREFIX=self.has_prefix, HAS_WINDOW=self.has_window,
                    HAS_KLEN=self.has_klen, HAS_SEG=self.has_seg, HAS_DENSE=self.has_dense,
                    HAS_BIAS=self.has_bias, HAS_TOEP=self.has_toep, HAS_DROPOUT=self.has_dropout,
                    ELEMWISE=self.elementwise)


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"ptm_kernels.triton.attention: {name} has dtype {t.dtype}; "
                             "supported: float32, float16, bfloat16")
        if t.dim() != 4:
            raise ValueError(f"ptm_kernels.triton.attention: {name} must be [B, H, L, D], got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("ptm_kernels.triton.attention: q, k, v must share a dtype")
    if q.shape[-1] > 256 or q.shape[-1] < 1:
        raise ValueError(f"ptm_kernels.triton.attention: head dim {q.shape[-1]} not in [1, 256]")


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------ forward
def attention_fwd(q, k, v, scale: float, causal: bool, window_left: int, window_right: int, key_lengths,
                  prefix_lengths, q_segments, k_segments, dense_mask, bias, toeplitz, block_map,
                  block_m: int, block_n: int, dropout_p: float, seed: int):
    """-> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    mk = _Masks(q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths, q_segments,
                k_segments, dense_mask, bias, toeplitz, dropout_p, seed)
    use_map = mk.elementwise and _map_usable(block_map, B, H, Lq, Lk, block_m, block_n)
    cfgs = _fwd_configs(D, q.dtype, q.device, mk.heavy)

    def run(cfg):
        BM, BN, warps, stages = cfg
        BM, BN = _shrink(BM, Lq), _shrink(BN, Lk)
        if BM <= 32:  # decoding-sized query tiles: fewer warps
            warps = min(warps, 4)
        return _fwd_launch(q, k, v, out, lse, float(scale), mk, block_map if use_map else None, block_m,
                           block_n, BM, BN, warps, stages)

    C.first_that_fits(_FALLBACK, ("fwd", block_d(D), q.dtype, str(q.device), mk.heavy), cfgs, run)
    return out, lse


def _fwd_launch(q, k, v, out, lse, scale, mk: _Masks, block_map, map_bm, map_bn, BM, BN, warps, stages):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    BD = block_d(D)
    num_m = triton.cdiv(Lq, BM)
    if block_map is not None:
        lists = _tile_lists(block_map, map_bm, map_bn, BM, BN, Lq, Lk, transpose=False)
        cnt1 = lists[0]
        s_lb = cnt1.stride(0) if cnt1.shape[0] > 1 else 0
        s_lh = cnt1.stride(1) if cnt1.shape[1] > 1 else 0
        n_list = lists[1].shape[-1]
    else:
        lists = (lse, lse, lse, lse)  # dummies
        s_lb = s_lh = n_list = 0

    # Split the keys across programs when the query tiles alone cannot fill the device (decoding).
    programs = num_m * B * H
    n_kt = triton.cdiv(Lk, BN)
    n_sms = C.num_sms(q.device)
    if _FORCE_SPLITS is not None:
        n_split = max(1, min(_FORCE_SPLITS, n_kt))
    elif programs < n_sms and n_kt >= 4:
        n_split = max(1, min(triton.cdiv(2 * n_sms, programs), n_kt // 2, 128))
    else:
        n_split = 1
    split = n_split > 1
    if split:
        o_buf = torch.empty((n_split, B, H, Lq, D), dtype=torch.float32, device=q.device)
        l_buf = torch.empty((n_split, B, H, Lq), dtype=torch.float32, device=q.device)
        o_strides = (o_buf.stride(1), o_buf.stride(2), o_buf.stride(3), o_buf.stride(0))
        l_split_stride = l_buf.stride(0)
    else:
        o_buf, l_buf = out, lse
        o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
        l_split_stride = 0

    _attn_fwd_kernel[(programs, n_split)](
        q, k, v, o_buf, l_buf, *mk.tensors(), *lists,
        scale * LOG2E, mk.seed, mk.threshold, mk.rdrop,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *o_strides, l_split_stride,
        *mk.strides(),
        s_lb, s_lh, n_list,
        H, H // Hk, Lq, Lk, D, mk.wl, mk.wr, n_split,
        **mk.flags(), SPARSE=block_map is not None, SPLIT=split,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, EVEN_D=(D == BD), PREC=C.precision(q.dtype, q.device),
        UPCAST=C.upcast(q.dtype, q.device),
        num_warps=warps, num_stages=stages,
    )
    if split:
        BMC = _shrink(32 if BD <= 128 else 16, Lq)
        _attn_combine_kernel[(triton.cdiv(Lq, BMC) * B * H,)](
            o_buf, l_buf, out, lse, o_buf.stride(0), l_buf.stride(0),
            out.stride(0), out.stride(1), out.stride(2), H, Lq, D, n_split,
            BLOCK_M=BMC, BLOCK_D=BD, EVEN_D=(D == BD), num_warps=4,
        )
    return None


def attention_dropout_mask(seed: int, dropout_p: float, B: int, H: int, Lq: int, Lk: int, device) -> Tensor:
    """This backend's dropout keep-mask (bool [B, H, Lq, Lk]) for `seed`, as the kernels compute it."""
    out = torch.empty((B, H, Lq, Lk), dtype=torch.int8, device=device)
    if out.numel() == 0:
        return out.view(torch.bool)
    BM, BN = 32, 64
    grid = (triton.cdiv(Lq, BM) * triton.cdiv(Lk, BN) * B * H,)
    _dropout_mask_kernel[grid](out, C.dropout_seed(seed), C.dropout_threshold(dropout_p), Lq, Lk, BLOCK_M=BM,
                               BLOCK_N=BN, num_warps=4)
    return out.view(torch.bool)


# ----------------------------------------------------------------------------------------------- backward
def attention_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, window_left: int, window_right: int,
                  key_lengths, prefix_lengths, q_segments, k_segments, dense_mask, bias, toeplitz, block_map,
                  block_m: int, block_n: int, dropout_p: float, seed: int, bias_requires_grad: bool,
                  toeplitz_requires_grad: bool):
    """-> (dq, dk, dv, dbias, dtoeplitz); see reference_kernels.attention_bwd."""
    _check(q, k, v)
    q, k, v, dout, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout), _unit_last(out)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    dev = q.device
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hk, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hk, Lk, D), dtype=v.dtype, device=dev)
    dbias = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=dev) if bias_requires_grad else q.new_empty(0)
    dtoep = (torch.zeros((H, Lq + Lk - 1), dtype=torch.float32, device=dev) if toeplitz_requires_grad
             else q.new_empty(0))
    if B * H == 0 or Lq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dbias, dtoep
    lse = lse.to(torch.float32).contiguous()
    mk = _Masks(q, B, H, Lq, Lk, causal, window_left, window_right, key_lengths, prefix_lengths, q_segments,
                k_segments, dense_mask, bias, toeplitz, dropout_p, seed)
    use_map = mk.elementwise and _map_usable(block_map, B, H, Lq, Lk, block_m, block_n)
    BD = block_d(D)

    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=dev)
    BMP = _shrink(64, Lq)
    _bwd_preprocess_kernel[(triton.cdiv(Lq, BMP) * B * H,)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), H, Lq, D,
        BLOCK_M=BMP, BLOCK_D=BD, EVEN_D=(D == BD), num_warps=4,
    )

    def run(cfg):
        if toeplitz_requires_grad:
            dtoep.zero_()  # a retried config starts over (the dQ kernel accumulates into it)
        _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, dbias, dtoep, float(scale), mk,
                    block_map if use_map else None, block_m, block_n, cfg, bias_requires_grad,
                    toeplitz_requires_grad)

    C.first_that_fits(_FALLBACK, ("bwd", BD, q.dtype, str(dev), mk.heavy), _bwd_configs(D, q.dtype, dev, mk.heavy), run)
    return dq, dk, dv, dbias, dtoep


def _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, dbias, dtoep, scale, mk: _Masks, block_map, map_bm, map_bn,
                cfg, has_dbias, has_dtoep):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    G = H // Hk
    BD = block_d(D)
    (BM1, BN1, w1, st1), (BM2, BN2, w2, st2) = cfg
    BM1, BN1 = _shrink(BM1, Lq), _shrink(BN1, Lk)
    BM2, BN2 = _shrink(BM2, Lq), _shrink(BN2, Lk)
    if BN1 <= 32:  # tiny tiles (short sequences): fewer warps
        w1 = min(w1, 4)
    if BM2 <= 32:
        w2 = min(w2, 4)
    prec = C.precision(q.dtype, q.device)
    flags = mk.flags()
    common_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                      v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))

    def lists_for(bm, bn, transpose):
        if block_map is None:
            return (lse, lse, lse, lse), 0, 0, 0
        ls = _tile_lists(block_map, map_bm, map_bn, bm, bn, Lq, Lk, transpose)
        cnt = ls[0]
        return ls, (cnt.stride(0) if cnt.shape[0] > 1 else 0), (cnt.stride(1) if cnt.shape[1] > 1 else 0), \
            ls[1].shape[-1]

    # dK / dV: one program per (key tile, b, kv head, group split).
    num_n = triton.cdiv(Lk, BN1)
    base_programs = num_n * B * Hk
    if _FORCE_GROUP_SPLITS is not None:
        ns = _FORCE_GROUP_SPLITS
    elif G > 1 and base_programs < C.num_sms(q.device):
        ns = min(G, triton.cdiv(2 * C.num_sms(q.device), base_programs))
    else:
        ns = 1
    while G % ns:
        ns -= 1
    if ns > 1:
        dk_buf = torch.empty((B, Hk, ns, Lk, D), dtype=torch.float32, device=q.device)
        dv_buf = torch.empty((B, Hk, ns, Lk, D), dtype=torch.float32, device=q.device)
        dk_str = (dk_buf.stride(0), dk_buf.stride(1), dk_buf.stride(2), dk_buf.stride(3))
        dv_str = (dv_buf.stride(0), dv_buf.stride(1), dv_buf.stride(2), dv_buf.stride(3))
    else:
        dk_buf, dv_buf = dk, dv
        dk_str = (dk.stride(0), dk.stride(1), 0, dk.stride(2))
        dv_str = (dv.stride(0), dv.stride(1), 0, dv.stride(2))
    ls1, s_lb1, s_lh1, n_list1 = lists_for(BM1, BN1, True)
    _attn_bwd_dkdv_kernel[(base_programs * ns,)](
        q, k, v, dout, lse, delta, dk_buf, dv_buf, *mk.tensors(), *ls1,
        scale * LOG2E, scale, mk.seed, mk.threshold, mk.rdrop,
        *common_strides, *dk_str, *dv_str, *mk.strides(),
        s_lb1, s_lh1, n_list1,
        H, Hk, G, G // ns, ns, Lq, Lk, D, mk.wl, mk.wr,
        **flags, SPARSE=block_map is not None, BLOCK_M=BM1, BLOCK_N=BN1, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device), num_warps=w1, num_stages=st1,
    )
    if ns > 1:
        dk.copy_(dk_buf.sum(2))
        dv.copy_(dv_buf.sum(2))

    # dQ (and dS for the bias / Toeplitz gradients): one program per (query tile, b, h).
    ls2, s_lb2, s_lh2, n_list2 = lists_for(BM2, BN2, False)
    _attn_bwd_dq_kernel[(triton.cdiv(Lq, BM2) * B * H,)](
        q, k, v, dout, lse, delta, dq, dbias if has_dbias else lse, dtoep if has_dtoep else lse,
        *mk.tensors(), *ls2,
        scale * LOG2E, scale, mk.seed, mk.threshold, mk.rdrop,
        *common_strides, dq.stride(0), dq.stride(1), dq.stride(2), (dtoep.stride(0) if has_dtoep else 0),
        *mk.strides(),
        s_lb2, s_lh2, n_list2,
        H, G, Lq, Lk, D, mk.wl, mk.wr,
        **flags, HAS_DBIAS=bool(has_dbias), HAS_DTOEP=bool(has_dtoep),
        SPARSE=block_map is not None, BLOCK_M=BM2, BLOCK_N=BN2, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device), num_warps=w2, num_stages=st2,
    )
