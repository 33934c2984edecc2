"""The fast path past torch.library's dispatcher (ptm_kernels/ops/_fast_path.py): taken only when nothing needs
the dispatcher, and bitwise the same results as the op called through it."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ptm_kernels as pk
from ptm_kernels import AttentionMask
from ptm_kernels.ops import _fast_path

from ..conftest import DEVICE

C = 48


def _inputs(dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x, r, up = (torch.randn(2, 5, C, generator=g).to(DEVICE, dtype) for _ in range(3))
    w, b = (torch.randn(C, generator=g).to(DEVICE, dtype) for _ in range(2))
    cos, sin = (torch.randn(16, C // 2, generator=g).to(DEVICE) for _ in range(2))
    return x, r, up, w, b, cos, sin


# name -> (the ptm::op it calls, a function of the inputs)
CASES = {
    "rms_norm": ("ptm::rms_norm", lambda x, r, up, w, b, cos, sin: pk.rms_norm(x, w)),
    "rms_norm_residual": ("ptm::rms_norm", lambda x, r, up, w, b, cos, sin: pk.rms_norm(x, w, residual=r)),
    "layer_norm": ("ptm::layer_norm", lambda x, r, up, w, b, cos, sin: pk.layer_norm(x, w, b)),
    "layer_norm_residual": ("ptm::layer_norm", lambda x, r, up, w, b, cos, sin: pk.layer_norm(x, w, b, residual=r)),
    "bias_gelu": ("ptm::activation", lambda x, r, up, w, b, cos, sin: pk.bias_gelu(x, b, "tanh")),
    "gelu": ("ptm::activation", lambda x, r, up, w, b, cos, sin: pk.gelu(x)),
    "swiglu": ("ptm::gated_activation", lambda x, r, up, w, b, cos, sin: pk.swiglu(x, up)),
    "rope": ("ptm::rope", lambda x, r, up, w, b, cos, sin: pk.rope(x.view(2, 5, 1, C).transpose(1, 2),
                                                                   r.view(2, 5, 1, C).transpose(1, 2), cos, sin)),
    # attention: heads of 16 from the channels; relative attention's r is one position per key
    "attention": ("ptm::attention", lambda x, r, up, w, b, cos, sin: pk.attention(
        _heads(x), _heads(r), _heads(up), AttentionMask.causal(), return_lse=True)),
    "attention_gqa_decode": ("ptm::attention", lambda x, r, up, w, b, cos, sin: pk.attention(
        _heads(x)[:, :, -1:], _heads(r)[:, :1], _heads(up)[:, :1])),
    "relative_attention": ("ptm::relative_attention", lambda x, r, up, w, b, cos, sin: pk.relative_attention(
        _heads(x), _heads(r), _heads(up), _heads(x.flip(1))[0], w.view(3, 16),
        b.view(3, 16), mask=AttentionMask.causal())),
}


def _heads(t):
    """[2, 5, 48] -> [2, 3 heads, 5, 16]"""
    return t.view(2, 5, 3, 16).transpose(1, 2)


def _flat(out):
    return list(out) if isinstance(out, tuple) else [out]


def _profiled_ops(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_is_bitwise_the_op(case, dtype):
    """No grad: the op's function runs directly (no ptm:: op event); with grad: through the dispatcher. The
    forward results are bitwise equal, and so are the gradients computed (backward ops take the fast path)."""
    op_name, fn = CASES[case]
    inputs = _inputs(dtype)
    with torch.no_grad():
        fast, events = _profiled_ops(fn, *inputs)
    assert op_name not in events, f"{case}: the no-grad call went through the dispatcher"

    tracked = [t.clone().requires_grad_(t.is_floating_point() and i < 5) for i, t in enumerate(inputs)]
    slow, events = _profiled_ops(fn, *tracked)
    assert op_name in events, f"{case}: a call that needs autograd skipped the dispatcher"
    for f, s in zip(_flat(fast), _flat(slow)):
        assert torch.equal(f, s.detach()), f"{case}: fast path and op differ"
    sum(o.float().sum() for o in _flat(slow)).backward()
    assert any(t.grad is not None for t in tracked)


def test_dispatcher_kept_where_it_is_needed():
    x, w = torch.randn(3, C), torch.randn(C)
    assert _fast_path.skips_dispatch((x, w, None, 1e-6, True))
    assert not _fast_path.skips_dispatch((x, w.requires_grad_(), None, 1e-6, True))
    with torch.no_grad():
        assert _fast_path.skips_dispatch((x, w, None, 1e-6, True))
    with FakeTensorMode() as mode:  # FakeTensors (and the mode itself) need the op's fake implementation
        fake = mode.from_tensor(x)
        assert not _fast_path.skips_dispatch((fake,))
        assert pk.rms_norm(fake, None).shape == x.shape
    assert not torch.func.vmap(lambda t: torch.tensor(_fast_path.skips_dispatch((t,))))(x).any()
    assert not _fast_path.skips_dispatch((x, object()))  # e.g. an fx Proxy standing for a tensor


def test_jit_trace_records_the_op():
    """torch.jit.trace must see ptm::rms_norm (a direct call into the extension would be missing from the trace)."""
    x, w = torch.randn(4, C), torch.randn(C)
    with torch.no_grad():
        traced = torch.jit.trace(lambda a, b: pk.rms_norm(a, b), (x, w))
    assert "ptm::rms_norm" in str(traced.graph)
    x2 = torch.randn(4, C)
    assert torch.equal(traced(x2, w), pk.rms_norm(x2, w))


def test_compiled_fullgraph_without_grad_uses_the_op():
    """Under torch.compile the op stays one graph node (the fast path would trace into the C++ kernel)."""
    x, w = torch.randn(4, C), torch.randn(C)
    compiled = torch.compile(lambda a, b: pk.rms_norm(a, b) * 2, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x, w), pk.rms_norm(x, w) * 2)
