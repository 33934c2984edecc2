"""The torch.library contract: opcheck on every op, float64 gradcheck of the autograd formulas, and
a module built from the ops under torch.compile(fullgraph=True)."""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import backend

from ..conftest import DEVICE


def _opcheck_cases():
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.rand(40, device=DEVICE, requires_grad=True)
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    q = torch.randn(2, 4, 5, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 5, 16, device=DEVICE, requires_grad=True)
    cos, sin = (t.to(DEVICE) for t in pk.rope_cos_sin(8, 32))
    pos = torch.arange(5, device=DEVICE).unsqueeze(0)
    ops = torch.ops.ptm
    return {
        "rms_norm": (ops.rms_norm.default, (x, w, None, 1e-6, True)),
        "rms_norm_residual": (ops.rms_norm.default, (x, w, r, 1e-6, True)),
        "rms_norm_backward": (ops.rms_norm_backward.default, (x.detach(), r.detach(), w.detach(),
                                                              torch.rand(6, device=DEVICE), None)),
        "layer_norm": (ops.layer_norm.default, (x, w, b, None, 1e-5)),
        "layer_norm_residual": (ops.layer_norm.default, (x, w, b, r, 1e-5)),
        "layer_norm_backward": (ops.layer_norm_backward.default,
                                (x.detach(), r.detach(), w.detach(), torch.randn(6, device=DEVICE),
                                 torch.rand(6, device=DEVICE), None, True)),
        "activation": (ops.activation.default, (x, b, "gelu")),
        "activation_backward": (ops.activation_backward.default, (x.detach(), r.detach(), b.detach(), "gelu_tanh")),
        "gated_activation": (ops.gated_activation.default, (x, r, "silu")),
        "gated_activation_backward": (ops.gated_activation_backward.default,
                                      (x.detach(), r.detach(), w.detach().expand(6, 40).contiguous(), "gelu")),
        # absent parameters in half precision: the fake's empty gradients must match the kernels' dtypes
        "rms_norm_backward_bf16_no_weight": (ops.rms_norm_backward.default,
                                             (x.detach().bfloat16(), r.detach().bfloat16(), None,
                                              torch.rand(6, device=DEVICE), None)),
        "layer_norm_backward_bf16_no_affine": (ops.layer_norm_backward.default,
                                               (x.detach().bfloat16(), r.detach().bfloat16(), None,
                                                torch.randn(6, device=DEVICE), torch.rand(6, device=DEVICE), None,
                                                False)),
        "activation_backward_bf16_no_bias": (ops.activation_backward.default,
                                             (x.detach().bfloat16(), r.detach().bfloat16(), None, "gelu")),
        "rope": (ops.rope.default, (q, k, cos, sin, pos, False, 8, False)),
        "rope_q_only": (ops.rope.default, (q, None, cos, sin, pos, True, 8, False)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_gradcheck_float64():
    """The registered backward formulas against finite differences (float64 runs on the reference)."""
    d = dict(device=DEVICE, dtype=torch.float64, requires_grad=True)
    x, r, w, b = torch.randn(3, 12, **d), torch.randn(3, 12, **d), torch.rand(12, **d), torch.randn(12, **d)
    gradcheck = torch.autograd.gradcheck
    assert gradcheck(lambda x, w, r: pk.rms_norm(x, w, residual=r), (x, w, r))
    assert gradcheck(lambda x, w, b, r: pk.layer_norm(x, w, b, residual=r), (x, w, b, r))
    assert gradcheck(lambda x, b: pk.bias_gelu(x, b), (x, b))
    assert gradcheck(lambda x, b: pk.bias_gelu(x, b, "tanh"), (x, b))
    assert gradcheck(pk.swiglu, (x, r))
    assert gradcheck(pk.geglu, (x, r))
    q, k = torch.randn(1, 2, 4, 8, **d), torch.randn(1, 1, 4, 8, **d)
    cos, sin = (t.double().to(DEVICE) for t in pk.rope_cos_sin(6, 16))
    assert gradcheck(lambda q, k: pk.rope(q, k, cos, sin, offset=2, rotary_dim=6), (q, k))
    assert gradcheck(lambda q, k: pk.rope(q, k, cos, sin, interleaved=True, rotary_dim=6), (q, k))


class _Block(torch.nn.Module):
    """A pre-norm LLaMA-style block body using every op family."""

    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.norm = pk.nn.RMSNorm(hidden)
        self.ln = pk.nn.LayerNorm(hidden)
        self.mlp = pk.nn.GatedMLP(hidden, 96)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(hidden))
        self.rot = pk.nn.RotaryEmbedding(hidden // heads, 64)
        self.heads = heads

    def forward(self, x, resid):
        h, resid = self.norm(x, resid)
        B, L, C = h.shape
        q = h.view(B, L, self.heads, C // self.heads).transpose(1, 2)
        q, k = self.rot(q, q, offset=1)
        h = (q + k).transpose(1, 2).reshape(B, L, C)
        h = pk.bias_gelu(self.proj(h), self.bias)
        return self.ln(self.mlp(h)), resid


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    block = _Block().to(DEVICE)
    x, resid = torch.randn(2, 8, 64, device=DEVICE), torch.randn(2, 8, 64, device=DEVICE)
    eager = block(x, resid)
    compiled = torch.compile(block, fullgraph=True)(x, resid)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the backward through the compiled graph
    xg = x.clone().requires_grad_(True)
    torch.compile(block, fullgraph=True)(xg, resid)[0].sum().backward()
    xe = x.clone().requires_grad_(True)
    block(xe, resid)[0].sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-5)
