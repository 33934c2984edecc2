"""Attention launchers: argument checks and packing, config fallback, key splits (decoding), GQA group splits."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from .. import _common as C
from .._common import LOG2E, SUPPORTED_DTYPES, block_d
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _bwd_preprocess_kernel
from .block_map import _map_usable, _tile_lists
from .configs import _bwd_configs, _fwd_configs, _shrink
from .forward import _attn_combine_kernel, _attn_fwd_kernel, _dropout_mask_kernel
from .masks import MaskArgs, ScoreTensor, Segments, Toeplitz
from ...kernel_params import AttentionParams, Visibility

# Test hooks (not API): force the number of key splits of the forward / of GQA group splits of dK/dV; force
# the TMA loads (forward and backward) on (where the operands allow them; the interpreter runs them) or off.
_FORCE_SPLITS: Optional[int] = None
_FORCE_GROUP_SPLITS: Optional[int] = None
_FORCE_TMA: Optional[bool] = None

# per (direction, block_d, dtype, device, heavy): the index of the first config that fitted the device
_FALLBACK: dict = {}

# Decoding under GQA packs the G query heads of a kv head into one program's rows while G * Lq fits this.
_PACK_ROWS = 64


# --------------------------------------------------------------------------------------- argument packing
class TileLists(NamedTuple):
    """A block map as per-row tile lists (see block_map._tile_lists), int32, broadcast B/H dims of size 1."""
    cnt_partial: Tensor
    idx_partial: Tensor
    cnt_full: Tensor
    idx_full: Tensor
    s_b: int
    s_h: int
    n: int


def _rows(t: Tensor) -> tuple:
    """A [B, H, L, D] operand as a kernel argument: (ptr, stride_b, stride_h, stride_l)."""
    return (t, t.stride(0), t.stride(1), t.stride(2))


class _Masks:
    """The mask parts and dropout of one call (an AttentionParams) as kernel arguments: `args` (masks.MaskArgs,
    None for absent parts), `drop` ((seed, threshold, scale) of _common.dropout_keep, or None), and the block map
    when the kernels can use it (`tile_lists`)."""

    def __init__(self, p: AttentionParams, B: int, H: int, Lq: int, Lk: int):
        vis = p.vis
        self.causal = bool(vis.causal)
        self.args = MaskArgs(
            key_lengths=_lengths(vis.key_lengths, Lk),
            prefix_lengths=_lengths(vis.prefix_lengths, Lk) if self.causal else None,
            window=_window(vis, Lq, Lk), segments=_segments(vis),
            dense=_score_tensor(vis.dense_mask, B, H, Lq, Lk, as_bytes=True),
            bias=_score_tensor(p.bias.dense, B, H, Lq, Lk), toeplitz=_toeplitz(p.bias.toeplitz))
        d = p.dropout
        self.drop = (C.dropout_seed(d.seed_value), C.dropout_threshold(d.p), 1.0 / (1.0 - d.p) if d.p < 1.0 else 0.0) \
            if d.p > 0.0 else None
        # The block map only helps the element-wise parts (the analytic ones have closed-form tile ranges).
        usable = self.elementwise and _map_usable(vis.block_map, B, H, Lq, Lk, vis.block_m, vis.block_n)
        self._map = (vis.block_map, vis.block_m, vis.block_n) if usable else None

    @property
    def elementwise(self) -> bool:
        return self.args.segments is not None or self.args.dense is not None

    @property
    def heavy(self) -> bool:
        a = self.args
        return a.bias is not None or a.toeplitz is not None or a.dense is not None or self.drop is not None

    def flags(self) -> dict:
        return dict(CAUSAL=self.causal, ELEMWISE=self.elementwise)

    def tile_lists(self, bm: int, bn: int, Lq: int, Lk: int, transpose: bool) -> Optional[TileLists]:
        """The block map's tile lists at tile (bm, bn) (transposed: per key tile), or None without a usable map."""
        if self._map is None:
            return None
        block_map, map_bm, map_bn = self._map
        cnt_p, idx_p, cnt_f, idx_f = _tile_lists(block_map, map_bm, map_bn, bm, bn, Lq, Lk, transpose)
        return TileLists(cnt_p, idx_p, cnt_f, idx_f, cnt_p.stride(0) if cnt_p.shape[0] > 1 else 0,
                         cnt_p.stride(1) if cnt_p.shape[1] > 1 else 0, idx_p.shape[-1])


def _lengths(lengths: Optional[Tensor], Lk: int) -> Optional[Tensor]:
    """Key / prefix lengths as the kernels read them: int32 [B], clamped to [0, Lk]."""
    return None if lengths is None else lengths.clamp(0, Lk).to(torch.int32).contiguous()


def _window(vis: Visibility, Lq: int, Lk: int) -> Optional[tuple]:
    """(left, right) of masks.MaskArgs.window, or None when neither side bounds anything."""
    wl = int(vis.window_left) if vis.window_left is not None else -1
    wr = int(vis.window_right) if vis.window_right is not None else -1
    # A bound that no (query, key) pair can exceed is no bound (also keeps the index math in int32):
    # i + Lk - Lq - j <= Lk - 1 and j - (i + Lk - Lq) <= Lq - 1 always; Lq + Lk stands for "unbounded".
    has_wl = 0 <= wl < Lk - 1
    has_wr = 0 <= wr < Lq - 1
    return (wl if has_wl else Lq + Lk, wr if has_wr else Lq + Lk) if has_wl or has_wr else None


def _segments(vis: Visibility) -> Optional[Segments]:
    q, k = vis.q_segments, vis.k_segments
    if q is None or k is None:
        return None
    return Segments(q, k, q.stride(0), q.stride(1), k.stride(0), k.stride(1))


def _score_tensor(t: Optional[Tensor], B, H, Lq, Lk, as_bytes: bool = False) -> Optional[ScoreTensor]:
    """A per-score tensor (additive bias; the dense mask as_bytes: uint8, nonzero = visible) expanded to
    [B, H, Lq, Lk] (stride 0 on broadcast dims, no copy)."""
    if t is None:
        return None
    t = t.expand(B, H, Lq, Lk)
    if as_bytes:
        t = t.view(torch.uint8) if t.dtype == torch.bool else (t != 0).view(torch.uint8)
    return ScoreTensor(t, *t.stride())


def _toeplitz(table: Optional[Tensor]) -> Optional[Toeplitz]:
    if table is None:
        return None
    table = table.to(torch.float32).contiguous()
    return Toeplitz(table, table.stride(0))


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
def attention_fwd(q, k, v, p: AttentionParams):
    """-> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)."""
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    mk = _Masks(p, B, H, Lq, Lk)
    tma = _tma_usable(q, k, v)
    cfgs = _fwd_configs(D, q.dtype, q.device, mk.heavy, tma)

    def run(cfg):
        BM, BN, warps, stages = cfg
        BM, BN = _shrink(BM, Lq), _shrink(BN, Lk)
        if BM <= 32:  # decoding-sized query tiles: fewer warps
            warps = min(warps, 4)
        return _fwd_launch(q, k, v, out, lse, float(p.scale), mk, BM, BN, warps, stages, tma)

    C.first_that_fits(_FALLBACK, ("fwd", block_d(D), q.dtype, str(q.device), mk.heavy, tma), cfgs, run)
    return out, lse


def _fwd_launch(q, k, v, out, lse, scale, mk: _Masks, BM, BN, warps, stages, tma):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    BD = block_d(D)
    lists = mk.tile_lists(BM, BN, Lq, Lk, transpose=False)
    pack = _packs_group(H // Hk, Lq, lists)
    if pack:  # one program per (b, kv head): its G query heads' rows share each K / V tile
        BM, warps = max(16, triton.next_power_of_2(H // Hk * Lq)), min(warps, 4)
        programs = B * Hk
    else:  # one program per (query tile, b, h)
        programs = triton.cdiv(Lq, BM) * B * H

    # Split the keys across programs when the query tiles alone cannot fill the device (decoding).
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
        o_arg = (o_buf, o_buf.stride(1), o_buf.stride(2), o_buf.stride(3), o_buf.stride(0))
        l_arg = (l_buf, l_buf.stride(0))
    else:
        o_buf, l_buf = out, lse
        o_arg = (out, out.stride(0), out.stride(1), out.stride(2), 0)
        l_arg = (lse, 0)

    _attn_fwd_kernel[(programs, n_split)](
        _rows(q), _rows(k), _rows(v), o_arg, l_arg, mk.args, lists, mk.drop,
        _tma_descriptors(q, k, v, BM, BN, BD) if tma else None, scale * LOG2E,
        H, H // Hk, Lq, Lk, D, n_split, **mk.flags(), SPLIT=split, PACK_GROUP=pack,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, EVEN_D=(D == BD), PREC=C.precision(q.dtype, q.device),
        UPCAST=C.upcast(q.dtype, q.device), SCALE_POS=scale > 0,
        ONE_DIAGONAL=not (split or pack) and lists is None and _one_diagonal(mk, q.dtype, BM, BN, Lq, Lk),
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


def _one_diagonal(mk: _Masks, dtype: torch.dtype, BM: int, BN: int, Lq: int, Lk: int) -> bool:
    """Whether the analytic mask leaves every query tile exactly one masked key tile, its diagonal: causal alone
    (no prefix, key lengths, window or element-wise part) with square tiles and a diagonal that starts on a key
    tile boundary (Lk - Lq a non-negative multiple of BN). The first key that not every row of query tile m0
    sees, m0 + Lk - Lq + 1, and its last visible key, m0 + BM - 1 + Lk - Lq (or Lk - 1), then lie in the one key
    tile that starts at m0 + Lk - Lq. 16-bit inputs only: the straight-line tile takes registers from float32's
    tf32x3 dots on sm_90 (16 x 16 tiles at D = 128: 189 -> 255 registers, 52 B spilled; with its loop: none)."""
    a = mk.args
    return (dtype != torch.float32 and mk.causal and not mk.elementwise and a.prefix_lengths is None
            and a.key_lengths is None and a.window is None and BM == BN and Lk >= Lq and (Lk - Lq) % BN == 0)


def backward_delta(out: Tensor, dout: Tensor) -> Tensor:
    """delta = rowsum(dO * O), float32 [B, H, L], of [B, H, L, D] out / dout (any strides): the backward's
    preprocess, one pass over both (relative attention's backward takes it too)."""
    B, H, L, D = out.shape
    delta = torch.empty((B, H, L), dtype=torch.float32, device=out.device)
    if delta.numel() == 0 or D == 0:
        return delta.zero_()
    out = out if out.stride(-1) == 1 else out.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    BD, BMP = block_d(D), _shrink(64, L)
    _bwd_preprocess_kernel[(triton.cdiv(L, BMP) * B * H,)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), H, L, D,
        BLOCK_M=BMP, BLOCK_D=BD, EVEN_D=(D == BD), num_warps=4,
    )
    return delta


def _tma_usable(*operands: Tensor) -> bool:
    """Whether a kernel loads its [B, H, L, D] operands (forward: q, k, v; backward: q, k, v, dout) through TMA
    descriptors: on Hopper for 16-bit operands and head dims up to 128 (the configs compiled for sm_90 with
    TMA) when the installed Triton has host tensor descriptors and TMA can read every operand; else pointer
    loads (the interpreter unless _FORCE_TMA, older Triton, other GPUs, float32, D > 128)."""
    q = operands[0]
    use = _FORCE_TMA if _FORCE_TMA is not None else (
        not C.interpreted(q.device) and C.capability(q.device)[0] >= 9 and q.dtype != torch.float32
        and q.shape[-1] <= 128)
    return bool(use) and C.TensorDescriptor is not None and all(C.tma_strides(t) is not None for t in operands)


def _tma_descriptors(q, k, v, BM: int, BN: int, BD: int, dout: Optional[Tensor] = None) -> tuple:
    """TMA descriptors (q, k, v) or, with dout, (q, k, v, dout): [B, H, L, D] with boxes of BM (q, dout) / BN
    (k, v) rows of one (b, h) and BD columns; rows past L and columns past D read as zeros."""
    boxes = ((q, BM), (k, BN), (v, BN)) + (((dout, BM),) if dout is not None else ())
    return tuple(C.tma_rows(t, rows, BD) for t, rows in boxes)


def _packs_group(G: int, Lq: int, lists) -> bool:
    """Whether the forward packs the G query heads of each kv head into one program (decoding under GQA): all
    G * Lq rows in one tile, and no block map (its tile lists are per query head)."""
    return G > 1 and G * Lq <= _PACK_ROWS and lists is None


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
def attention_bwd(dout, q, k, v, out, lse, p: AttentionParams):
    """-> (dq, dk, dv, dbias, dtoeplitz); see reference_kernels.attention_bwd."""
    _check(q, k, v)
    q, k, v, dout, out = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(dout), _unit_last(out)
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    dev = q.device
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=dev)
    dk = torch.empty((B, Hk, Lk, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hk, Lk, D), dtype=v.dtype, device=dev)
    want_dbias, want_dtoep = p.bias.dense_requires_grad, p.bias.toeplitz_requires_grad
    dbias = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=dev) if want_dbias else q.new_empty(0)
    dtoep = torch.zeros((H, Lq + Lk - 1), dtype=torch.float32, device=dev) if want_dtoep else q.new_empty(0)
    if B * H == 0 or Lq == 0 or Lk == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dbias, dtoep
    lse = lse.to(torch.float32).contiguous()
    mk = _Masks(p, B, H, Lq, Lk)
    BD = block_d(D)

    delta = backward_delta(out, dout)

    # where the dQ kernel writes dS: the dbias buffer, the dtoeplitz table (ptr, stride_h); None when not wanted
    ds_out = (dbias if want_dbias else None, (dtoep, dtoep.stride(0)) if want_dtoep else None)

    tma = _tma_usable(q, k, v, dout)

    def run(cfg):
        if want_dtoep:
            dtoep.zero_()  # a retried config starts over (the dQ kernel accumulates into it)
        _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, ds_out, float(p.scale), mk, cfg, tma)

    C.first_that_fits(_FALLBACK, ("bwd", BD, q.dtype, str(dev), mk.heavy, tma), _bwd_configs(D, q.dtype, dev, mk.heavy),
                      run)
    return dq, dk, dv, dbias, dtoep


def _bwd_launch(dout, q, k, v, lse, delta, dq, dk, dv, ds_out, scale, mk: _Masks, cfg, tma: bool):
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
    Q, K, V, DO = _rows(q), _rows(k), _rows(v), _rows(dout)
    dbias, dtoep = ds_out

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
        dk_arg = (dk_buf, *dk_buf.stride()[:4])
        dv_arg = (dv_buf, *dv_buf.stride()[:4])
    else:
        dk_buf, dv_buf = dk, dv
        dk_arg = (dk, dk.stride(0), dk.stride(1), 0, dk.stride(2))
        dv_arg = (dv, dv.stride(0), dv.stride(1), 0, dv.stride(2))
    _attn_bwd_dkdv_kernel[(base_programs * ns,)](
        Q, K, V, DO, lse, delta, dk_arg, dv_arg, mk.args,
        mk.tile_lists(BM1, BN1, Lq, Lk, transpose=True), mk.drop,
        _tma_descriptors(q, k, v, BM1, BN1, BD, dout) if tma else None, scale * LOG2E, scale,
        H, Hk, G, G // ns, ns, Lq, Lk, D, **flags, BLOCK_M=BM1, BLOCK_N=BN1, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device),
        num_warps=w1, num_stages=st1,
    )
    if ns > 1:
        dk.copy_(dk_buf.sum(2))
        dv.copy_(dv_buf.sum(2))

    # dQ (and dS for the bias / Toeplitz gradients): one program per (query tile, b, h).
    _attn_bwd_dq_kernel[(triton.cdiv(Lq, BM2) * B * H,)](
        Q, K, V, DO, lse, delta, _rows(dq), dbias, dtoep, mk.args,
        mk.tile_lists(BM2, BN2, Lq, Lk, transpose=False), mk.drop,
        _tma_descriptors(q, k, v, BM2, BN2, BD, dout) if tma else None, scale * LOG2E, scale, H, G, Lq, Lk, D,
        **flags, BLOCK_M=BM2, BLOCK_N=BN2, BLOCK_D=BD, EVEN_D=(D == BD),
        PREC=prec, UPCAST=C.upcast(q.dtype, q.device), num_warps=w2, num_stages=st2,
    )
