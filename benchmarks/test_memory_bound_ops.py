"""Benchmarks of the memory-bound ops (norms, activations, rotary) against what users would otherwise run:
eager PyTorch, torch.compile of that same eager code, and Liger-Kernel (GPU, when installed).

Each test validates the implementation against eager on the same inputs, then times it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk

from tests.compare import assert_close  # the tests' tolerance rule

from .common import DEVICE, DTYPES, GPU, ROW_CASES, check_close, fwd_bwd, liger, measure


@dataclass(frozen=True)
class OpSpec:
    name: str
    make: Callable        # (N, C, dtype) -> list of input tensors (requires_grad where trained)
    ours: Callable        # (*inputs) -> output(s)
    eager: Callable
    io_tensors: int       # how many [N, C] tensors the forward reads + writes (for GB/s)
    width: Callable = lambda C: C  # the op's last dimension for a model of hidden size C
    liger: Callable = None


def _rows(N, C, dtype, n, extra=()):
    ts = [torch.randn(N, C, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(n)]
    return ts + [t.requires_grad_(True) for t in extra]


def _w(C, dtype):
    return (torch.rand(C, device=DEVICE, dtype=dtype) + 0.5).requires_grad_(True)


def _eager_add_rms(x, r, w):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w, 1e-6), h


def _eager_add_ln(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, 1e-5), h


def _liger_rms(x, w):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, w, 1e-6)


def _liger_swiglu(g, u):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(g, u)


def _liger_geglu(g, u):
    from liger_kernel.ops.geglu import LigerGELUMulFunction

    return LigerGELUMulFunction.apply(g, u)


OPS = [
    OpSpec("add_rms_norm", lambda N, C, d: _rows(N, C, d, 2) + [_w(C, d)],
           lambda x, r, w: pk.rms_norm(x, w, 1e-6, residual=r), _eager_add_rms, io_tensors=4),
    OpSpec("rms_norm", lambda N, C, d: _rows(N, C, d, 1) + [_w(C, d)],
           lambda x, w: pk.rms_norm(x, w, 1e-6), lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
           io_tensors=2, liger=_liger_rms),
    OpSpec("add_layer_norm", lambda N, C, d: _rows(N, C, d, 2) + [_w(C, d), _w(C, d)],
           lambda x, r, w, b: pk.layer_norm(x, w, b, 1e-5, residual=r), _eager_add_ln, io_tensors=4),
    OpSpec("layer_norm", lambda N, C, d: _rows(N, C, d, 1) + [_w(C, d), _w(C, d)],
           lambda x, w, b: pk.layer_norm(x, w, b, 1e-5),
           lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5), io_tensors=2),
    OpSpec("bias_gelu", lambda N, C, d: _rows(N, C, d, 1) + [_w(C, d)],
           lambda x, b: pk.bias_gelu(x, b), lambda x, b: F.gelu(x + b), io_tensors=2, width=lambda C: 4 * C),
    OpSpec("gelu_tanh", lambda N, C, d: _rows(N, C, d, 1),
           lambda x: pk.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), io_tensors=2,
           width=lambda C: 4 * C),
    OpSpec("swiglu", lambda N, C, d: _rows(N, C, d, 2),
           pk.swiglu, lambda g, u: F.silu(g) * u, io_tensors=3, width=lambda C: 8 * C // 3, liger=_liger_swiglu),
    OpSpec("geglu", lambda N, C, d: _rows(N, C, d, 2),
           pk.geglu, lambda g, u: F.gelu(g, approximate="tanh") * u, io_tensors=3, width=lambda C: 8 * C // 3,
           liger=_liger_geglu),
]


def _impls(op: OpSpec, case: str, dtype):
    out = ["ptm", "eager"]
    # torch.compile costs ~10 s per graph on a 2-core CPU: there, compile one shape per op in float32.
    if GPU or (case == "bert-base" and dtype == torch.float32):
        out.append("compiled")
    if op.liger is not None and liger() is not None:
        out.append("liger")
    return out


def _params():
    for op in OPS:
        for case, N, C in ROW_CASES:
            for dtype in DTYPES:
                for impl in _impls(op, case, dtype):
                    for passes in ("fwd", "fwd+bwd"):
                        yield pytest.param(op, case, N, op.width(C), dtype, impl, passes,
                                           id=f"{op.name}-{case}-{str(dtype)[6:]}-{impl}-{passes}")


_compiled = {}


def _fn(op: OpSpec, impl: str):
    if impl == "ptm":
        return op.ours
    if impl == "eager":
        return op.eager
    if impl == "liger":
        return op.liger
    if op.name not in _compiled:
        _compiled[op.name] = torch.compile(op.eager, dynamic=False)
    return _compiled[op.name]


@pytest.mark.parametrize("op,case,N,C,dtype,impl,passes", list(_params()))
def test_op(benchmark, op, case, N, C, dtype, impl, passes):
    inputs = op.make(N, C, dtype)
    fn = _fn(op, impl)
    out = fn(*inputs)
    if impl != "eager":
        check_close(out, op.eager(*inputs), f"{op.name} {impl}")
    elt = torch.finfo(dtype).bits // 8
    if passes == "fwd":
        with torch.no_grad():
            measure(benchmark, lambda: fn(*inputs), group=op.name, case=f"{case} {str(dtype)[6:]}", impl=impl,
                    passes=passes, bytes_moved=op.io_tensors * N * C * elt)
    else:
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.randn_like(o) for o in outs]
        measure(benchmark, fwd_bwd(lambda: fn(*inputs), inputs, grads), group=op.name,
                case=f"{case} {str(dtype)[6:]}", impl=impl, passes=passes)


# --------------------------------------------------------------------------------------------- rotary
def _rope_case():
    # LLaMA-7B attention: 32 heads of 128; 2048 tokens on GPU (batch 8), 512 on CPU.
    return (8, 32, 2048, 128) if GPU else (1, 32, 512, 128)


def _eager_rope(q, k, cos, sin, pos):
    """transformers' apply_rotary_pos_emb, with its duplicated [L, D] cos/sin."""
    c = torch.cat([cos, cos], -1)[pos].unsqueeze(1).to(q.dtype)
    s = torch.cat([sin, sin], -1)[pos].unsqueeze(1).to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("impl", ["ptm", "eager"] + (["compiled"] if GPU else []))
@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
def test_rope(benchmark, dtype, impl, passes):
    B, H, L, D = _rope_case()
    q = torch.randn(B, L, H, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, L, H, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)
    cos, sin = (t.to(DEVICE) for t in pk.rope_cos_sin(D, 4096))
    pos = torch.arange(L, device=DEVICE).expand(B, L)
    ours = lambda: pk.rope(q, k, cos, sin, position_ids=pos)  # noqa: E731
    eager = lambda: _eager_rope(q, k, cos, sin, pos)  # noqa: E731
    fn = {"ptm": ours, "eager": eager, "compiled": torch.compile(eager, dynamic=False)}[impl]
    with torch.no_grad():
        # against float64, as the tests judge: eager bf16 against itself fails where its own cancellation
        # error (x*cos + rot(x)*sin) exceeds a fixed 0.02
        reference = _eager_rope(q.double(), k.double(), cos.double(), sin.double(), pos)
        for name, ours, theirs, truth in zip("qk", fn(), eager(), reference):
            assert_close(ours, truth, theirs, name=f"rope {impl} {name}")
    elt = torch.finfo(dtype).bits // 8
    case = f"llama-7b {str(dtype)[6:]}"
    if passes == "fwd":
        with torch.no_grad():
            measure(benchmark, fn, group="rope", case=case, impl=impl, passes=passes,
                    bytes_moved=4 * B * H * L * D * elt)
    else:
        grads = [torch.randn(B, H, L, D, device=DEVICE, dtype=dtype) for _ in range(2)]
        measure(benchmark, fwd_bwd(fn, [q, k], grads), group="rope", case=case, impl=impl, passes=passes)


# ------------------------------------------------------------------------------------ bandwidth ceiling
@pytest.mark.skipif(not GPU, reason="GB/s against copy bandwidth is reported on GPU only")
def test_copy_bandwidth(benchmark):
    """The ceiling memory-bound kernels are judged against: a device-to-device copy."""
    x = torch.empty(256 * 1024 * 1024 // 2, device=DEVICE, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    measure(benchmark, lambda: y.copy_(x), group="copy", case="256MiB", impl="copy", passes="fwd",
            bytes_moved=2 * x.numel() * 2)
