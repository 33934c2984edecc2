"""linear: torch's F.linear, with the CPU backend's few-row forms (GEMV for one row, the weight on the left up to
64 rows), against a float64 truth; gradients, edge cases, torch.compile, opcheck."""

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import backend
from ptm_kernels.ops.linear import FEW_ROWS, _linear

from ..compare import assert_close
from ..conftest import DEVICE, backend_params

# rows: one (GEMV), a few, the largest few-row case, one past it (F.linear); K: vector tails and one full
# vector of AVX512 / AVX2; N: rows of the weight past a group of four
ROWS = (1, 3, 16, FEW_ROWS, FEW_ROWS + 1)
SHAPES = ((1, 1), (7, 5), (16, 33), (130, 67), (512, 260))  # (K, N)


def _inputs(rows, K, N, bias=True, seed_shape=(), stored_kn=False):
    """stored_kn: the weight is the transpose of a [K, N] matrix (transformers' Conv1D passes W^T)."""
    x = torch.randn(*seed_shape, rows, K, device=DEVICE)
    w = (torch.randn(K, N, device=DEVICE).t() if stored_kn else torch.randn(N, K, device=DEVICE)) / K ** 0.5
    b = torch.randn(N, device=DEVICE) if bias else None
    return x, w, b


@pytest.mark.parametrize("impl", backend_params("linear"))
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("stored_kn", [False, True], ids=["weight_NK", "weight_KN_transposed"])
def test_linear_matches_float64(impl, rows, bias, stored_kn):
    for K, N in SHAPES + ((96, 300),):  # 300 columns: groups of 128 (AVX-512), single blocks and a partial one
        x, w, b = _inputs(rows, K, N, bias, stored_kn=stored_kn)
        truth = F.linear(x.double(), w.double(), b.double() if bias else None)
        with backend.use(linear=impl):
            y = pk.linear(x, w, b)
        assert y.dtype == torch.float32 and y.is_contiguous()
        assert_close(y, truth, name=f"{impl} rows={rows} K={K} N={N} weight strides {w.stride()}")


def test_leading_dims_and_strided_inputs():
    # x [B, 1, K] as a decode step has it; a weight that is a column slice of a wider one (row stride > K);
    # a weight stored transposed (unit row stride): each gives F.linear's values in F.linear's shape
    x = torch.randn(16, 1, 40, device=DEVICE)
    wide = torch.randn(24, 56, device=DEVICE)
    for w in (wide[:, 8:48], torch.randn(40, 24, device=DEVICE).t(), torch.randn(24, 40, device=DEVICE)):
        for xs in (x, x[:1], x.transpose(0, 1), x[0, 0]):
            y = pk.linear(xs, w)
            assert y.shape == (*xs.shape[:-1], 24)
            assert_close(y, F.linear(xs.double(), w.double()), name=f"w strides {w.stride()}")


@pytest.mark.parametrize("stored_kn", [False, True], ids=["weight_NK", "weight_KN_transposed"])
def test_nonfinite_values_propagate_as_in_torch(stored_kn):
    x, w, b = _inputs(1, 20, 9, stored_kn=stored_kn)
    x[0, 3] = float("nan")
    assert torch.isnan(pk.linear(x, w, b)).all()
    x, w, b = _inputs(2, 20, 9, stored_kn=stored_kn)
    w[4, 2] = float("inf")
    want = F.linear(x, w, b)
    for rows in (x[:1], x):
        got = pk.linear(rows, w, b)
        assert torch.equal(torch.isinf(got), torch.isinf(want[:rows.shape[0]]))
        assert torch.equal(torch.isnan(got), torch.isnan(want[:rows.shape[0]]))


@pytest.mark.parametrize("shape", [(0, 8, 5), (3, 0, 5), (3, 8, 0), (1, 0, 4)], ids=str)
def test_empty(shape):
    M, K, N = shape
    x, w, b = torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE), torch.randn(N, device=DEVICE)
    assert torch.equal(pk.linear(x, w, b), F.linear(x, w, b))


def test_other_dtypes_and_devices_are_torch_linear():
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        x, w, b = (t.to(dtype) for t in _inputs(1, 24, 12))
        assert torch.equal(pk.linear(x, w, b), F.linear(x, w, b))


def test_bad_arguments_give_torch_errors():
    x, w, b = _inputs(1, 24, 12)
    with pytest.raises(RuntimeError):
        pk.linear(x, w[:, :20], b)
    with pytest.raises(RuntimeError):
        pk.linear(x, w, b[:5])
    with pytest.raises(RuntimeError):
        pk.linear(x, w.double(), b)
    with pytest.raises(TypeError):
        pk.linear(x.tolist(), w, b)
    with pytest.raises(RuntimeError):
        pk.linear(x, w[0, 0], b)


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("stored_kn", [False, True], ids=["weight_NK", "weight_KN_transposed"])
def test_gradients(rows, stored_kn):
    x, w, b = _inputs(rows, 70, 37, stored_kn=stored_kn)
    if stored_kn:  # the leaf is the [K, N] parameter (Conv1D's), w its transposed view
        leaf = w.t().detach().requires_grad_(True)
        w = leaf.t()
    for t in (x, b) if stored_kn else (x, w, b):
        t.requires_grad_(True)
    dy = torch.randn(rows, 37, device=DEVICE)
    grads = torch.autograd.grad(pk.linear(x, w, b), (x, leaf if stored_kn else w, b), dy)
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    truth = torch.autograd.grad(F.linear(x64, w64, b64), (x64, w64, b64), dy.double())
    truth = (truth[0], truth[1].t() if stored_kn else truth[1], truth[2])
    for name, g, t in zip(("dx", "dw", "db"), grads, truth):
        assert_close(g, t, name=name)


@pytest.mark.parametrize("rows", [1, 16])
def test_opcheck(rows):
    x, w, b = _inputs(rows, 33, 21)
    torch.library.opcheck(_linear, (x, w, b))
    torch.library.opcheck(_linear, (x, w.t().contiguous().t(), b))  # a weight stored [K, N]
    torch.library.opcheck(_linear, (x.requires_grad_(True), w.requires_grad_(True), None))


def test_compiles_without_graph_breaks():
    def f(x, w, b):
        return torch.relu(pk.linear(x, w, b))

    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(f, fullgraph=True, dynamic=False)
    for rows in (1, 16):
        x, w, b = _inputs(rows, 48, 40)
        torch.testing.assert_close(compiled(x, w, b), f(x, w, b), rtol=1e-5, atol=1e-5)
        torch.compile(f, fullgraph=True, dynamic=False, backend=record)(x, w, b)
        assert "ptm.linear" in graphs[-1]  # the op itself, not F.linear, is what the graph holds


def test_torch_func_transforms_work_as_with_f_linear():
    x, w, _ = _inputs(3, 8, 5)
    got = torch.vmap(lambda xi: pk.linear(xi, w))(x[:, None])
    assert_close(got, F.linear(x.double(), w.double())[:, None], name="vmap")
    dw = torch.func.grad(lambda ww: pk.linear(x[:1], ww).square().sum())(w)
    want = torch.func.grad(lambda ww: F.linear(x[:1].double(), ww).square().sum())(w.double())
    assert_close(dw, want, name="torch.func.grad")


def test_linear_module_is_nn_linear():
    torch.manual_seed(0)
    ours = pk.nn.Linear(30, 20)
    theirs = torch.nn.Linear(30, 20)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(4, 1, 30, device=DEVICE)
    assert_close(ours.to(DEVICE)(x), theirs.to(DEVICE).double()(x.double()), name="module")
