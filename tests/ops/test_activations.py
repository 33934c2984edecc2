"""gelu, bias_gelu, silu, swiglu, geglu: every implementation against the reference, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import backend, reference

from ..conftest import DEVICE, backend_params
from .common import DTYPES, row_shapes
from .test_norms import _check


@pytest.mark.parametrize("impl", backend_params("activation"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_bias_gelu(impl, dtype, approximate):
    for N, C in row_shapes(impl):
        x = torch.randn(N, C, device=DEVICE, dtype=dtype) * 3
        b = torch.randn(C, device=DEVICE, dtype=dtype)
        _check(impl, lambda x: pk.gelu(x, approximate), lambda x: reference.gelu(x, approximate),
               [x], dtype, f"gelu[{N}x{C}]")
        _check(impl, lambda x, b: pk.bias_gelu(x, b, approximate),
               lambda x, b: reference.bias_gelu(x, b, approximate), [x, b], dtype, f"bias_gelu[{N}x{C}]")


@pytest.mark.parametrize("impl", backend_params("activation"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated(impl, dtype):
    for N, C in row_shapes(impl):
        g = torch.randn(N, C, device=DEVICE, dtype=dtype) * 3
        u = torch.randn(N, C, device=DEVICE, dtype=dtype)
        _check(impl, pk.swiglu, reference.swiglu, [g, u], dtype, f"swiglu[{N}x{C}]")
        _check(impl, pk.geglu, reference.geglu, [g, u], dtype, f"geglu[{N}x{C}]")
        _check(impl, lambda x: pk.silu(x), reference.silu, [g], dtype, f"silu[{N}x{C}]")


@pytest.mark.parametrize("impl", backend_params("activation"))
def test_activations_match_torch_and_handle_odd_inputs(impl):
    """Agree with torch's own functions; scalars, empty tensors and strided views work."""
    x = torch.randn(7, 9, 33, device=DEVICE)[:, ::2].transpose(0, 1)  # strided, not contiguous
    with backend.use(impl):
        torch.testing.assert_close(pk.gelu(x), F.gelu(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pk.gelu(x, "tanh"), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pk.silu(x), F.silu(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(pk.swiglu(x, x.flip(0)), F.silu(x) * x.flip(0), rtol=1e-5, atol=1e-6)
        s = torch.tensor(0.7, device=DEVICE)
        torch.testing.assert_close(pk.gelu(s), F.gelu(s))
        assert pk.gelu(torch.empty(0, 5, device=DEVICE)).shape == (0, 5)


def test_gated_mlp_module_matches_llama_mlp():
    """nn.GatedMLP(act="silu") computes transformers' LlamaMLP with the same state_dict."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, hidden_act="silu")
    theirs = LlamaMLP(cfg).to(DEVICE)
    ours = pk.nn.GatedMLP(64, 176, act="silu").to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 64, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
