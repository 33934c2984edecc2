"""rms_norm and layer_norm: every implementation against the reference, forward and all gradients."""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import backend, reference

from ..compare import assert_close
from ..conftest import DEVICE, backend_params
from .common import DTYPES, run, row_shapes, to64


def _param(C, kind, dtype):
    if kind is None:
        return None
    p_dtype = dtype if kind == "same" else torch.float32
    return (torch.rand(C, device=DEVICE) + 0.5).to(p_dtype)


def _check(impl, fn_kernel, fn_ref, inputs, dtype, name):
    """Kernel (on `impl`) vs float64 truth, with plain PyTorch in `dtype` as the half-precision yardstick."""
    with backend.use(impl):
        probe = fn_kernel(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    grads_out = [torch.randn(o.shape, device=DEVICE, dtype=torch.float64) for o in probe]
    with backend.use(impl):
        outs, grads = run(fn_kernel, inputs, grads_out)
    truth_outs, truth_grads = run(fn_ref, to64(inputs), grads_out)
    base_outs, base_grads = run(fn_ref, inputs, grads_out)
    for i, (o, t, b) in enumerate(zip(outs, truth_outs, base_outs)):
        assert o.dtype == b.dtype, f"{name} output {i}: dtype {o.dtype}, plain PyTorch gives {b.dtype}"
        assert_close(o, t, b, name=f"{name} output {i}", precision=dtype)
    for i, (g, t, b) in enumerate(zip(grads, truth_grads, base_grads)):
        if t is None:
            continue
        assert g is not None and g.dtype == inputs[i].dtype, f"{name} grad {i}: missing or wrong dtype"
        assert_close(g, t, b, name=f"{name} grad of input {i}", precision=dtype)


@pytest.mark.parametrize("impl", backend_params("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight", ["same", "float32", None])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("cast", ["llama", "t5"])
def test_rms_norm(impl, dtype, weight, residual, cast):
    if dtype == torch.float32 and weight == "float32":
        pytest.skip("same as weight='same' for float32 inputs")
    for N, C in row_shapes(impl):
        x = torch.randn(N, C, device=DEVICE, dtype=dtype)
        r = torch.randn(N, C, device=DEVICE, dtype=dtype) if residual else None
        w = _param(C, weight, dtype)
        _check(impl, lambda x, w, r: pk.rms_norm(x, w, 1e-6, residual=r, cast=cast),
               lambda x, w, r: reference.rms_norm(x, w, 1e-6, residual=r, cast=cast),
               [x, w, r], dtype, f"rms_norm[{N}x{C}]")


def test_rms_norm_t5_half_weight_with_float32_input():
    """T5 rounds the normalized input to the weight's dtype when that is half precision."""
    x = torch.randn(4, 96, device=DEVICE)
    w = (torch.rand(96, device=DEVICE) + 0.5).to(torch.bfloat16)
    y = pk.rms_norm(x, w, cast="t5")
    expected = reference.rms_norm(x, w, cast="t5")
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", backend_params("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["same", "float32", "weight_only", None])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_layer_norm(impl, dtype, affine, residual):
    if dtype == torch.float32 and affine == "float32":
        pytest.skip("same as affine='same' for float32 inputs")
    for N, C in row_shapes(impl):
        x = torch.randn(N, C, device=DEVICE, dtype=dtype) * 2 + 0.5
        r = torch.randn(N, C, device=DEVICE, dtype=dtype) if residual else None
        kind = "same" if affine == "weight_only" else affine
        w = _param(C, kind, dtype)
        b = None if affine in (None, "weight_only") else torch.randn(C, device=DEVICE).to(w.dtype)
        _check(impl, lambda x, w, b, r: pk.layer_norm(x, w, b, 1e-5, residual=r),
               lambda x, w, b, r: reference.layer_norm(x, w, b, 1e-5, residual=r),
               [x, w, b, r], dtype, f"layer_norm[{N}x{C}]")


@pytest.mark.parametrize("impl", backend_params("rms_norm"))
def test_norms_accept_any_leading_shape_and_strides(impl):
    """3-D inputs, and non-contiguous ones (a transposed view), give the reference's result."""
    x = torch.randn(6, 3, 40, device=DEVICE).transpose(0, 1)  # [3, 6, 40], not contiguous
    w = torch.rand(40, device=DEVICE) + 0.5
    b = torch.randn(40, device=DEVICE)
    with backend.use(impl):
        y = pk.rms_norm(x, w)
        z = pk.layer_norm(x, w, b)
    torch.testing.assert_close(y, reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, reference.layer_norm(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", backend_params("rms_norm"))
def test_norms_empty_batch(impl):
    """Zero rows: empty outputs and zero weight gradients, no error."""
    x = torch.randn(0, 32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    b = torch.zeros(32, device=DEVICE, requires_grad=True)
    with backend.use(impl):
        y = pk.rms_norm(x, w)
        z = pk.layer_norm(x, w, b)
        (y.sum() + z.sum()).backward()
    assert y.shape == z.shape == (0, 32)
    assert torch.equal(w.grad, torch.zeros(32, device=DEVICE))
    assert torch.equal(b.grad, torch.zeros(32, device=DEVICE))


def test_norm_modules_match_torch():
    """nn.RMSNorm / nn.LayerNorm are drop-in: same state_dict keys and results as torch's modules."""
    x = torch.randn(2, 5, 64, device=DEVICE)
    ours, theirs = pk.nn.LayerNorm(64).to(DEVICE), torch.nn.LayerNorm(64).to(DEVICE)
    torch.nn.init.normal_(theirs.weight)
    torch.nn.init.normal_(theirs.bias)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours, theirs = pk.nn.RMSNorm(64, eps=1e-6).to(DEVICE), torch.nn.RMSNorm(64, eps=1e-6).to(DEVICE)
    torch.nn.init.normal_(theirs.weight)
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    y, h = ours(x, residual=x)
    torch.testing.assert_close(h, 2 * x)
    torch.testing.assert_close(y, theirs(2 * x), rtol=1e-5, atol=1e-5)
