"""NaN, ±inf, ±0 and the largest finite value: every op gives what torch's own functions give, on every backend.

Elementwise ops, norms and RoPE: a table of special values, each planted among random ones, compared with
torch's functions (F.gelu, F.silu, F.rms_norm, F.layer_norm, the rotate-half formula), forward and backward.
Attention: a NaN or Inf in q, k, v or a bias against torch's SDPA (math path), with and without masks; a row
with no visible key still gives zeros.

The yardstick is torch evaluated two ways: in the inputs' dtype, and in float64 (then rounded to the dtype).
Each element must match one of them: the same NaN, the same infinity, or a finite value within rounding. The
two differ only where an intermediate overflows in the low precision, and there torch's own kernels are not
consistent either: float32 gelu(+inf) is NaN and gelu(max) is inf on the CPU, while float64 follows the
formula; float32 gelu_tanh'(max) is NaN (max^3 overflows), float64 gives 1. A kernel matching neither (say
gelu(-inf) = -inf where both give NaN) fails.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import AttentionMask, backend

from ..conftest import DEVICE, backend_params
from .common import leaf

DTYPES = [torch.float32, torch.bfloat16]
# NaN and inf are the point here: numpy (behind the Triton interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def specials(dtype):
    big = torch.finfo(dtype).max
    return {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "+0": 0.0, "-0": -0.0, "max": big, "-max": -big}


def _matches(a, e, rtol):
    """Element-wise: a is e (both NaN, the same infinity, or finite and within rtol relative / absolute)."""
    both_nan = torch.isnan(a) & torch.isnan(e)
    same_inf = torch.isinf(a) & (a == e)
    fin = torch.isfinite(a) & torch.isfinite(e)
    close = fin & ((a - e).abs() <= rtol * (1 + e.abs()))
    return both_nan | same_inf | close


def assert_matches_torch(actual, *expected, name):
    """actual matches one of the expected tensors (torch in the dtype, in float64, ...), element by element."""
    for e in expected:
        assert actual.shape == e.shape and actual.dtype == e.dtype, (
            f"{name}: {actual.dtype}{tuple(actual.shape)} vs torch's {e.dtype}{tuple(e.shape)}")
    # float32: the kernels' ~1e-6 relative error (their exp/erf approximations); half: a rounding step or
    # two (ours round a float32 result once, torch's composed ops round each step).
    rtol = 1e-5 if actual.dtype == torch.float32 else 2 * torch.finfo(actual.dtype).eps
    a = actual.double()
    ok = torch.zeros(a.shape, dtype=torch.bool, device=a.device)
    for e in expected:
        ok |= _matches(a, e.double(), rtol)
    bad = (~ok).nonzero()[:4]
    assert ok.all(), (f"{name}: {int((~ok).sum())} elements differ from torch, e.g. at {bad.tolist()}: ours "
                      f"{[a[tuple(i)].item() for i in bad]}, torch "
                      f"{[[e[tuple(i)].item() for i in bad] for e in expected]}")


def _run(fn, inputs, dy, impl=None):
    """fn's output and its inputs' gradients for the output gradient dy (on backend impl, if given)."""
    ins = [leaf(t) for t in inputs]
    with backend.use(impl) if impl else contextlib.nullcontext():
        out = fn(*ins)
        return out, torch.autograd.grad(out, ins, dy.to(out.dtype))


def compare_with_torch(impl, ours, theirs, inputs, name, grads=True):
    """ours/theirs(*inputs) -> a tensor: the outputs and the inputs' gradients for a random output gradient.

    theirs may be a tuple of torch formulations that differ only in where 0 * NaN happens (each is evaluated
    in the dtype and in float64; every element must match one)."""
    with backend.use(impl):
        shape = ours(*inputs).shape
    dy = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    out, g = _run(ours, inputs, dy, impl)
    runs = [_run(fn, ins, dy) for fn in (theirs if isinstance(theirs, tuple) else (theirs,))
            for ins in (inputs, [t.double() for t in inputs])]
    assert_matches_torch(out, *(o.to(out.dtype) for o, _ in runs), name=f"{name} forward")
    if grads:
        for i, a in enumerate(g):
            assert_matches_torch(a, *(gs[i].to(a.dtype) for _, gs in runs), name=f"{name} grad of input {i}")


def elementwise_input(dtype, cols=19):
    """One row per special value, the value at a different column each time, random elsewhere; plus a row of
    all of them side by side (so vectorised and scalar tails of the kernels both meet them)."""
    vals = list(specials(dtype).values())
    x = (torch.randn(len(vals) + 1, cols, device=DEVICE) * 3).to(dtype)
    for r, v in enumerate(vals):
        x[r, (3 * r + 1) % cols] = v
    x[-1, : len(vals)] = torch.tensor(vals, dtype=dtype)
    return x


def row_input(dtype, value, cols=37):
    """Rows for a norm: random, one row with `value` planted, one with it twice (so a row of two ±inf of
    opposite signs is met too)."""
    x = (torch.randn(3, cols, device=DEVICE) * 2 + 0.3).to(dtype)
    x[1, 5] = value
    x[2, 2], x[2, 30] = value, -value if value == value else value
    return x


# ------------------------------------------------------------------------------------------- elementwise

# name: (ours, torch's, the second input: None, "bias" or "up"); the special values go in each input in turn
ACTIVATIONS = {
    "gelu": (pk.gelu, F.gelu, None),
    "gelu_tanh": (lambda x: pk.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), None),
    "silu": (pk.silu, F.silu, None),
    "bias_gelu": (lambda x, b: pk.bias_gelu(x, b), lambda x, b: F.gelu(x + b), "bias"),
    "bias_gelu_tanh": (lambda x, b: pk.bias_gelu(x, b, "tanh"),
                       lambda x, b: F.gelu(x + b, approximate="tanh"), "bias"),
    "swiglu": (lambda g, u: pk.swiglu(g, u), lambda g, u: F.silu(g) * u, "up"),
    "geglu": (lambda g, u: pk.geglu(g, u, "none"), lambda g, u: F.gelu(g) * u, "up"),
    "geglu_tanh": (lambda g, u: pk.geglu(g, u), lambda g, u: F.gelu(g, approximate="tanh") * u, "up"),
}


@pytest.mark.parametrize("impl", backend_params("activation"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(ACTIVATIONS))
def test_activation_special_values(impl, dtype, op):
    ours, theirs, second = ACTIVATIONS[op]
    x = elementwise_input(dtype)
    if second is None:
        compare_with_torch(impl, ours, theirs, [x], op)
        return
    if second == "bias":  # the specials in x, then in the bias (its last row: all of them)
        b = torch.randn(x.shape[1], device=DEVICE).to(dtype)
        compare_with_torch(impl, ours, theirs, [x, b], f"{op} (specials in x)")
        y = (torch.randn(x.shape, device=DEVICE) * 3).to(dtype)
        compare_with_torch(impl, ours, theirs, [y, x[-1].clone()], f"{op} (specials in the bias)")
    else:  # the specials in gate, then in up
        other = (torch.randn(x.shape, device=DEVICE) * 2).to(dtype)
        compare_with_torch(impl, ours, theirs, [x, other], f"{op} (specials in gate)")
        # Gates in [0.5, 2.5) here: act'(gate) is then accurate to float32's relative precision. Deep in the
        # negative tail act' is tiny, and its absolute float32 error (~1e-7), times up = max, is no rounding.
        gate = (torch.rand(x.shape, device=DEVICE) * 2 + 0.5).to(dtype)
        compare_with_torch(impl, ours, theirs, [gate, x], f"{op} (specials in up)")


# -------------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("impl", backend_params("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", ["nan", "+inf", "-inf", "-0", "max", "-max"])
def test_rms_norm_special_values(impl, dtype, value):
    x = row_input(dtype, specials(dtype)[value])
    w = (torch.rand(x.shape[1], device=DEVICE) + 0.5).to(dtype)
    compare_with_torch(impl, lambda x, w: pk.rms_norm(x, w, 1e-6),
                       lambda x, w: F.rms_norm(x, (x.shape[1],), w, 1e-6), [x, w], f"rms_norm[{value}]")


@pytest.mark.parametrize("impl", backend_params("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", ["nan", "+inf", "-inf", "-0", "max", "-max"])
def test_layer_norm_special_values(impl, dtype, value):
    x = row_input(dtype, specials(dtype)[value])
    w = (torch.rand(x.shape[1], device=DEVICE) + 0.5).to(dtype)
    b = torch.randn(x.shape[1], device=DEVICE).to(dtype)
    compare_with_torch(impl, lambda x, w, b: pk.layer_norm(x, w, b, 1e-5),
                       lambda x, w, b: F.layer_norm(x, (x.shape[1],), w, b, 1e-5), [x, w, b],
                       f"layer_norm[{value}]")


# --------------------------------------------------------------------------------------------------- rope


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("impl", backend_params("rope"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_special_values(impl, dtype):
    """Position 0 has sin = 0: an infinite partner gives inf * 0 = NaN there, as in the formula."""
    D = 16
    cos, sin = pk.rope_cos_sin(D, 64)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    x = elementwise_input(dtype, cols=D)  # [8, D]: one row per special, and one with all of them
    q = x.view(1, 1, *x.shape)  # positions 0..7
    L = q.shape[2]
    c = torch.cat([cos[:L], cos[:L]], -1)  # the HF layout: cos/sin repeated over both halves
    s = torch.cat([sin[:L], sin[:L]], -1)
    compare_with_torch(impl, lambda q: pk.rope(q, None, cos, sin),
                       lambda q: q * c.to(q.dtype) + _rotate_half(q) * s.to(q.dtype), [q], "rope")


# ---------------------------------------------------------------------------------------------- attention
# Each case plants one value in q, k, v or an additive bias. Without a mask the expected result is torch's
# SDPA (math path) itself, forward and backward. With a mask, torch's math path adds the mask as -inf, so a
# NaN score at a hidden key still poisons its row (NaN + -inf); the kernels (like torch's flash kernel) skip
# hidden keys instead: the expected row is torch's SDPA over the keys the row sees, zeros when it sees none.
L_ATT, D_ATT = 16, 16
PLACES = {"q": (0, 0, 5, 3), "k": (0, 1, 9, 7), "v": (0, 0, 9, 2), "bias": (0, 1, 5, 9)}


def _attention_inputs(place, value):
    q, k, v = (torch.randn(1, 2, L_ATT, D_ATT, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 2, L_ATT, L_ATT, device=DEVICE)
    ts = dict(q=q, k=k, v=v, bias=bias)
    ts[place][PLACES[place]] = value
    return [q, k, v, bias]


def _torch_math_sdpa(q, k, v, bias):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _torch_rows_over_visible_keys(vis):
    """Row by row: torch's SDPA over the keys the row sees; zeros for a row that sees none."""
    def fn(q, k, v, bias):
        rows = []
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = vis[0, 0, i].nonzero()[:, 0]
                if len(keys) == 0:
                    rows.append(torch.zeros_like(q[0, h, i]))
                    continue
                rows.append(_torch_math_sdpa(q[0, h, i][None, None, None], k[0, h][keys][None, None],
                                             v[0, h][keys][None, None], bias[0, h, i][keys][None, None, None]
                                             )[0, 0, 0])
        return torch.stack(rows).view(q.shape)
    return fn


def _masks():
    """name -> (AttentionMask, bool [1, 1, L, L] visibility); "padded" hides every key from row 2."""
    i = torch.arange(L_ATT, device=DEVICE)
    causal = (i[None, :] <= i[:, None])[None, None]
    dense = torch.rand(1, 1, L_ATT, L_ATT, device=DEVICE) > 0.3
    dense[..., 2, :] = False
    keys = i < L_ATT - 5
    return {"causal": (AttentionMask.causal(), causal),
            "padded": (AttentionMask.dense(dense) & AttentionMask.key_padding(lengths=torch.tensor([L_ATT - 5])),
                       dense & keys)}


def _ours(mask=None):
    def fn(q, k, v, bias):
        m = AttentionMask.bias(bias)
        return pk.attention(q, k, v, m if mask is None else mask & m)
    return fn


@pytest.mark.parametrize("impl", backend_params("attention"))
@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize("value", ["nan", "+inf", "-inf"])
def test_attention_special_values_match_torch_sdpa(impl, place, value):
    compare_with_torch(impl, _ours(), _torch_math_sdpa, _attention_inputs(place, specials(torch.float32)[value]),
                       f"attention[{value} in {place}]")


@pytest.mark.parametrize("impl", backend_params("attention"))
@pytest.mark.parametrize("place", ["q", "k", "bias"])
@pytest.mark.parametrize("value", ["nan", "+inf"])
@pytest.mark.parametrize("mask_name", ["causal", "padded"])
def test_attention_special_values_under_masks(impl, place, value, mask_name):
    """Rows that see the bad score are NaN, rows that do not are untouched, a row that sees no key gives zeros
    (and a zero gradient when the bad value is not in k). Forward only, and v is left out: a NaN in v or k at
    a hidden key reaches other rows' results or gradients through 0 * NaN in the products of a tile that holds
    it, in the kernels as in torch's own (its math and flash CPU kernels both do it)."""
    mask, vis = _masks()[mask_name]
    inputs = _attention_inputs(place, specials(torch.float32)[value])
    compare_with_torch(impl, _ours(mask), _torch_rows_over_visible_keys(vis), inputs,
                       f"attention[{value} in {place}, {mask_name}]", grads=False)
    if mask_name == "padded":
        ins = [leaf(t) for t in inputs]
        with backend.use(impl):
            out = _ours(mask)(*ins)
            assert (out[:, :, 2] == 0).all(), "a row that sees no key must give zeros"
            if place != "k":
                dq = torch.autograd.grad(out, ins[0], torch.randn(out.shape, device=DEVICE))[0]
                assert (dq[:, :, 2] == 0).all(), "a row that sees no key must have a zero gradient"


# ------------------------------------------------------------------------------------- relative attention
# Lq = Lk = L, r with R = 2L rows and r_offset = Lk (XLNet's layout): every pair (i, j) reads row
# t = Lk - (i - j) of r, so the op is torch's SDPA with the position term qv_i . r[t] as an additive bias.
REL_PLACES = {"q": (0, 0, 5, 3), "k": (0, 1, 9, 7), "v": (0, 0, 9, 2), "r": (1, 30, 4)}


def _relative_inputs(place, value):
    q, k, v = (torch.randn(1, 2, L_ATT, D_ATT, device=DEVICE) for _ in range(3))
    r = torch.randn(2, 2 * L_ATT, D_ATT, device=DEVICE)
    dict(q=q, k=k, v=v, r=r)[place][REL_PLACES[place]] = value
    return [q, k, v, r]


def _relative_index():
    i = torch.arange(L_ATT, device=DEVICE)
    return L_ATT - (i[:, None] - i[None, :])  # t(i, j): [Lq, Lk], all inside [0, 2L)


def _position_every_row(q, r):
    """As transformers' XLNet computes it: every query against every row of r, then pair (i, j) picks t(i, j).
    A NaN in q reaches every row's gradient of r (through 0 * NaN)."""
    every = q @ r.transpose(-1, -2)  # [B, H, Lq, R]
    return every.gather(-1, _relative_index().expand(*every.shape[:2], -1, -1)) / math.sqrt(D_ATT)


def _position_used_rows(q, r):
    """Each pair against its own row of r only: a NaN in q reaches only the rows its pairs use. The kernels'
    band products lie in between (rows a tile's pairs use, and some next to them)."""
    return torch.einsum("bhid,hijd->bhij", q, r[:, _relative_index()]) / math.sqrt(D_ATT)


def _torch_relative(position_fn):
    return lambda q, k, v, r: _torch_math_sdpa(q, k, v, position_fn(q, r))


TORCH_RELATIVE = (_torch_relative(_position_every_row), _torch_relative(_position_used_rows))


@pytest.mark.parametrize("impl", backend_params("relative_attention"))
@pytest.mark.parametrize("place", list(REL_PLACES))
@pytest.mark.parametrize("value", ["nan", "+inf"])
def test_relative_attention_special_values_match_torch(impl, place, value):
    inputs = _relative_inputs(place, specials(torch.float32)[value])
    compare_with_torch(impl, lambda q, k, v, r: pk.relative_attention(q, k, v, r, r_offset=L_ATT), TORCH_RELATIVE,
                       inputs, f"relative_attention[{value} in {place}]")


@pytest.mark.parametrize("impl", backend_params("relative_attention"))
@pytest.mark.parametrize("place", ["q", "k"])
def test_two_stream_attention_special_values_match_torch(impl, place):
    """Both streams at once: the content stream reads q, the query stream a second q (the NaN in q is in the
    content stream only); each is the relative attention formula."""
    q, k, v, r = _relative_inputs(place, math.nan)
    q_query = torch.randn(q.shape, device=DEVICE)

    def ours(q, qg, k, v, r):
        h, g = pk.two_stream_attention(q, qg, k, v, r, r_offset=L_ATT)
        return torch.stack([h, g])

    def theirs(rel):
        return lambda q, qg, k, v, r: torch.stack([rel(q, k, v, r), rel(qg, k, v, r)])

    compare_with_torch(impl, ours, tuple(theirs(rel) for rel in TORCH_RELATIVE), [q, q_query, k, v, r],
                       f"two_stream_attention[nan in {place}]")


@pytest.mark.parametrize("impl", backend_params("relative_attention"))
@pytest.mark.parametrize("place", ["k", "r"])
def test_relative_attention_special_values_under_a_mask(impl, place):
    """Causal, and row 2 sees no key: rows that see the NaN are NaN, the others untouched, row 2 zeros."""
    _, causal = _masks()["causal"]
    vis = causal.clone()
    vis[..., 2, :] = False
    inputs = _relative_inputs(place, math.nan)

    def ours(q, k, v, r):
        return pk.relative_attention(q, k, v, r, r_offset=L_ATT, mask=AttentionMask.dense(vis))

    def theirs(q, k, v, r):
        return _torch_rows_over_visible_keys(vis)(q, k, v, _position_used_rows(q, r))

    compare_with_torch(impl, ours, theirs, inputs, f"relative_attention[nan in {place}, masked]", grads=False)
    with backend.use(impl):
        assert (ours(*inputs)[:, :, 2] == 0).all(), "a row that sees no key must give zeros"
