"""Relative-position attention benchmarks (Transformer-XL, XLNet): `ptm_kernels.relative_attention` and
`ptm_kernels.two_stream_attention` on their default backend (`backend.select`, recorded in extra_info) against
the eager einsum + rel-shift code a user would otherwise run.

- relative_attention, "txl L=.. mem=..": Transformer-XL's causal attention over memory + segment, B = 2, H = 8,
  D = 64: L = 512 after a memory of 512 (Lk = 1024), and L = 2048 after 2048 (GPU only). "ptm":
  relative_attention(mask=causal()); "eager": RelPartialLearnableMultiHeadAttn's core (AC = einsum of q + u and
  k, BD = einsum of q + v and r, the padded `_rel_shift`, -inf mask, softmax, @ v) as transcribed in
  tests/ops/test_relative_attention.py (txl_attention).
- two_stream_attention, "xlnet L=512 predict 85": XLNet-base pre-training, B = 2 (1 on CPU), H = 12, D = 64,
  L = 512 with no memory (transformers' XLNetLMHeadModel with mem_len=None, as benchmarks/test_models_relative.py),
  the bidirectional r (R = 2L rows), a permutation LM predicting the last 1/6 of a random factorisation order (85
  positions: models/xlnet.py's permutation_lm_inputs, XLNet's _local_perm) given as dense masks, and the segment
  term (two segments, s_bias, seg_embed). "ptm": one two_stream_attention call, the 85 query-stream rows at
  query_positions (XLNet's target_mapping); "two-calls": relative_attention for the content stream, then for
  the query stream, which relative_attention can only run on all L rows (q_g scattered to its positions and the
  85 rows gathered back, as transformers' target_mapping einsums do); "eager": transformers' rel_attn_core for
  both streams (einsum + rel_shift_bnij, seg_mat, target_mapping einsums), tests/ops/test_relative_attention.py's
  xlnet_reference (which also builds the small [L, L, B, 2] seg_mat that transformers builds once per forward).
- two_stream_attention, "xlnet L=512 all rows": the same with the query stream on all L rows (no
  target_mapping), so "ptm" vs "two-calls" is the fused launch against two launches of the same work. Its
  eager baseline (GPU only) costs what the predict-85 case's does: eager runs the query stream on all L rows in
  both.

Each test checks ptm's (and two-calls') output against the eager transcription run in float32 on the same
values before timing. On GPU the peak memory of the timed calls is in extra_info (peak_mem_mb). TFLOP/s count the
visible (i, j) pairs only: 6 * D per pair forward (q·k, q·r, p·v), 3.5x that for forward + backward (as
test_attention counts). A 2-core CPU runs float32, plus bfloat16 for the Transformer-XL L = 512 forward only,
and XLNet at B = 1 (the file stays under a minute there).
"""

from __future__ import annotations

import math

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import AttentionMask, backend
from tests.ops.test_relative_attention import txl_attention, txl_mask, xlnet_reference

from .common import DEVICE, GPU, check_close, fwd_bwd, measure

from ptm_kernels.models import xlnet  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16]
TXL_B, TXL_H, D = 2, 8, 64
TXL_LENGTHS = [512, 2048]  # memory = L
XL_B, XL_H, XL_L, XL_K = (2 if GPU else 1), 12, 512, 6  # predict L // K = 85 positions
ROUNDS = 20 if GPU else 3


def _dt(dtype):
    return str(dtype)[6:]


def _leaf(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype).requires_grad_(True)


_CPU_BF16 = "bfloat16 on a 2-core CPU: the Transformer-XL L=512 forward only, to keep the file short"


def _check(impl, fn, eager, inputs, dtype, name):
    """ptm's output against the eager transcription in float32 on the same values (eager is the baseline)."""
    if impl == "eager":
        return
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        check_close(fn(*inputs), eager(*[None if t is None else t.float() for t in inputs]), name, rtol=tol,
                    atol=tol)


def _time(benchmark, fn, inputs, grads, *, group, case, impl, passes, flops):
    if passes == "fwd":
        with torch.no_grad():
            measure(benchmark, lambda: fn(*inputs), group=group, case=case, impl=impl, passes=passes, flops=flops,
                    rounds=ROUNDS, peak_memory=True)
    else:
        measure(benchmark, fwd_bwd(lambda: fn(*inputs), inputs, grads), group=group, case=case, impl=impl,
                passes=passes, flops=flops * 3.5, rounds=ROUNDS, peak_memory=True)
    if impl != "eager":
        benchmark.extra_info["backend"] = backend.select("relative_attention", DEVICE)


@pytest.mark.parametrize("L", TXL_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ptm", "eager"])
def test_transformer_xl(benchmark, L, dtype, passes, impl):
    if not GPU and L > 512:
        pytest.skip("L=2048 + memory 2048 on GPU only: eager materialises several [L, Lk, B, H] = 512 MiB "
                    "float32 score tensors, seconds per call on a 2-core CPU")
    if not GPU and dtype != torch.float32 and passes != "fwd":
        pytest.skip(_CPU_BF16)
    B, M = TXL_B, L
    Lk = M + L
    torch.manual_seed(0)
    q = _leaf(B, TXL_H, L, D, dtype=dtype)
    k, v = (_leaf(B, TXL_H, Lk, D, dtype=dtype) for _ in range(2))
    r = _leaf(TXL_H, Lk, D, dtype=dtype)  # r_head_k: distances Lk - 1 ... 0
    u, vb = (_leaf(TXL_H, D, dtype=dtype, scale=0.5) for _ in range(2))
    inputs = [q, k, v, r, u, vb]
    masked = txl_mask(L, M, same_length=False, mem_len=M)  # dec_attn_mask [L, Lk], True = masked
    scale = 1 / math.sqrt(D)
    causal = AttentionMask.causal()  # bottom-right aligned: key j visible iff j <= i + M

    def ours(q, k, v, r, u, vb):
        return pk.relative_attention(q, k, v, r, u, vb, mask=causal, scale=scale)

    def eager(q, k, v, r, u, vb):
        return txl_attention(q, k, v, r, u, vb, masked, scale)

    fn = eager if impl == "eager" else ours
    case = f"txl L={L} mem={M} B={B} {_dt(dtype)}"
    _check(impl, fn, eager, inputs, dtype, f"relative_attention {case}")
    flops = 6 * D * TXL_H * B * int((~masked).sum())
    grads = [torch.randn(B, TXL_H, L, D, device=DEVICE, dtype=dtype)]
    _time(benchmark, fn, inputs, grads, group="relative_attention", case=case, impl=impl, passes=passes,
          flops=flops)


def _xlnet_masks(B, L, all_rows):
    """(content visibility [B, L, L], query-stream positions [B, P] or None, query visibility [B, P|L, L],
    perm_mask bool [B, L, L] (True: may not see), target_mapping [B, P, L] or None)."""
    g = torch.Generator().manual_seed(0)
    batch = xlnet.permutation_lm_inputs(torch.zeros(B, L, dtype=torch.long), K=XL_K, generator=g)
    perm = batch["perm_mask"].bool().to(DEVICE)
    eye = torch.eye(L, dtype=torch.bool, device=DEVICE)
    vis_h = ~(perm & ~eye)  # transformers' non_tgt_mask: the content stream sees itself
    if all_rows:
        return vis_h, None, ~perm, perm, None
    tmap = batch["target_mapping"].to(DEVICE)
    pos = tmap.argmax(-1)  # [B, P]
    vis_g = (~perm).gather(1, pos[..., None].expand(-1, -1, L))
    return vis_h, pos, vis_g, perm, tmap


@pytest.mark.parametrize("rows", ["predict", "all-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ptm", "two-calls", "eager"])
def test_xlnet_two_stream(benchmark, rows, dtype, passes, impl):
    if not GPU and dtype != torch.float32:
        pytest.skip(_CPU_BF16)
    all_rows = rows == "all-rows"
    if all_rows and impl == "eager" and not GPU:
        pytest.skip("eager runs the query stream on all L rows in both cases: the predict case's eager time "
                    "applies; skipped on CPU to keep the file short")
    B, H, L = XL_B, XL_H, XL_L
    vis_h, pos, vis_g, perm, tmap = _xlnet_masks(B, L, all_rows)
    P = L if all_rows else pos.shape[1]
    torch.manual_seed(0)
    q = _leaf(B, H, L, D, dtype=dtype)
    qg = _leaf(B, H, P, D, dtype=dtype)
    k, v = (_leaf(B, H, L, D, dtype=dtype) for _ in range(2))
    r = _leaf(H, 2 * L, D, dtype=dtype)  # attn_type "bi": distances L ... -L + 1
    u, vb, sb = (_leaf(H, D, dtype=dtype, scale=0.5) for _ in range(3))
    se = _leaf(2, H, D, dtype=dtype, scale=0.5)
    inputs = [q, qg, k, v, r, u, vb, sb, se]
    seg_ids = (torch.arange(L, device=DEVICE) >= L // 2).long().expand(B, L)  # segments A, B
    scale = 1 / math.sqrt(D)
    content_mask, query_mask = AttentionMask.dense(vis_h[:, None]), AttentionMask.dense(vis_g[:, None])
    full_query_mask = AttentionMask.dense((~perm)[:, None])
    # transformers' layouts: float masks [i, j, b, 1] (1 = masked), target_mapping [P, L, B]; per dtype
    eager_masks = {dt: ((~vis_h).permute(1, 2, 0)[..., None].to(dt), perm.permute(1, 2, 0)[..., None].to(dt),
                        None if tmap is None else tmap.permute(1, 2, 0).to(dt))
                   for dt in {dtype, torch.float32}}
    idx = None if all_rows else pos[:, None, :, None].expand(B, H, P, D)

    def ours(q, qg, k, v, r, u, vb, sb, se):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=pos, scale=scale,
                                       content_mask=content_mask, query_mask=query_mask, segment_ids=seg_ids,
                                       seg_embed=se, s_bias=sb)

    def two_calls(q, qg, k, v, r, u, vb, sb, se):
        kw = dict(scale=scale, segment_ids=seg_ids, seg_embed=se, s_bias=sb)
        h = pk.relative_attention(q, k, v, r, u, vb, mask=content_mask, **kw)
        if all_rows:
            return h, pk.relative_attention(qg, k, v, r, u, vb, mask=query_mask, **kw)
        qg_rows = q.new_zeros(B, H, L, D).scatter(2, idx, qg)
        g = pk.relative_attention(qg_rows, k, v, r, u, vb, mask=full_query_mask, **kw)
        return h, g.gather(2, idx)

    def eager(q, qg, k, v, r, u, vb, sb, se):
        mask_h, mask_g, tm = eager_masks[q.dtype]
        return xlnet_reference(q, qg, k, v, r, u, vb, sb, se, seg_ids, 0, mask_h, mask_g, tm, scale)

    fn = {"ptm": ours, "two-calls": two_calls, "eager": eager}[impl]
    case = f"xlnet L={L} {'all rows' if all_rows else f'predict {P}'} B={B} {_dt(dtype)}"
    _check(impl, fn, eager, inputs, dtype, f"two_stream_attention {case}")
    flops = 6 * D * H * int(vis_h.sum() + vis_g.sum())
    grads = [torch.randn(B, H, L, D, device=DEVICE, dtype=dtype), torch.randn(B, H, P, D, device=DEVICE, dtype=dtype)]
    _time(benchmark, fn, inputs, grads, group="two_stream_attention", case=case, impl=impl, passes=passes,
          flops=flops)
