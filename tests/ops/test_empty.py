"""Empty tensors: a batch of 0, 0 rows, a size-0 last dimension, Lq = 0 or Lk = 0 give empty (or zero)
results and gradients of the inputs' shapes, exactly as torch's functions do, on every backend."""

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import AttentionMask, backend

from ..conftest import DEVICE, backend_params
from .common import leaf


def assert_like_torch(impl, ours, theirs, inputs):
    """Same outputs and input gradients (shape, dtype, values) as torch's function, for a random output
    gradient. Inputs that do not need a gradient are passed as they are."""
    a = [leaf(t) if t.is_floating_point() else t for t in inputs]
    e = [leaf(t) if t.is_floating_point() else t for t in inputs]
    with backend.use(impl):
        out = ours(*a)
    expected = theirs(*e)
    outs, exps = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
    for o, x in zip(outs, exps):
        assert o.shape == x.shape and o.dtype == x.dtype, (
            f"{tuple(o.shape)} {o.dtype} vs torch's {tuple(x.shape)} {x.dtype}")
        torch.testing.assert_close(o, x)
    grads_out = [torch.randn(x.shape, device=DEVICE, dtype=x.dtype) for x in exps]
    need = [i for i, t in enumerate(a) if t.requires_grad]
    with backend.use(impl):
        grads = torch.autograd.grad(outs, [a[i] for i in need], grads_out, allow_unused=True)
    grads_t = torch.autograd.grad(exps, [e[i] for i in need], grads_out, allow_unused=True)
    for i, g, gt in zip(need, grads, grads_t):
        gt = torch.zeros_like(e[i]) if gt is None else gt
        g = torch.zeros_like(a[i]) if g is None else g
        assert g.shape == gt.shape, f"grad of input {i}: {tuple(g.shape)} vs torch's {tuple(gt.shape)}"
        torch.testing.assert_close(g, gt, msg=lambda m: f"grad of input {i}: {m}")


EMPTY_ROWS = [(0, 5), (3, 0), (2, 0, 7), (0, 0)]


@pytest.mark.parametrize("impl", backend_params("activation"))
@pytest.mark.parametrize("shape", EMPTY_ROWS, ids=str)
def test_activations_empty(impl, shape):
    x, up = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    b = torch.randn(shape[-1], device=DEVICE)
    assert_like_torch(impl, pk.gelu, F.gelu, [x])
    assert_like_torch(impl, lambda x: pk.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), [x])
    assert_like_torch(impl, pk.silu, F.silu, [x])
    assert_like_torch(impl, pk.bias_gelu, lambda x, b: F.gelu(x + b), [x, b])
    assert_like_torch(impl, pk.swiglu, lambda g, u: F.silu(g) * u, [x, up])
    assert_like_torch(impl, pk.geglu, lambda g, u: F.gelu(g, approximate="tanh") * u, [x, up])


@pytest.mark.parametrize("impl", backend_params("rms_norm"))
@pytest.mark.parametrize("shape", EMPTY_ROWS, ids=str)
def test_rms_norm_empty(impl, shape):
    x, r = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    w = torch.rand(shape[-1], device=DEVICE) + 0.5
    assert_like_torch(impl, lambda x, w: pk.rms_norm(x, w), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                      [x, w])
    assert_like_torch(impl, lambda x, w, r: pk.rms_norm(x, w, residual=r),
                      lambda x, w, r: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r), [x, w, r])


@pytest.mark.parametrize("impl", backend_params("layer_norm"))
@pytest.mark.parametrize("shape", EMPTY_ROWS, ids=str)
def test_layer_norm_empty(impl, shape):
    x, r = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    w, b = torch.rand(shape[-1], device=DEVICE) + 0.5, torch.randn(shape[-1], device=DEVICE)
    C = shape[-1]
    assert_like_torch(impl, pk.layer_norm, lambda x, w, b: F.layer_norm(x, (C,), w, b), [x, w, b])
    assert_like_torch(impl, lambda x, w, b, r: pk.layer_norm(x, w, b, residual=r),
                      lambda x, w, b, r: (F.layer_norm(x + r, (C,), w, b), x + r), [x, w, b, r])


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("impl", backend_params("rope"))
@pytest.mark.parametrize("shape", [(0, 2, 5, 16), (2, 0, 5, 16), (2, 3, 0, 16)], ids=str)
def test_rope_empty(impl, shape):
    cos, sin = pk.rope_cos_sin(16, 32)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    L = shape[2]
    c, s = torch.cat([cos[:L]] * 2, -1), torch.cat([sin[:L]] * 2, -1)
    q, k = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    assert_like_torch(impl, lambda q, k: pk.rope(q, k, cos, sin),
                      lambda q, k: (q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s), [q, k])


ATTENTION_SHAPES = {  # (B, H, Lq, Lk)
    "batch 0": (0, 2, 5, 7), "heads 0": (2, 0, 5, 7), "Lq 0": (2, 2, 0, 7), "Lk 0": (2, 2, 5, 0),
    "Lq and Lk 0": (1, 2, 0, 0),
}


@pytest.mark.parametrize("impl", backend_params("attention"))
@pytest.mark.parametrize("case", list(ATTENTION_SHAPES))
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "causal+bias"])
def test_attention_empty(impl, case, masked):
    """Lk = 0 with Lq > 0: every row sees no key, torch's SDPA gives zeros (and a zero gradient to q)."""
    B, H, Lq, Lk = ATTENTION_SHAPES[case]
    D = 16
    q = torch.randn(B, H, Lq, D, device=DEVICE)
    k, v = torch.randn(B, H, Lk, D, device=DEVICE), torch.randn(B, H, Lk, D, device=DEVICE)
    bias = torch.randn(B, H, Lq, Lk, device=DEVICE)
    if not masked:
        assert_like_torch(impl, pk.attention, F.scaled_dot_product_attention, [q, k, v])
        assert_like_torch(impl, pk.scaled_dot_product_attention, F.scaled_dot_product_attention, [q, k, v])
        return
    causal = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(Lk - Lq)
    assert_like_torch(impl, lambda q, k, v, b: pk.attention(q, k, v, AttentionMask.causal() & AttentionMask.bias(b)),
                      lambda q, k, v, b: F.scaled_dot_product_attention(
                          q, k, v, attn_mask=b.masked_fill(~causal, float("-inf"))), [q, k, v, bias])


@pytest.mark.parametrize("impl", backend_params("relative_attention"))
@pytest.mark.parametrize("case", ["batch 0", "Lq 0"])
def test_relative_attention_empty(impl, case):
    """relative_attention and two_stream_attention with no query row: empty results, zero gradients."""
    B, H, Lq, M, D = (0, 2, 5, 3, 16) if case == "batch 0" else (2, 2, 0, 4, 16)
    Lk = Lq + M
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for L in (Lq, Lk, Lk))
    r = torch.randn(H, Lk + Lq, D, device=DEVICE)
    u, vb = torch.randn(H, D, device=DEVICE), torch.randn(H, D, device=DEVICE)
    ins = [leaf(t) for t in (q, k, v, r, u, vb)]
    with backend.use(impl):
        out = pk.relative_attention(*ins, mask=AttentionMask.causal())
        h, g = pk.two_stream_attention(ins[0], ins[0], *ins[1:])
        assert out.shape == h.shape == g.shape == q.shape
        grads = torch.autograd.grad((out.sum() + h.sum() + g.sum()), ins, allow_unused=True)
    for t, gr in zip(ins, grads):
        assert gr is None or (gr.shape == t.shape and (gr == 0).all())
