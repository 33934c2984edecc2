"""Attention benchmarks: ptm-kernels' fused attention against what users would otherwise run.

Baselines: SDPA given the structured mask as the dense tensor a user would build ("sdpa", or
`is_causal=True` where SDPA can express it: "sdpa-causal"), eager math ("eager": softmax(QK^T + mask) V),
and FlexAttention compiled with the equivalent BlockMask ("flex", GPU only). Each test validates the output
against eager math before timing. TFLOP/s count only the visible (i, j) entries: 4 * D per entry forward,
2.5x that for forward+backward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import AttentionMask

from .common import DEVICE, GPU, check_close, fwd_bwd, measure

DTYPE = torch.bfloat16 if GPU else torch.float32
HEADS, HEAD_DIM = (16, 128) if GPU else (8, 64)
LENGTHS = [1024, 4096, 8192] if GPU else [256, 1024]
BATCH = 2 if GPU else 1


def _mask_case(name: str, B: int, L: int):
    """(AttentionMask, dense bool mask [B|1, 1, L, L] as a user would pass it to SDPA, additive bias or None)."""
    i = torch.arange(L, device=DEVICE)[:, None]
    j = torch.arange(L, device=DEVICE)[None, :]
    if name == "none":
        return AttentionMask(), None, None
    if name == "causal":
        return AttentionMask.causal(), (j <= i)[None, None], None
    if name == "padding20":
        lengths = torch.full((B,), int(L * 0.8), device=DEVICE)
        return AttentionMask.key_padding(lengths=lengths), (j < lengths.view(B, 1, 1))[:, None].expand(B, 1, L, L), None
    if name == "prefix_lm":
        lengths = torch.full((B,), L // 2, device=DEVICE)
        dense = (j <= i) | (j < lengths.view(B, 1, 1))
        return AttentionMask.prefix_lm(lengths), dense[:, None], None
    if name == "window256":
        return (AttentionMask.causal() & AttentionMask.sliding_window(255, 0),
                ((j <= i) & (i - j <= 255))[None, None], None)
    if name == "docs4":
        ids = (torch.arange(L, device=DEVICE) * 4 // L).expand(B, L)
        return AttentionMask.segments(ids), (ids[:, :, None] == ids[:, None, :])[:, None], None
    if name == "permutation":
        # XLNet: a random factorisation order; token i sees j iff j comes earlier in the order.
        order = torch.randperm(L, device=DEVICE)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(L, device=DEVICE)
        dense = (rank[None, :] < rank[:, None])[None, None] | torch.eye(L, dtype=torch.bool, device=DEVICE)
        return AttentionMask.dense(dense), dense, None
    if name == "t5_bias":
        table = torch.randn(HEADS, 2 * L - 1, device=DEVICE, dtype=torch.float32)
        bias = table[:, (i - j + L - 1)]  # [H, L, L]
        return AttentionMask.toeplitz(table), None, bias[None].to(DTYPE)
    raise ValueError(name)


MASKS = ["none", "causal", "padding20", "prefix_lm", "window256", "docs4", "permutation", "t5_bias"]


def _visible(dense, bias, B, L):
    if dense is None:
        return B * HEADS * L * L
    return int(dense.expand(B, HEADS, L, L).sum())


def _impls(mask_name):
    out = ["ptm", "sdpa", "eager"]
    if mask_name == "causal":
        out.append("sdpa-causal")
    if GPU:
        out.append("flex")
    return out


def _flex(mask_name, q, k, v, amask, dense, bias, L):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if bias is not None:
        def score_mod(s, b, h, qi, kj):
            return s + bias[0, h, qi, kj]
        block_mask = None
    else:
        score_mod = None
        d = dense

        def mask_mod(b, h, qi, kj):
            return d[b if d.shape[0] > 1 else 0, 0, qi, kj]
        block_mask = None if dense is None else create_block_mask(mask_mod, dense.shape[0], None, L, L)
    compiled = torch.compile(flex_attention)
    return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ptm", "sdpa", "sdpa-causal", "eager", "flex"])
def test_attention(benchmark, L, mask_name, passes, impl):
    if impl not in _impls(mask_name):
        pytest.skip(f"{impl} does not apply to {mask_name} on {DEVICE.type}")
    if impl == "eager" and L > 4096:
        pytest.skip("eager math would materialise [B, H, L, L] scores: skipped past 4k")
    B = BATCH
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    amask, dense, bias = _mask_case(mask_name, B, L)
    sdpa_mask = dense if dense is not None else bias

    def eager():
        s = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        if bias is not None:
            s = s + bias
        if dense is not None:
            s = s.masked_fill(~dense, float("-inf"))
        return torch.softmax(s.float(), -1).to(q.dtype) @ v

    fns = {
        "ptm": lambda: pk.attention(q, k, v, amask),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
        "sdpa-causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "eager": eager,
    }
    fn = _flex(mask_name, q, k, v, amask, dense, bias, L) if impl == "flex" else fns[impl]
    if L <= 2048:
        tol = 2e-2 if DTYPE != torch.float32 else 1e-4
        check_close(fn(), eager(), f"attention {mask_name} {impl}", rtol=tol, atol=tol)
    visible = _visible(dense, bias, B, L)
    flops = 4 * HEAD_DIM * visible * (1 if passes == "fwd" else 3.5)
    case = f"L={L} {mask_name}"
    if passes == "fwd":
        with torch.no_grad():
            measure(benchmark, fn, group="attention", case=case, impl=impl, passes=passes, flops=flops,
                    rounds=20 if GPU else 5)
    else:
        grads = [torch.randn(B, HEADS, L, HEAD_DIM, device=DEVICE, dtype=DTYPE)]
        measure(benchmark, fwd_bwd(fn, [q, k, v], grads), group="attention", case=case, impl=impl, passes=passes,
                flops=flops, rounds=20 if GPU else 3)


# ------------------------------------------------------------------------------- decode (one query row, GQA)
# One new token against a KV cache: q [B, H, 1, D], k/v [B, Hk, Lk, D] with H / Hk query heads per kv head
# (LLaMA-2-70B-like 32 / 8 at D 128; the 8 / 4 of the hf-llama benchmark's model at D 64; GQA 8:1, LLaMA-70B's
# ratio, where the Triton forward packs a kv head's 8 query heads into one program). ptm: the fused kernel
# (causal, bottom-right: every cached key visible); "sdpa-gqa": torch's SDPA with enable_gqa=True (no mask needed).
DECODE_CASES = [(1, 8, 4, 96, 64), (16, 8, 4, 96, 64), (1, 32, 8, 1024, 128), (16, 32, 8, 1024, 128),
                (1, 16, 2, 1024, 128)] + ([(4, 64, 8, 16384, 128)] if GPU else [])


@pytest.mark.parametrize("shape", DECODE_CASES, ids=[f"b{b}-h{h}/{hk}-k{lk}-d{d}" for b, h, hk, lk, d in DECODE_CASES])
@pytest.mark.parametrize("impl", ["ptm", "sdpa-gqa"])
def test_decode_attention(benchmark, shape, impl):
    B, H, Hk, Lk, D = shape
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, D, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(B, Hk, Lk, D, device=DEVICE, dtype=DTYPE) for _ in range(2))
    mask = AttentionMask.causal()
    fns = {"ptm": lambda: pk.attention(q, k, v, mask),
           "sdpa-gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    with torch.no_grad():
        tol = 2e-2 if DTYPE != torch.float32 else 1e-4
        check_close(fns[impl](), fns["sdpa-gqa"](), f"decode attention {impl}", rtol=tol, atol=tol)
        measure(benchmark, fns[impl], group="attention", case=f"decode B={B} H={H}/{Hk} Lk={Lk} D={D}", impl=impl,
                passes="fwd", flops=4 * D * B * H * Lk, bytes_moved=2 * B * Hk * Lk * D * k.element_size(),
                rounds=50 if GPU else 30)
