"""Property test: `ptm_kernels.scaled_dot_product_attention` behaves like torch's, for random arguments.

Each case draws q/k/v shapes (2-D to 5-D, GQA, Lq != Lk, empty dims, head dims 8 to 300, value head dims that
differ), a dtype, an attn_mask of any rank (bool, float, float with -inf, wrong sizes and dtypes), is_causal,
scale and NaN inputs, from the test's seed. Then:

- torch raises  -> the drop-in raises the same exception type;
- the drop-in handed the call to torch (counted in ptm_kernels.fallbacks) -> exactly torch's result;
- else the kernels ran -> torch's result within tolerance: float32/float64 within ~1e-5 of float64 truth,
  half precision within 2x torch's own error in that dtype plus a rounding unit (tests/compare.py).

What torch 2.13 on CPU gives, checked here and matched:
- a query row that sees no key gives zeros, whatever hides the keys: a bool mask, a float mask of -inf, or a
  float mask with other values and a row of -inf (torch >= 2.5's safe softmax; older torch gave NaN), in its
  fused CPU kernel and in its math kernel alike;
- a NaN in q, or in k or v at a key the query sees, makes the query's row NaN (a NaN in v only its column).
One deviation, on purpose: torch's fused CPU kernel (its default on CPU) returns 0 for a query row holding a
NaN when there is no attn_mask (also with is_causal), where its math kernel, and the same call with an
all-True mask, give NaN. The drop-in keeps the NaN, so a case's truth is torch's math kernel. And a torch
bug: its fused CPU kernel returns NaN for is_causal with a negative scale (every row but the last), where its
math kernel and the same call with an explicit lower-triangular mask give numbers; so do we.
Not matched, and so not drawn here: a NaN behind a hidden key. torch's result depends on its kernel (with an
attn_mask a NaN in a hidden key's k or v reaches every row, with is_causal only a NaN in v does); ours depends
on the backend (the kernels skip hidden keys; the reference multiplies a hidden v by an exact 0).
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ptm_kernels as pk
from ptm_kernels import backend, fallbacks

from ..compare import assert_close
from ..conftest import DEVICE, backend_params

OP = "scaled_dot_product_attention"
CASES = {"reference": 1000, "cpu": 1000, "triton": 40, "cuda": 1000}
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny calls: waking a pool of threads for each costs 20x the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interpreted(impl):
    return impl == "triton" and backend.triton_interpreted()


class Case:
    """One random call: its arguments, and a label to reproduce it."""

    def __init__(self, r: random.Random, small: bool, nan: bool = False):
        self.dtype = r.choices([torch.float32, torch.float64, torch.bfloat16, torch.float16],
                               [70, 10, 15, 5])[0]
        rank = r.choices([2, 3, 4, 5], [10, 30, 55, 5])[0]
        lmax = 6 if small else 12
        B, H = r.randint(1, 3), r.choice([1, 2, 4])
        Hk = r.choice([h for h in (1, 2, 4) if H % h == 0]) if r.random() < 0.3 else H
        self.enable_gqa = Hk != H or r.random() < 0.1
        if r.random() < 0.05:  # a GQA ratio torch refuses, or forgetting enable_gqa
            Hk, self.enable_gqa = r.choice([(3, True), (max(H // 2, 1), False)]) if H > 1 else (3, True)
        Lq, Lk = r.randint(1, lmax), r.randint(1, lmax)
        D = r.choice([16, 32, 64]) if r.random() < 0.75 else r.randint(8, 300 if not small else 40)
        Dv = D if r.random() < 0.9 else r.choice([8, 24, D + 1])
        if r.random() < 0.04:  # an empty dimension somewhere
            which = r.choice(["B", "Lq", "Lk", "D", "H"])
            B, Lq, Lk, D, H, Hk = (0 if which == w else x for w, x in
                                   (("B", B), ("Lq", Lq), ("Lk", Lk), ("D", D), ("H", H), ("H", Hk)))
            Dv = D if which == "D" else Dv
        batch = {2: (), 3: (B * H,), 4: (B, H), 5: (2, B, H)}[rank]
        kbatch = {2: (), 3: (B * Hk,), 4: (B, Hk), 5: (2, B, Hk)}[rank]
        if rank == 3 and self.enable_gqa:  # 3-D: the first dim is the heads for GQA
            batch, kbatch = (H,), (Hk,)
        self.q = torch.randn(*batch, Lq, D, device=DEVICE).to(self.dtype)
        self.k = torch.randn(*kbatch, Lk, D, device=DEVICE).to(self.dtype)
        self.v = torch.randn(*kbatch, Lk, Dv, device=DEVICE).to(self.dtype)
        if rank == 4 and r.random() < 0.2:  # [B, L, H, D] projections seen as [B, H, L, D]: other strides
            self.q, self.k, self.v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (self.q, self.k, self.v))
        self.is_causal = r.random() < 0.25
        self.scale = r.choice([None, None, None, 0.3, 1.0, 2, -0.5])
        self.mask_kind = r.choices(["none", "bool", "float", "float_inf", "padding", "wrong_size", "wrong_dtype",
                                    "wrong_rank"], [30, 25, 15, 15, 7, 3, 3, 2])[0]
        self.attn_mask = self._mask(r, batch, H, Lq, Lk)
        self.nan = nan
        if nan:
            self._put_nan(r)
        self.label = (f"{self.dtype} q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)} "
                      f"gqa={self.enable_gqa} mask={self.mask_kind}"
                      f"{tuple(self.attn_mask.shape) if self.attn_mask is not None else ''} "
                      f"causal={self.is_causal} scale={self.scale} nan={self.nan}")

    def _mask(self, r, batch, H, Lq, Lk):
        kind = self.mask_kind
        if kind == "none":
            return None
        full = tuple(batch) + (Lq, Lk)
        if kind == "padding":  # [B, 1, 1, S]: the drop-in turns it into key padding
            if len(full) != 4:
                return torch.rand(Lq, Lk, device=DEVICE) < 0.8
            m = torch.arange(Lk, device=DEVICE) < torch.randint(0, Lk + 1, (full[0], 1, 1, 1), device=DEVICE)
            return m if r.random() < 0.5 else m & (torch.rand(full[0], 1, 1, Lk, device=DEVICE) < 0.8)
        rank = r.randint(5 if kind == "wrong_rank" else 2, 5 if kind == "wrong_rank" else len(full))
        if kind == "wrong_rank" and r.random() < 0.5:
            rank = 1
        shape = list((1,) * max(0, rank - len(full)) + full[len(full) - min(rank, len(full)):])
        for i in range(len(shape) - 2 if rank > 2 else 0):  # broadcast some leading dims
            if r.random() < 0.5:
                shape[i] = 1
        for i in (-1, -2):
            if rank >= -i and r.random() < 0.2:
                shape[i] = 1
        if kind == "wrong_size":
            i = r.randrange(len(shape))
            shape[i] = shape[i] + r.choice([1, 2])
        if kind in ("bool", "wrong_size", "wrong_rank") or (kind == "wrong_dtype" and r.random() < 0.3):
            m = torch.rand(*shape, device=DEVICE) < 0.75
            return m.long() if kind == "wrong_dtype" else m
        dtype = self.dtype
        if kind == "wrong_dtype":
            dtype = torch.float64 if self.dtype != torch.float64 else torch.float32
        m = torch.randn(*shape, device=DEVICE)
        if kind == "float_inf":
            hidden = torch.rand(*shape, device=DEVICE) < 0.3
            m = torch.where(hidden, float("-inf"), m if r.random() < 0.5 else torch.zeros_like(m))
        return m.to(dtype)

    def _put_nan(self, r):
        """One NaN where every query sees it: in q, or in k or v at key 0, which the mask then shows to every
        query (top-left is_causal shows it too). A NaN behind a hidden key is not drawn (see the module docstring)."""
        m = self.attn_mask
        if m is not None and m.dim() >= 1 and m.shape[-1] > 0 and m.dtype in (torch.bool,) + FLOATS:
            m[..., 0] = True if m.dtype == torch.bool else 0.0
        t = r.choice([self.q, self.k, self.v])
        if t.numel():
            rows = t if t is self.q else t[..., :1, :]  # a view: the NaN lands in t
            idx = [r.randrange(n) for n in rows.shape]
            rows[tuple(idx)] = float("nan")

    def args(self):
        return (self.q, self.k, self.v), dict(attn_mask=self.attn_mask, is_causal=self.is_causal, scale=self.scale,
                                              enable_gqa=self.enable_gqa)


def torch_result(case):
    """(output, None) or (None, exception type) of torch's own SDPA."""
    (q, k, v), kw = case.args()
    try:
        return F.scaled_dot_product_attention(q, k, v, **kw), None
    except Exception as exc:  # noqa: BLE001: any exception type must be matched
        return None, type(exc)


def math_kernel(case, dtype):
    """torch's math kernel in `dtype` (NaN propagates there; see the module docstring)."""
    (q, k, v), kw = case.args()
    m = kw["attn_mask"]
    kw = dict(kw, attn_mask=m.to(dtype) if m is not None and m.dtype != torch.bool else m)
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kw)


def check(case, impl):
    expected, torch_exc = torch_result(case)
    (q, k, v), kw = case.args()
    before = sum(n for (op, _), n in fallbacks.counts().items() if op == OP)
    try:
        with backend.use(attention=impl):
            out = pk.scaled_dot_product_attention(q, k, v, **kw)
    except Exception as exc:  # noqa: BLE001
        assert torch_exc is not None, f"{case.label}: raised {type(exc).__name__}: {exc}, torch does not"
        assert type(exc) is torch_exc, f"{case.label}: raised {type(exc).__name__}, torch {torch_exc.__name__}"
        return "raised"
    assert torch_exc is None, f"{case.label}: accepted, torch raises {torch_exc.__name__}"
    fell_back = sum(n for (op, _), n in fallbacks.counts().items() if op == OP) > before
    assert out.shape == expected.shape and out.dtype == expected.dtype, case.label
    if fell_back:
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=case.label)
        return "fallback"
    truth = math_kernel(case, torch.float64)
    nan = truth.isnan()
    assert torch.equal(out.isnan(), nan), f"{case.label}: NaN at other places than torch's math kernel"
    if case.dtype in (torch.bfloat16, torch.float16):  # plain PyTorch's error in this dtype: its math kernel
        baseline = math_kernel(case, case.dtype)  # (the fused one has NaN for is_causal with scale < 0)
        assert_close(out.masked_fill(nan, 0), truth.masked_fill(nan, 0), baseline.masked_fill(nan, 0),
                     name=case.label)
    else:
        assert_close(out.masked_fill(nan, 0), truth.masked_fill(nan, 0), name=case.label, rtol=1e-5, atol=2e-5)
    return "kernel"


@pytest.mark.parametrize("impl", backend_params("attention"))
def test_dropin_matches_torch_on_random_arguments(impl, seed):
    r = random.Random(seed)
    seen = {"raised": 0, "fallback": 0, "kernel": 0}
    for _ in range(CASES[impl]):
        seen[check(Case(r, small=interpreted(impl)), impl)] += 1
    # the draw reaches all three outcomes (a change to Case that loses one fails here)
    assert min(seen.values()) >= (1 if interpreted(impl) else 30), seen
    print(seen)


@pytest.mark.parametrize("impl", backend_params("attention"))
def test_dropin_with_nan_inputs_matches_torch(impl, seed):
    """One NaN in q, k or v where every query sees it; the truth is torch's math kernel (see the docstring)."""
    r = random.Random(seed)
    seen = {"raised": 0, "fallback": 0, "kernel": 0}
    for _ in range(CASES[impl] // 5):
        seen[check(Case(r, small=interpreted(impl), nan=True), impl)] += 1
    assert seen["kernel"] >= (1 if interpreted(impl) else 30), seen


MASK_KINDS = {
    "bool": lambda m: m,
    "float -inf": lambda m: torch.zeros(m.shape, device=DEVICE).masked_fill(~m, float("-inf")),
    "float values and -inf": lambda m: torch.randn(m.shape, device=DEVICE).masked_fill(~m, float("-inf")),
    "key padding [B, 1, 1, S]": None,
}


@pytest.mark.parametrize("impl", backend_params("attention"))
@pytest.mark.parametrize("kind", list(MASK_KINDS))
def test_a_row_that_sees_no_key_gives_zeros_like_torch(kind, impl):
    q, k, v = (torch.randn(2, 2, 6, 16, device=DEVICE) for _ in range(3))
    if MASK_KINDS[kind] is None:
        mask = torch.ones(2, 1, 1, 6, dtype=torch.bool, device=DEVICE)
        mask[1] = False  # batch 1 has no real key
        hidden = (1, slice(None), slice(None))
    else:
        m = torch.rand(6, 6, device=DEVICE) < 0.7
        m[2] = False
        mask = MASK_KINDS[kind](m)
        hidden = (slice(None), slice(None), 2)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with sdpa_kernel([SDPBackend.MATH]):
        math = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with backend.use(attention=impl):
        out = pk.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(expected[hidden], torch.zeros_like(expected[hidden])), "torch's fused kernel changed"
    assert torch.equal(math[hidden], torch.zeros_like(math[hidden])), "torch's math kernel changed"
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))
    assert_close(out, expected.double(), name=kind, rtol=1e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------- fallbacks

FALLBACKS = {
    # reason: arguments torch takes and the kernels do not
    "head dim outside [16, 256]": lambda: [torch.randn(1, 2, 5, 8)] * 3,
    "value head dim != query head dim": lambda: [torch.randn(1, 2, 5, 32)] * 2 + [torch.randn(1, 2, 5, 24)],
    "5-D inputs": lambda: [torch.randn(2, 1, 2, 5, 32)] * 3,
    "an empty dimension": lambda: [torch.randn(1, 2, 0, 32)] * 3,
    "q, k, v shapes the kernels do not take (broadcast batch, different k and v)":
        lambda: [torch.randn(2, 2, 5, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)],
}


@pytest.mark.parametrize("reason", list(FALLBACKS))
def test_fallbacks_are_counted_with_their_reason(reason, caplog):
    q, k, v = (t.to(DEVICE) for t in FALLBACKS[reason]())
    fallbacks.reset()
    with caplog.at_level("DEBUG", logger="ptm_kernels.fallbacks"):
        for _ in range(3):
            out = pk.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert fallbacks.counts() == {(OP, reason): 3}
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "ptm_kernels.fallbacks"]
    assert logged == [f"ptm_kernels: {OP} falls back to PyTorch: {reason}"], "logged once per reason"
    fallbacks.reset()
    assert fallbacks.counts() == {}


def test_no_fallback_inside_the_kernels_range_and_none_counted_for_errors():
    q, k, v = (torch.randn(2, 4, 5, 64, device=DEVICE) for _ in range(3))
    fallbacks.reset()
    pk.scaled_dot_product_attention(q, k[:, :2], v[:, :2], torch.rand(5, 5, device=DEVICE) < 0.8, enable_gqa=True)
    with pytest.raises(RuntimeError):
        pk.scaled_dot_product_attention(q, k[..., :32], v)  # torch raises: head dims differ
    assert fallbacks.counts() == {}


def test_info_shows_the_fallbacks():
    from ptm_kernels import info

    fallbacks.reset()
    pk.scaled_dot_product_attention(*[torch.randn(1, 1, 3, 300, device=DEVICE)] * 3)
    assert info.report()["fallbacks"] == {f"{OP}: head dim outside [16, 256]": 1}
    fallbacks.reset()


def test_dropout_is_accepted(seed):
    """Dropout is random (and draws a different mask than torch's): accepted, and it changes the result."""
    q, k, v = (torch.randn(2, 2, 8, 32, device=DEVICE) for _ in range(3))
    plain = pk.scaled_dot_product_attention(q, k, v)
    dropped = pk.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert dropped.shape == plain.shape and not torch.equal(dropped, plain)
    fallbacks.reset()  # dropout_p = 1 is torch's (all zeros), like any other value torch takes
    torch.testing.assert_close(pk.scaled_dot_product_attention(q, k, v, dropout_p=1.0), torch.zeros_like(q))
    assert fallbacks.counts() == {(OP, "dropout_p outside [0, 1)"): 1}
    for p in (-0.1, 1.5):
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        with pytest.raises(RuntimeError):
            pk.scaled_dot_product_attention(q, k, v, dropout_p=p)
    fallbacks.reset()


@pytest.mark.parametrize("head_dim", [32, 8], ids=["kernels", "torch fallback"])
def test_torch_compile_fullgraph(head_dim):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, 7, head_dim, device=DEVICE) for _ in range(3))
    mask = torch.rand(2, 1, 7, 7, device=DEVICE) < 0.8

    def f(q, k, v):
        return pk.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
