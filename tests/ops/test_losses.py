"""cross_entropy, linear_cross_entropy and mlm_loss: every backend against torch's F.cross_entropy.

Truth is torch in float64 (plus the z-loss term written out); half precision is judged against plain torch
computing the same loss in the same dtype (tests/compare.py). Shapes stay small (V 50-300): the Triton
interpreter is slow.
"""

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import backend
from ptm_kernels.ops.losses import default_chunk_rows

from ..compare import assert_close
from ..conftest import DEVICE, backend_params
from .common import DTYPES

IGNORE = -100
# (label_smoothing, z_loss) pairs: plain, smoothing, z-loss, both
OPTIONS = [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)]


def _labels(N, V, ignored=0.25):
    """Random labels with about `ignored` of the rows set to ignore_index; the first row always labelled
    (a "mean" over no row is NaN: tested on its own)."""
    y = torch.randint(0, V, (N,), device=DEVICE)
    drop = torch.rand(N, device=DEVICE) < ignored
    drop[:1] = False
    return torch.where(drop, torch.full_like(y, IGNORE), y)


def torch_loss(logits, labels, smoothing, z_loss, reduction, ignore_index=IGNORE):
    """What the op promises, in plain torch in logits' dtype: F.cross_entropy plus the z-loss term."""
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=smoothing, reduction="none")
    if z_loss > 0:
        valid = labels != ignore_index
        loss = loss + torch.where(valid, z_loss * torch.logsumexp(logits, -1) ** 2, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    total = loss.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum()


def _loss_and_grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    loss = fn(*inputs)
    grads = torch.autograd.grad((loss.double() * grad_out).sum(), [t for t in inputs if t.requires_grad])
    return loss, grads


def _compare(impl, kernel_fn, torch_fn, inputs, dtype, name):
    """Kernel on `impl` vs torch in float64 (truth) and in `dtype` (the half-precision yardstick)."""
    to64 = [t.double() if t.is_floating_point() else t for t in inputs]
    truth_shape = torch_fn(*to64).shape
    grad_out = torch.randn(truth_shape, device=DEVICE, dtype=torch.float64)
    with backend.use(impl):
        loss, grads = _loss_and_grads(kernel_fn, inputs, grad_out)
    truth, truth_grads = _loss_and_grads(torch_fn, to64, grad_out)
    base, base_grads = _loss_and_grads(torch_fn, inputs, grad_out)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype, f"{name}: loss dtype {loss.dtype}, expected {expected_dtype}"
    assert_close(loss, truth, base, name=f"{name} loss", precision=dtype)
    floats = [t for t in inputs if t.is_floating_point()]
    for i, (g, t, b, x) in enumerate(zip(grads, truth_grads, base_grads, floats)):
        assert g.dtype == x.dtype, f"{name} grad {i}: dtype {g.dtype}, expected {x.dtype}"
        assert_close(g, t, b, name=f"{name} grad of input {i}", precision=dtype)


# ------------------------------------------------------------------------------------------ cross_entropy


def _shapes(impl):
    """(N, V) cases: V = 1, and V not a multiple of any kernel's block (the Triton loop runs at a lowered
    block size, see the fixture below); fewer rows for the slow Triton interpreter."""
    if impl == "triton" and backend.triton_interpreted():
        return [(3, 1), (16, 300)]
    return [(3, 1), (64, 50), (17, 300), (4, 5000)]


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Triton loops over V in blocks of MAX_BLOCK columns: make V = 300 take three (partial last) steps."""
    try:
        from ptm_kernels.triton import losses as triton_losses
    except Exception:  # triton unavailable: its tests are skipped anyway
        return
    monkeypatch.setattr(triton_losses, "MAX_BLOCK", 128)


def _kernel_params(op="cross_entropy"):
    """Backends x dtypes; float64 always runs on the reference, so it is tested there only; float16 on the
    C++ and reference backends too (the Triton interpreter is slow, and Triton's float16 path is bfloat16's)."""
    def wanted(impl, dtype):
        if dtype == torch.float64:
            return impl == "reference"
        return dtype in DTYPES or impl in ("cpu", "reference")
    return [pytest.param(impl.values[0], dtype, id=f"{impl.id}-{dtype}", marks=impl.marks)
            for impl in backend_params(op) for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
            if wanted(impl.values[0], dtype)]


@pytest.mark.parametrize("impl, dtype", _kernel_params())
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"ls{o[0]}-z{o[1]}")
def test_cross_entropy_vs_torch(impl, dtype, options):
    """Per-row losses (reduction="none") and the logits' gradient for random per-row loss gradients: what
    every reduction is made of. The reductions themselves are tested below."""
    smoothing, z_loss = options
    for N, V in _shapes(impl):
        logits = (torch.randn(N, V, device=DEVICE) * 3).to(dtype)  # scaled: peaked softmax rows
        labels = _labels(N, V)
        _compare(impl, lambda x, y: pk.cross_entropy(x, y, label_smoothing=smoothing, z_loss=z_loss, reduction="none"),
                 lambda x, y: torch_loss(x, y, smoothing, z_loss, "none"),
                 [logits, labels], dtype, f"{impl} cross_entropy[{N}x{V}]")


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_reductions(impl, reduction):
    logits = torch.randn(20, 70, device=DEVICE)
    labels = _labels(20, 70)
    _compare(impl, lambda x, y: pk.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3, reduction=reduction),
             lambda x, y: torch_loss(x, y, 0.1, 1e-3, reduction), [logits, labels], torch.float32,
             f"{impl} cross_entropy[{reduction}]")


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
def test_cross_entropy_leading_dims_and_ignore_index(impl):
    """logits [B, L, V] with labels [B, L]; a non-default ignore_index that is itself a valid class id."""
    logits = torch.randn(2, 5, 70, device=DEVICE)
    labels = torch.randint(0, 70, (2, 5), device=DEVICE)
    labels[0, :2] = 3
    with backend.use(impl):
        out = pk.cross_entropy(logits, labels, ignore_index=3, reduction="none")
        mean = pk.cross_entropy(logits, labels, ignore_index=3)
    expected = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=3, reduction="none")
    assert out.shape == labels.shape
    assert_close(out, expected.double(), name="none")
    assert_close(mean, F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=3).double(), name="mean")


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_all_ignored(impl, reduction):
    """Every row ignored: torch gives NaN for "mean" and 0 for "sum", and zero gradients either way."""
    logits = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    labels = torch.full((6,), IGNORE, device=DEVICE)
    with backend.use(impl):
        loss = pk.cross_entropy(logits, labels, label_smoothing=0.1, reduction=reduction)
        loss.backward()
    expected = F.cross_entropy(logits.detach(), labels, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_empty(impl, reduction):
    logits = torch.randn(0, 30, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with backend.use(impl):
        loss = pk.cross_entropy(logits, labels, reduction=reduction)
        loss.sum().backward()
    expected = F.cross_entropy(logits.detach(), labels, reduction=reduction)
    assert loss.shape == expected.shape
    torch.testing.assert_close(loss, expected, equal_nan=True)
    assert logits.grad.shape == (0, 30)


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_nonfinite_like_torch(impl, smoothing):
    """NaN and +-Inf logits give torch's NaN / Inf losses, and NaN gradients where torch's are NaN."""
    V = 20
    logits = torch.randn(6, V, device=DEVICE)
    labels = torch.tensor([1, 2, 3, 4, 5, 6], device=DEVICE)
    logits[0, 7] = float("nan")       # NaN anywhere in the row
    logits[1, 2] = float("inf")       # +inf at the label: inf - inf
    logits[2, 9] = float("inf")       # +inf elsewhere
    logits[3, 4] = float("-inf")      # -inf at the label
    logits[4, 0] = float("-inf")      # -inf elsewhere: finite loss (infinite with smoothing)
    with backend.use(impl):
        out = pk.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(out, expected, equal_nan=True)
    # gradients of the rows with a NaN logit are NaN in both; the finite rows agree
    x = logits.clone().requires_grad_(True)
    with backend.use(impl):
        pk.cross_entropy(x, labels, label_smoothing=smoothing, reduction="sum").backward()
    x_t = logits.clone().requires_grad_(True)
    F.cross_entropy(x_t, labels, label_smoothing=smoothing, reduction="sum").backward()
    assert torch.isnan(x.grad[0]).all() and torch.isnan(x_t.grad[0]).all()
    torch.testing.assert_close(x.grad[5], x_t.grad[5])


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("bad", [50, -1, -101])
def test_cross_entropy_label_out_of_range_raises(impl, bad):
    logits = torch.randn(4, 50, device=DEVICE)
    labels = torch.tensor([0, bad, 2, IGNORE], device=DEVICE)
    with pytest.raises(IndexError):
        F.cross_entropy(logits, labels)  # torch raises the same type
    with backend.use(impl), pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
        pk.cross_entropy(logits, labels)
    if impl == "cpu":  # the C++ kernel checks too: it indexes rows by label
        with pytest.raises(IndexError, match="out of bounds"):
            backend.module("cpu").cross_entropy_fwd(logits, labels, IGNORE, 0.0, 0.0)


def test_cross_entropy_bad_arguments():
    logits = torch.randn(4, 10, device=DEVICE)
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    with pytest.raises(TypeError, match="labels must be int64"):
        pk.cross_entropy(logits, labels.int())
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        pk.cross_entropy(logits, labels[:3])
    with pytest.raises(ValueError, match="reduction must be one of"):
        pk.cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        pk.cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        pk.cross_entropy(logits, labels, z_loss=-1.0)
    with pytest.raises(TypeError, match="logits must have dtype"):
        pk.cross_entropy(logits.long(), labels)
    with pytest.raises(ValueError, match="at least one class"):
        pk.cross_entropy(logits[:, :0], labels)


def test_cross_entropy_gradcheck_float64():
    """The registered backward against finite differences (double backward is not offered)."""
    logits = torch.randn(7, 11, device=DEVICE, dtype=torch.float64, requires_grad=True)
    labels = _labels(7, 11)
    labels[0] = IGNORE
    for (smoothing, z_loss), reduction in [(OPTIONS[3], "mean"), (OPTIONS[0], "none")]:
        assert torch.autograd.gradcheck(
            lambda x: pk.cross_entropy(x, labels, label_smoothing=smoothing, z_loss=z_loss, reduction=reduction),
            (logits,))


# ----------------------------------------------------------------------------------- linear_cross_entropy


def _unfused(h, w, y, b=None, **kw):
    logits = h @ w.t() if b is None else h @ w.t() + b
    return pk.cross_entropy(logits, y, **kw)


def _torch_linear(h, w, y, b, smoothing, z_loss, reduction):
    logits = F.linear(h, w, b)
    return torch_loss(logits, y, smoothing, z_loss, reduction)


# (reduction, bias, label_smoothing, z_loss): "none" runs the backward op's second chunked pass
LINEAR_CASES = [("mean", True, 0.1, 1e-3), ("sum", False, 0.0, 0.0), ("none", True, 0.0, 1e-3)]


@pytest.mark.parametrize("impl, dtype", _kernel_params())
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}-{'bias' if c[1] else 'no_bias'}")
def test_linear_cross_entropy_vs_unfused(impl, dtype, case):
    """Value and gradients of hidden, weight and bias against matmul + F.cross_entropy, over several chunks
    (the last one partial)."""
    reduction, bias, smoothing, z_loss = case
    N, D, V = (24 if impl == "triton" else 64), 24, 130
    h = torch.randn(N, D, device=DEVICE).to(dtype)
    w = (torch.randn(V, D, device=DEVICE) / D ** 0.5).to(dtype)
    b = torch.randn(V, device=DEVICE).to(dtype) if bias else None
    y = _labels(N, V)
    inputs = [h, w, y] + ([b] if bias else [])
    kernel = lambda h, w, y, b=None: pk.linear_cross_entropy(h, w, y, b, label_smoothing=smoothing, z_loss=z_loss,
                                                             reduction=reduction, chunk_size=10)
    # Plain torch computes the logits in dtype (rounded), then the loss: the yardstick for half precision.
    ref = lambda h, w, y, b=None: _torch_linear(h, w, y, b, smoothing, z_loss, reduction)
    _compare(impl, kernel, ref, inputs, dtype, f"{impl} linear_cross_entropy[{reduction}]")


@pytest.mark.parametrize("impl", backend_params("cross_entropy"))
@pytest.mark.parametrize("wants", [(True, False, False), (False, True, True), (False, False, False)],
                         ids=["hidden_only", "weight_bias_only", "none"])
def test_linear_cross_entropy_grads_only_where_required(impl, wants):
    N, D, V = 20, 16, 60
    h = torch.randn(N, D, device=DEVICE, requires_grad=wants[0])
    w = torch.randn(V, D, device=DEVICE, requires_grad=wants[1])
    b = torch.randn(V, device=DEVICE, requires_grad=wants[2])
    y = _labels(N, V)
    with backend.use(impl):
        loss = pk.linear_cross_entropy(h, w, y, b, chunk_size=7)
    expected = F.cross_entropy(F.linear(h, w, b), y)
    assert_close(loss, expected.double(), name="loss")
    if not any(wants):
        assert not loss.requires_grad
        return
    loss.backward()
    fused = [t.grad for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    expected.backward()
    for name, g, t, want in zip(("hidden", "weight", "bias"), fused, (h, w, b), wants):
        if want:
            assert_close(g, t.grad.double(), name=f"grad of {name}")
        else:
            assert g is None, f"{name} does not require grad but got one"


def test_linear_cross_entropy_grads_match_torch_exactly_in_float64():
    """Leading dims, no_grad, default chunking and the backward's scaling by a non-unit gradient."""
    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (3, 5))
    loss = pk.linear_cross_entropy(h, w, y)
    (3.0 * loss).backward()
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    (3.0 * F.cross_entropy(h2.reshape(-1, 8) @ w2.t(), y.reshape(-1))).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():
        assert not pk.linear_cross_entropy(h, w, y).requires_grad


def test_linear_cross_entropy_gradcheck_float64():
    h = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    y = _labels(5, 7)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: pk.linear_cross_entropy(h, w, y, b, label_smoothing=0.1, z_loss=0.01,
                                                    reduction=reduction, chunk_size=2), (h, w, b))


def test_linear_cross_entropy_default_chunks():
    """Liger's rule (a chunk's logits about as large as the hidden states), with at least 256 rows a chunk."""
    assert default_chunk_rows(16384, 4096, 32000) == 2048     # 16384 / ceil(32000 / 4096) = 2048
    assert default_chunk_rows(1024, 512, 32000) == 256        # Liger's 32 rows, raised to the minimum
    assert default_chunk_rows(100, 512, 32000) == 128         # fewer rows than the minimum: one chunk
    assert default_chunk_rows(5, 64, 10) == 8                 # V <= D: one chunk
    for N, D, V in [(16384, 4096, 32000), (8192, 4096, 128256), (65536, 768, 30522)]:
        ratio = default_chunk_rows(N, D, V) * V / (N * D)
        assert 0.5 <= ratio <= 2.0, (N, D, V, ratio)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_empty(reduction):
    h = torch.randn(0, 8, requires_grad=True, device=DEVICE)
    w = torch.randn(30, 8, requires_grad=True, device=DEVICE)
    y = torch.zeros(0, dtype=torch.long, device=DEVICE)
    loss = pk.linear_cross_entropy(h, w, y, reduction=reduction)
    expected = F.cross_entropy(h.detach() @ w.detach().t(), y, reduction=reduction)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


def test_linear_cross_entropy_bad_arguments():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"weight must have shape \[V, 8\]"):
        pk.linear_cross_entropy(h, w[:, :5], y)
    with pytest.raises(TypeError, match="weight has dtype"):
        pk.linear_cross_entropy(h, w.double(), y)
    with pytest.raises(ValueError, match=r"bias must have shape \(10,\)"):
        pk.linear_cross_entropy(h, w, y, torch.randn(9))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        pk.linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(IndexError, match="out of bounds"):
        pk.linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))


# ------------------------------------------------------------------------------------------------ mlm_loss


def test_mlm_loss_vs_head_on_every_row():
    B, L, D, V = 2, 12, 16, 90
    hidden = torch.randn(B, L, D, requires_grad=True)
    labels = _labels(B * L, V, ignored=0.8).view(B, L)
    labels[0, 0] = 5  # at least one labelled row
    transform = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.GELU(), torch.nn.LayerNorm(D))
    w = torch.randn(V, D, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    loss = pk.mlm_loss(hidden, labels, transform, w, b, label_smoothing=0.1)
    params = [hidden, w, b, *transform.parameters()]
    grads = torch.autograd.grad(loss, params)
    expected = F.cross_entropy(F.linear(transform(hidden), w, b).view(-1, V), labels.view(-1), label_smoothing=0.1)
    expected_grads = torch.autograd.grad(expected, params)
    assert_close(loss, expected.double(), name="mlm loss")
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e.double(), name=f"mlm grad {i}")


def test_mlm_loss_no_labelled_row_is_zero_with_zero_grads():
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 6), IGNORE)
    loss = pk.mlm_loss(hidden, labels, None, w)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(TypeError, match="unexpected keyword"):
        pk.mlm_loss(hidden, labels, None, w, reduction="sum")


# ----------------------------------------------------------------------------------- op contract, compile


def _opcheck_cases():
    N, D, V = 10, 8, 37
    logits = torch.randn(N, V, device=DEVICE, requires_grad=True)
    y = _labels(N, V)
    h = torch.randn(N, D, device=DEVICE, requires_grad=True)
    w = torch.randn(V, D, device=DEVICE, requires_grad=True)
    b = torch.randn(V, device=DEVICE, requires_grad=True)
    lse = torch.logsumexp(logits.detach(), -1)
    ops = torch.ops.ptm
    return {
        "cross_entropy": (ops.cross_entropy.default, (logits, y, IGNORE, 0.1, 1e-3)),
        "cross_entropy_bf16": (ops.cross_entropy.default, (logits.detach().bfloat16(), y, IGNORE, 0.0, 0.0)),
        "cross_entropy_backward": (ops.cross_entropy_backward.default,
                                   (torch.rand(N, device=DEVICE), logits.detach(), y, lse, IGNORE, 0.1, 1e-3)),
        "linear_cross_entropy": (ops.linear_cross_entropy.default,
                                 (h, w, y, b, IGNORE, 0.1, 1e-3, "mean", 4, True, True, True)),
        "linear_cross_entropy_sum_no_bias": (ops.linear_cross_entropy.default,
                                             (h, w, y, None, IGNORE, 0.0, 0.0, "sum", 3, False, True, False)),
        "linear_cross_entropy_none": (ops.linear_cross_entropy.default,
                                      (h, w, y, b, IGNORE, 0.0, 0.0, "none", 4, True, True, True)),
        "linear_cross_entropy_backward": (ops.linear_cross_entropy_backward.default,
                                          (torch.rand(N, device=DEVICE), h.detach(), w.detach(), y, b.detach(),
                                           IGNORE, 0.1, 0.0, 4, True, True, True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_compile_fullgraph():
    """A small LM head + losses under torch.compile(fullgraph=True): same loss and gradients as eager."""
    N, D, V = 16, 8, 50

    def step(h, w, logits, y):
        return (pk.linear_cross_entropy(h, w, y, label_smoothing=0.1)
                + pk.cross_entropy(logits, y, z_loss=1e-3, reduction="sum") / N)

    h = torch.randn(N, D, device=DEVICE, requires_grad=True)
    w = torch.randn(V, D, device=DEVICE, requires_grad=True)
    logits = torch.randn(N, V, device=DEVICE, requires_grad=True)
    y = _labels(N, V)
    eager = step(h, w, logits, y)
    eager_grads = torch.autograd.grad(eager, (h, w, logits))
    # aot_eager: dynamo and AOTAutograd trace the same graph as inductor would (the ops as single nodes, their
    # fakes, the autograd formulas) without inductor's C++ code generation, ~20 s on 2 cores
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(h, w, logits, y)
    compiled_grads = torch.autograd.grad(compiled, (h, w, logits))
    torch.testing.assert_close(compiled, eager)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e)
