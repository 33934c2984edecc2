"""attention: every backend against an independent float64 oracle written here (dense masks, plain softmax).

Property style: random shapes (lengths that are multiples of no block size), random compositions of mask
parts and random data from each test's seed (tests/conftest.py: fixed per test by default, fresh with
PTM_TEST_SEED=random; printed, rerun one with PTM_TEST_SEED=<seed>). The Triton interpreter is slow, so it
gets fewer and smaller cases.
"""

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

import ptm_kernels as pk
from ptm_kernels import AttentionMask, backend, reference_kernels
from ptm_kernels.attention_mask import alibi_slopes, alibi_table, t5_bucket, t5_relative_table
from ptm_kernels.ops.attention import ARGS, BACKWARD_ARGS, _sdpa_mask, op_args

from ..compare import assert_close, reduced_slack_scale
from ..conftest import DEVICE, backend_params

IMPLS = backend_params("attention")
HALF = [torch.bfloat16, torch.float16]
F32_TOL = dict(rtol=1e-5, atol=2e-5)


def interpreted(impl):
    return impl == "triton" and backend.triton_interpreted()


# ------------------------------------------------------------------------------------ randomness


class Rng:
    """Python and torch randomness from one fresh seed, named in every failure message."""

    def __init__(self, seed):
        self.seed, self.py = seed, random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale).to(DEVICE, dtype)

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.gen).to(DEVICE)

    def randint(self, lo, hi, shape):
        return torch.randint(lo, hi, shape, generator=self.gen).to(DEVICE)


@pytest.fixture
def rng(seed):
    return Rng(seed)


# --------------------------------------------------------------------------------------- the oracle


def visible(spec, B, H, Lq, Lk):
    """bool [B, H, Lq, Lk] from a spec, straight from the definitions (i' = i + Lk - Lq)."""
    i = torch.arange(Lq, device=DEVICE).view(1, 1, Lq, 1)
    j = torch.arange(Lk, device=DEVICE).view(1, 1, 1, Lk)
    ip = i + Lk - Lq
    vis = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=DEVICE)
    if spec.get("causal"):
        vis = vis & (j <= ip)
    if spec.get("causal_top_left"):
        vis = vis & (j <= i)
    if "window" in spec:
        left, right = spec["window"]
        if left is not None:
            vis = vis & (j >= ip - left)
        if right is not None:
            vis = vis & (j <= ip + right)
    if "key_lengths" in spec:
        vis = vis & (j < torch.tensor(spec["key_lengths"], device=DEVICE).view(-1, 1, 1, 1))
    if "key_mask" in spec:
        vis = vis & spec["key_mask"].view(-1, 1, 1, Lk)
    if "prefix" in spec:
        vis = vis & ((j < torch.tensor(spec["prefix"], device=DEVICE).view(-1, 1, 1, 1)) | (j <= ip))
    if "segments" in spec:
        qi, ki = spec["segments"]
        vis = vis & (qi.view(-1, 1, Lq, 1) == ki.view(-1, 1, 1, Lk))
    if "dense" in spec:
        vis = vis & spec["dense"]
    return vis


def oracle(q, k, v, vis, bias=None, table=None, scale=None, keep=None, p=0.0):
    """softmax attention by the definition, in q's dtype (float64: the truth; half: torch's own error)."""
    H, Hk, Lq, Lk = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    k, v = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    s = scale * (q @ k.transpose(-1, -2))
    if bias is not None:
        s = s + bias.to(s.dtype)
    if table is not None:
        idx = torch.arange(Lq, device=DEVICE)[:, None] - torch.arange(Lk, device=DEVICE)[None, :] + Lk - 1
        s = s + table.to(s.dtype)[:, idx]
    seen = vis.any(-1, keepdim=True)
    s = torch.where(seen, s.masked_fill(~vis, float("-inf")), 0.0)  # a row that sees nothing: zeros
    prob = torch.softmax(s, -1) * seen
    lse = torch.where(seen[..., 0], torch.logsumexp(s, -1), float("-inf"))
    if keep is not None:
        prob = prob * keep / (1 - p)
    return prob @ v, lse


# ----------------------------------------------------------------------------------- random cases


def random_shape(rng, impl):
    r = rng.py
    small = interpreted(impl)
    H = r.choice([1, 2, 4] if small else [1, 2, 3, 4, 6])
    Hk = r.choice([d for d in range(1, H + 1) if H % d == 0])
    Lmax = 80 if small else 150
    Lq = r.randint(1, Lmax)
    Lk = Lq if r.random() < 0.4 else r.randint(1, Lmax)
    D = r.choice([16, 32, 40, 64] if small else [16, 32, 40, 64, 80, 96, 128])
    return r.randint(1, 2 if small else 3), H, Hk, Lq, Lk, D


def broadcast_shape(rng, B, H, Lq, Lk):
    return tuple(n if rng.py.random() < 0.5 else 1 for n in (B, H)) + tuple(
        n if rng.py.random() < 0.8 else 1 for n in (Lq, Lk))


def random_spec(rng, B, H, Lq, Lk, parts=None):
    """A random composition of mask parts; `parts` forces a set of part names."""
    r = rng.py
    want = parts if parts is not None else {p for p in ("causal", "causal_top_left", "window", "key_lengths",
                                                        "key_mask", "prefix", "segments", "dense", "bias",
                                                        "toeplitz") if r.random() < 0.3}
    if "prefix" in want:  # prefix-LM already contains its causal part (combining is an error)
        want -= {"causal", "causal_top_left"}
    spec = {}
    if "causal" in want:
        spec["causal"] = True
    if "causal_top_left" in want:
        spec["causal_top_left"] = True
    if "window" in want:
        wide = max(Lq, Lk)
        left, right = r.choice([None, r.randint(0, wide)]), r.choice([None, r.randint(0, wide)])
        spec["window"] = (left, right) if (left, right) != (None, None) else (r.randint(0, wide), None)
    if "key_lengths" in want:
        spec["key_lengths"] = [r.choice([0, Lk, r.randint(0, Lk)]) for _ in range(B)]
    if "key_mask" in want:
        spec["key_mask"] = rng.rand(B, Lk) < 0.7
    if "prefix" in want:
        spec["prefix"] = [r.randint(0, Lk) for _ in range(B)]
    if "segments" in want:
        def packed(L):  # sorted document ids, the packed-sequence case
            return torch.sort(rng.randint(0, 4, (B, L)), dim=1).values
        qi = packed(Lq)
        spec["segments"] = (qi, qi if Lq == Lk and r.random() < 0.5 else packed(Lk))
    if "dense" in want:
        spec["dense"] = rng.rand(*broadcast_shape(rng, B, H, Lq, Lk)) < 0.8
    if "bias" in want:
        spec["bias"] = rng.randn(*broadcast_shape(rng, B, H, Lq, Lk)).requires_grad_(True)
    if "toeplitz" in want:
        spec["toeplitz"] = rng.randn(r.choice([1, H]), Lq + Lk - 1).requires_grad_(True)
    return spec


def mask_of(spec, rng=None):
    """The AttentionMask for a spec: its parts AND-ed in a random order."""
    parts = []
    if spec.get("causal"):
        parts.append(AttentionMask.causal())
    if spec.get("causal_top_left"):
        parts.append(AttentionMask.causal(align="top_left"))
    if "window" in spec:
        parts.append(AttentionMask.sliding_window(*spec["window"]))
    if "key_lengths" in spec:
        parts.append(AttentionMask.key_padding(lengths=spec["key_lengths"]))
    if "key_mask" in spec:
        parts.append(AttentionMask.key_padding(mask=spec["key_mask"]))
    if "prefix" in spec:
        parts.append(AttentionMask.prefix_lm(spec["prefix"]))
    if "segments" in spec:
        qi, ki = spec["segments"]
        parts.append(AttentionMask.segments(qi, None if ki is qi else ki))
    if "dense" in spec:
        parts.append(AttentionMask.dense(spec["dense"]))
    if "bias" in spec:
        parts.append(AttentionMask.bias(spec["bias"]))
    if "toeplitz" in spec:
        parts.append(AttentionMask.toeplitz(spec["toeplitz"]))
    if rng is not None:
        rng.py.shuffle(parts)
    mask = AttentionMask()
    for part in parts:
        mask = mask & part
    return mask


def qkv(rng, B, H, Hk, Lq, Lk, D, dtype, layout="contiguous"):
    """Leaf tensors and views of them in [B, H, L, D]: contiguous, or [B, L, H, D] storage (strided)."""
    def one(h, L):
        if layout == "contiguous":
            base = rng.randn(B, h, L, D, dtype=dtype)
            return base.requires_grad_(True), lambda t: t
        if layout == "bshd":
            base = rng.randn(B, L, h, D, dtype=dtype)
            return base.requires_grad_(True), lambda t: t.transpose(1, 2)
        base = rng.randn(B, h, L, 2 * D, dtype=dtype)  # non-unit last stride: the op must copy
        return base.requires_grad_(True), lambda t: t[..., ::2]
    return [one(H, Lq), one(Hk, Lk), one(Hk, Lk)]


def check_case(impl, rng, shape, spec, dtype=torch.float32, layout="contiguous", scale=None, what=""):
    """Forward, lse and every gradient of one case against the float64 oracle."""
    B, H, Hk, Lq, Lk, D = shape
    name = f"{what} seed={rng.seed} shape={shape} {dtype} {layout} parts={sorted(spec)}"
    inputs = qkv(rng, B, H, Hk, Lq, Lk, D, dtype, layout)
    bases = [b for b, _ in inputs]
    views = [fn for _, fn in inputs]
    extra = [spec[p] for p in ("bias", "toeplitz") if p in spec]
    vis = visible(spec, B, H, Lq, Lk)
    dout = rng.randn(B, H, Lq, D)

    with backend.use(attention=impl):
        out, lse = pk.attention(*(fn(b) for fn, b in zip(views, bases)), mask_of(spec, rng), scale=scale,
                                return_lse=True)
        grads = torch.autograd.grad(out, bases + extra, dout.to(dtype))

    def run_oracle(cast):
        leaves = [t.detach().to(cast).requires_grad_(True) for t in bases + extra]
        q, k, v = (fn(t) for fn, t in zip(views, leaves[:3]))
        more = dict(zip([p for p in ("bias", "toeplitz") if p in spec], leaves[3:]))
        o, l = oracle(q, k, v, vis, more.get("bias"), more.get("toeplitz"), scale)
        return o, l, torch.autograd.grad(o, leaves, dout.to(o.dtype))

    truth_out, truth_lse, truth_grads = run_oracle(torch.float64)
    base = run_oracle(dtype) if dtype in HALF else (None, None, [None] * len(grads))
    assert out.dtype == dtype and out.shape == (B, H, Lq, D), f"{name}: out {out.dtype} {tuple(out.shape)}"
    tol = F32_TOL  # half precision: compare.py allows one rounding unit of the dtype
    assert_close(out, truth_out, base[0], name=f"{name}: out", precision=dtype, **tol)
    check_lse(lse, truth_lse, base[1], name, dtype, tol)
    labels = ["dq", "dk", "dv"] + [f"d{p}" for p in ("bias", "toeplitz") if p in spec]
    delta_terms = (dout.double() * truth_out).abs().sum(-1)  # [B, H, Lq]
    for label, g, t, b, leaf in zip(labels, grads, truth_grads, base[2], bases + extra):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, f"{name}: {label} {g.dtype} {tuple(g.shape)}"
        # A broadcast bias's gradient sums n entries of dS that cancel (each row of dS sums to zero): float32
        # rounding of such a sum grows like sqrt(n) * eps, so the absolute tolerance does too.
        summed = B * H * Lq * Lk // max(1, leaf.numel())  # entries of dS behind each element of the gradient
        f32_summed = summed if label == "dbias" else 1
        g_tol = dict(tol, atol=max(tol["atol"], 16 * math.sqrt(f32_summed) * torch.finfo(torch.float32).eps))
        # Known gap: the Triton backward rounds P and dS to the input dtype before its matmuls (as
        # FlashAttention does), which puts its bf16 bias gradient at up to ~4-5x torch's error, not 2x.
        factor = 6.0 if impl == "triton" and label == "dbias" and dtype in HALF else 2.0
        # Every kernel takes delta_i = sum_d dO_id O_id from O rounded to the input dtype (as FlashAttention
        # does; torch's softmax backward does not), so each dS_ij = P_ij (dP_ij - delta_i) carries up to one
        # rounding of that sum: the half-precision slack of the bias gradients is taken at its size.
        slack = reduced_slack_scale(delta_terms, summed) if label in ("dbias", "dtoeplitz") else None
        assert_close(g, t, b, name=f"{name}: {label}", precision=dtype, factor=factor, slack_scale=slack, **g_tol)
    # a row that sees no key: exactly zero output and zero gradient
    empty = ~vis.any(-1)
    if empty.any():
        assert (out[empty] == 0).all(), f"{name}: a fully masked row is not zero"
        assert torch.isneginf(lse[empty]).all(), f"{name}: lse of a fully masked row is not -inf"
        assert views[0](grads[0])[empty].eq(0).all(), f"{name}: a fully masked row has a nonzero dq"


def check_lse(lse, truth, base, name, dtype, tol):
    assert lse.dtype == torch.float32, f"{name}: lse dtype {lse.dtype}"
    inf = torch.isneginf(truth)
    assert torch.equal(torch.isneginf(lse), inf), f"{name}: lse is -inf exactly where no key is visible"
    assert_close(lse[~inf], truth[~inf], None if base is None else base[~inf].float(), name=f"{name}: lse",
                 precision=dtype, **tol)


def n_cases(impl, full):
    return 2 if interpreted(impl) else full


# -------------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("impl", IMPLS)
def test_random_masks_float32(impl, rng):
    """Random shapes and random compositions of every mask part, forward, lse and all gradients."""
    for case in range(n_cases(impl, 12)):
        shape = random_shape(rng, impl)
        B, H, _, Lq, Lk, _ = shape
        layout = rng.py.choice(["contiguous", "bshd", "contiguous", "every_other"])
        check_case(impl, rng, shape, random_spec(rng, B, H, Lq, Lk), layout=layout, what=f"case {case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("part", ["causal", "causal_top_left", "window", "key_lengths", "key_mask", "prefix",
                                  "segments", "dense", "bias", "toeplitz"])
def test_each_part_alone(impl, part, rng):
    shape = random_shape(rng, impl)
    B, H, _, Lq, Lk, _ = shape
    check_case(impl, rng, shape, random_spec(rng, B, H, Lq, Lk, parts={part}), what=part)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_random_masks_half(impl, dtype, rng):
    """Half precision: within twice plain PyTorch's error (same dtype) of the float64 truth."""
    for case in range(n_cases(impl, 4)):
        shape = random_shape(rng, impl)
        B, H, _, Lq, Lk, _ = shape
        check_case(impl, rng, shape, random_spec(rng, B, H, Lq, Lk), dtype=dtype, what=f"case {case}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(4, 1), (6, 2), (4, 4)], ids=["mqa", "gqa", "mha"])
def test_gqa_and_unequal_lengths(impl, heads, rng):
    H, Hk = heads
    lengths = [(1, 70), (37, 64), (64, 19)]  # decoding against a cache, and both ways round
    for Lq, Lk in lengths[rng.py.randrange(3):][:1] if interpreted(impl) else lengths:
        check_case(impl, rng, (2, H, Hk, Lq, Lk, 32), {"causal": True, "key_lengths": [Lk, max(1, Lk - 9)]},
                   layout="bshd", what=f"H={H} Hk={Hk}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("Lq", [1, 2, 4, 5])
def test_decode_rows_every_part(impl, Lq, rng):
    """A few query rows against a long cache (the C++ kernel's loop path for <= 4 rows, its GEMMs from 5): every
    mask part composed at random, GQA, forward, lse and gradients."""
    for case in range(n_cases(impl, 3)):
        B, H, Hk, Lk = 2, 6, 2, rng.py.choice([70, 300])
        layout = rng.py.choice(["contiguous", "bshd"])
        check_case(impl, rng, (B, H, Hk, Lq, Lk, 64), random_spec(rng, B, H, Lq, Lk), layout=layout,
                   what=f"decode case {case}")


@pytest.mark.skipif("cpu" not in IMPLS, reason="the C++ CPU kernel's decode work split")
@pytest.mark.parametrize("Lq", [1, 3])
def test_decode_gqa_groups_match_per_head(Lq, rng):
    """The C++ kernel runs decode rows (<= 4) one item per (batch, kv head), all query heads of the GQA group
    reading each key once, when that leaves every thread an item; else one item per query head. Both give the
    same bits (the same arithmetic per row), for every mask part that keeps the grouping (no dense part)."""
    B, H, Hk, Lk, D = 1, 6, 2, 300, 64
    for case in range(3):
        spec = random_spec(rng, B, H, Lq, Lk)
        spec.pop("dense", None)
        mask = mask_of(spec)
        q, k, v = rng.randn(B, H, Lq, D), rng.randn(B, Hk, Lk, D), rng.randn(B, Hk, Lk, D)
        threads = torch.get_num_threads()
        outs = []
        try:
            for n in (1, B * Hk + 1):  # grouped (B * Hk >= 1 thread), per head (fewer kv pairs than threads)
                torch.set_num_threads(n)
                with torch.no_grad(), backend.use(attention="cpu"):
                    outs.append(pk.attention(q, k, v, mask, return_lse=True))
        finally:
            torch.set_num_threads(threads)
        (out1, lse1), (out2, lse2) = outs
        assert torch.equal(out1, out2) and torch.equal(lse1, lse2), f"seed={rng.seed} case {case} {sorted(spec)}"
        with torch.no_grad(), backend.use(attention="reference"):
            want = pk.attention(q, k, v, mask)
        torch.testing.assert_close(out1, want, **F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("place", ["q", "k_seen", "v_seen", "k_hidden", "v_hidden"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_decode_rows_special_values(impl, place, value, rng):
    """One decode row with a NaN/inf in q, or in k or v at a key the row sees or one past its key length: the
    same NaN/inf/finite pattern and values as the reference kernels (the spec, checked against torch's SDPA in
    test_nonfinite.py; a seen NaN poisons the row, a hidden k is skipped, a hidden v row still meets p = 0)."""
    B, H, Hk, Lk, D, n = 2, 4, 2, 70, 32, 50  # batch 0 sees the first n keys
    q, k, v = rng.randn(B, H, 1, D), rng.randn(B, Hk, Lk, D), rng.randn(B, Hk, Lk, D)
    target, at = {"q": (q, (0, 1, 0, 3)), "k_seen": (k, (0, 0, 7, 5)), "v_seen": (v, (0, 1, 7, 2)),
                  "k_hidden": (k, (0, 0, 60, 5)), "v_hidden": (v, (0, 1, 60, 2))}[place]
    target[at] = value
    mask = AttentionMask.key_padding(lengths=torch.tensor([n, Lk], device=DEVICE))
    with backend.use(attention=impl):
        out = pk.attention(q, k, v, mask)
    with backend.use(attention="reference"):
        want = pk.attention(q, k, v, mask)
    assert out[1].isfinite().all()  # batch 1 holds no special value
    if math.isnan(value):
        assert (place == "k_hidden") == bool(out.isfinite().all())
    torch.testing.assert_close(out, want, equal_nan=True, rtol=1e-5, atol=1e-5)


def gqa_decode_spec(rng, B, H, Lq, Lk):
    """Key padding, a causal or a sliding-window part, and at random one per-head part (bias, Toeplitz table,
    dense mask: what a packed GQA program must address per row)."""
    spec = random_spec(rng, B, H, Lq, Lk, parts={"key_lengths", rng.py.choice(["causal", "window"]),
                                                 rng.py.choice(["bias", "toeplitz", "dense", "none"])})
    spec["key_lengths"] = [Lk, rng.py.randint(1, Lk)][:B]
    return spec


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("Lq", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gqa_decode(impl, G, Lq, dtype, rng):
    """Decoding under GQA (the Triton forward packs the G query heads of a kv head into one program): a few
    query rows against a long cache, G query heads per kv head, forward, lse and gradients."""
    B, Hk, Lk = 2, 2, rng.py.choice([70, 150])
    check_case(impl, rng, (B, G * Hk, Hk, Lq, Lk, 64), gqa_decode_spec(rng, B, G * Hk, Lq, Lk), dtype=dtype,
               layout=rng.py.choice(["contiguous", "bshd"]), what=f"GQA decode G={G}")


@pytest.mark.skipif(not backend.supports("triton", "attention", DEVICE.type),
                    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1 (and triton importable)")
def test_gqa_decode_packs_heads_into_one_program(monkeypatch, rng):
    """The Triton forward runs one program per (batch row, kv head) when decoding under GQA, with the same
    dropout keep-mask as attention_dropout_mask (the counter of row i of head h stays (b * H + h) * Lq + i)."""
    from ptm_kernels.triton.attention import launch

    grids = []

    class Recording:  # stands in for the kernel: records each launch's grid and packing
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                grids.append((grid, kwargs["PACK_GROUP"]))
                return real[grid](*args, **kwargs)
            return run

    real = launch._attn_fwd_kernel
    monkeypatch.setattr(launch, "_attn_fwd_kernel", Recording())
    B, Hk, G, Lq, Lk, D, p = 2, 2, 4, 3, 150, 32, 0.3
    H = G * Hk
    q, k, v = rng.randn(B, H, Lq, D), rng.randn(B, Hk, Lk, D), rng.randn(B, Hk, Lk, D)
    spec = {"causal": True, "key_lengths": [Lk, 97], "bias": rng.randn(1, H, Lq, Lk)}
    seed = rng.py.randrange(2**31)
    with backend.use(attention="triton"):
        out = pk.attention(q, k, v, mask_of(spec), dropout_p=p, seed=seed)
    assert [g[0][0] for g in grids] == [B * Hk] and all(pack for _, pack in grids), (
        f"seed={rng.seed}: forward launches {grids}, want one packed launch of {B * Hk} programs per key split")
    keep = backend.module("triton").attention_dropout_mask(seed, p, B, H, Lq, Lk, DEVICE)
    truth, _ = oracle(q.double(), k.double(), v.double(), visible(spec, B, H, Lq, Lk), spec["bias"].double(),
                      keep=keep, p=p)
    assert_close(out, truth, name=f"seed={rng.seed} dropout seed={seed}: packed decode with dropout", **F32_TOL)


@pytest.mark.skipif(not backend.supports("triton", "attention", DEVICE.type),
                    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1 (and triton importable)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_through_tma_descriptors(monkeypatch, dtype, rng):
    """The Hopper TMA path (Triton's interpreter runs tensor descriptors): the forward's Q / K / V and the
    backward's (dQ and dK / dV kernels) Q / K / V / dO through tensor descriptors give the oracle's results and
    gradients, with ragged lengths, a head dim below its power of two, strided layouts, GQA decode (packed
    rows: q by pointers, K / V by TMA) and a block map."""
    from ptm_kernels.triton.attention import launch

    made = []

    def recording(*args, **kwargs):
        descs = real(*args, **kwargs)
        made.append(len(descs))
        return descs

    real = launch._tma_descriptors
    monkeypatch.setattr(launch, "_FORCE_TMA", True)
    monkeypatch.setattr(launch, "_tma_descriptors", recording)
    cases = [((2, 4, 2, 37, 70, 40), {"causal": True, "key_lengths": [70, 33]}, "bshd"),
             ((1, 8, 1, 2, 150, 64), {"window": (40, None), "bias": None}, "contiguous"),
             ((2, 2, 2, 50, 45, 32), {"segments": None, "dense": None}, "contiguous")]
    for shape, parts, layout in cases:
        B, H, _, Lq, Lk, _ = shape
        spec = random_spec(rng, B, H, Lq, Lk, parts=set(parts))
        spec.update({k: v for k, v in parts.items() if v is not None})
        check_case("triton", rng, shape, spec, dtype=dtype, layout=layout, what="TMA forward")
    # 3 descriptors per forward launch, 4 (with dO's) per backward kernel: a dK / dV and a dQ launch per case
    assert made.count(3) >= len(cases) and made.count(4) == 2 * len(cases), f"descriptors made per launch: {made}"


@pytest.mark.skipif(not backend.supports("triton", "attention", DEVICE.type),
                    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1 (and triton importable)")
def test_forward_straight_line_diagonal(monkeypatch, rng):
    """Square tiles under a plain causal mask (Hopper's 128 x 128 at D = 128): the Triton forward runs the one
    masked key tile of each query tile, its diagonal, as straight-line code with a constant triangle mask
    (ONE_DIAGONAL) when Lk - Lq is a non-negative multiple of the tile and the inputs are 16-bit, else the
    masked-tile loop; both give the oracle's results, with ragged lengths and an additive bias."""
    from ptm_kernels.triton.attention import configs, launch

    flags = []

    class Recording:  # stands in for the kernel: records each launch's ONE_DIAGONAL
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                flags.append(kwargs["ONE_DIAGONAL"])
                return real[grid](*args, **kwargs)
            return run

    real = launch._attn_fwd_kernel
    monkeypatch.setattr(launch, "_attn_fwd_kernel", Recording())
    for dtype in (torch.bfloat16, torch.float32):
        for heavy in (False, True):
            monkeypatch.setitem(configs._CONFIG_OVERRIDE, ("fwd", 32, dtype, heavy), [(16, 16, 4, 1)])
    cases = [(50, 50, {}, torch.bfloat16, True), (40, 72, {"bias": None}, torch.bfloat16, True),
             (40, 70, {}, torch.bfloat16, False), (50, 34, {}, torch.bfloat16, False),
             (37, 37, {"key_lengths": [37, 20]}, torch.bfloat16, False), (50, 50, {}, torch.float32, False)]
    for Lq, Lk, parts, dtype, one in cases:
        spec = random_spec(rng, 2, 2, Lq, Lk, parts={"causal", *parts})
        spec.update({k: v for k, v in parts.items() if v is not None})
        flags.clear()
        check_case("triton", rng, (2, 2, 2, Lq, Lk, 32), spec, dtype=dtype, what=f"Lq={Lq} Lk={Lk} diagonal")
        assert flags == [one], (f"Lq={Lq} Lk={Lk} {dtype} parts={sorted(spec)}: ONE_DIAGONAL launched {flags}, "
                                f"want {one}")


@pytest.mark.parametrize("impl", IMPLS)
def test_head_dims_and_scale(impl, rng):
    dims = [16, 64, 256] if interpreted(impl) else [16, 32, 80, 96, 128, 256]
    for D in dims:
        check_case(impl, rng, (1, 2, 1, 33, 45, D), {"causal": True}, scale=rng.py.choice([None, 1.0]),
                   what=f"D={D}")


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows(impl, rng):
    """Rows that see no key (causal with Lq > Lk, zero lengths, a dense row of False): zeros, no NaN."""
    dense = torch.ones(1, 1, 40, 24, dtype=torch.bool, device=DEVICE)
    dense[..., 5, :] = False
    spec = {"causal": True, "key_lengths": [0, 24], "dense": dense,
            "bias": rng.randn(1, 2, 40, 24).requires_grad_(True)}
    check_case(impl, rng, (2, 2, 2, 40, 24, 16), spec, what="fully masked rows")


@pytest.mark.parametrize("impl", [p for p in IMPLS if p.id == "cpu"])
@pytest.mark.parametrize("parts", [("causal", "toeplitz", "key_lengths"), ("segments", "window", "bias"),
                                   ("dense", "prefix", "key_mask"), ("causal_top_left",)], ids="-".join)
def test_long_sequences(impl, parts, rng):
    """Lq and Lk past 512: the C++ backward's several blocks of query rows against chunks of keys, each trimmed
    to its visible tiles or skipped; one (b, kv head) pair, so the keys are split into partitions, and GQA."""
    Lq, Lk = rng.py.randint(520, 700), rng.py.randint(520, 700)
    check_case(impl, rng, (1, 2, 1, Lq, Lk, 32), random_spec(rng, 1, 2, Lq, Lk, parts=set(parts)), what="long")


# -------------------------------------------------------------------------------------------- dropout


def dropout_case(rng, impl):
    top = 40 if interpreted(impl) else 70
    B, H, Hk, Lq, Lk, D = 2, 2, 1, rng.py.randint(20, top), rng.py.randint(20, top), 32
    q, k, v = (rng.randn(B, h, L, D).requires_grad_(True) for h, L in ((H, Lq), (Hk, Lk), (Hk, Lk)))
    return (B, H, Hk, Lq, Lk, D), q, k, v


def run_dropout(impl, q, k, v, mask, p, grads=False, **kw):
    with backend.use(attention=impl):
        out = pk.attention(q, k, v, mask, dropout_p=p, **kw)
        return (out,) + (torch.autograd.grad(out.square().sum(), (q, k, v)) if grads else ())


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_reproducible(impl, rng):
    _, q, k, v = dropout_case(rng, impl)
    mask = AttentionMask.causal()
    seed = rng.py.randrange(2**31)
    a, b = (run_dropout(impl, q, k, v, mask, 0.3, grads=True, seed=seed) for _ in range(2))
    for x, y in zip(a, b):
        assert torch.equal(x, y), f"seed={rng.seed}: the same dropout seed gave different results"
    c = run_dropout(impl, q, k, v, mask, 0.3, seed=seed + 1)
    assert not torch.equal(a[0], c[0]), f"seed={rng.seed}: different dropout seeds gave the same output"
    # without a seed: drawn from torch's default generator (or the given one), so manual_seed reproduces
    torch.manual_seed(seed)
    d = run_dropout(impl, q, k, v, mask, 0.3)
    torch.manual_seed(seed)
    assert torch.equal(d[0], run_dropout(impl, q, k, v, mask, 0.3)[0]), "torch.manual_seed does not reproduce"
    gen = [run_dropout(impl, q, k, v, mask, 0.3, generator=torch.Generator().manual_seed(seed))[0] for _ in "ab"]
    assert torch.equal(*gen), "the same generator state gave different results"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_fraction(impl, p, rng):
    """The backend's keep-mask keeps a fraction 1 - p, within 5 standard deviations, per head too."""
    B, H, Lq, Lk = 2, 4, 96, 80
    keep = backend.module(impl).attention_dropout_mask(rng.py.randrange(2**31), p, B, H, Lq, Lk, DEVICE)
    assert keep.shape == (B, H, Lq, Lk) and keep.dtype == torch.bool
    n = keep.numel()
    frac = keep.float().mean().item()
    assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), f"seed={rng.seed}: kept {frac:.4f}, p={p}"
    per_head = keep.float().mean((2, 3))
    assert (per_head - (1 - p)).abs().max() <= 5 * math.sqrt(p * (1 - p) / (Lq * Lk))
    flat = keep.view(B * H, -1)
    assert all(not torch.equal(flat[0], flat[i]) for i in range(1, B * H)), "heads share one dropout mask"


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_seed_high_bits(impl, rng):
    """Seeds past 2 ** 32 (what a torch generator draws: 63 bits) keep 1 - p too, and seeds that differ only in
    their high word give different masks (the Triton kernels key Philox with both words, _common.dropout_keep)."""
    B, H, Lq, Lk, p = 2, 2, 48, 40, 0.3
    low = rng.py.randrange(2**32)
    masks = [backend.module(impl).attention_dropout_mask((high << 32) | low, p, B, H, Lq, Lk, DEVICE)
             for high in (0, 1, rng.py.randrange(2, 2**31))]
    for i, keep in enumerate(masks):
        frac = keep.float().mean().item()
        bound = 5 * math.sqrt(p * (1 - p) / keep.numel())
        assert abs(frac - (1 - p)) <= bound, f"seed={rng.seed}: mask {i} kept {frac:.4f}"
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(masks[i], masks[j]), f"seed={rng.seed}: seeds {i}, {j} (same low word) gave one mask"


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_matches_oracle_with_keep_mask(impl, rng):
    """Forward and backward equal the oracle given this backend's own keep-mask."""
    for case in range(n_cases(impl, 3)):
        (B, H, Hk, Lq, Lk, D), q, k, v = dropout_case(rng, impl)
        spec = random_spec(rng, B, H, Lq, Lk)
        p, seed = rng.py.choice([0.1, 0.3]), rng.py.randrange(2**31)
        extra = [spec[n] for n in ("bias", "toeplitz") if n in spec]
        dout = rng.randn(B, H, Lq, D)
        with backend.use(attention=impl):
            out = pk.attention(q, k, v, mask_of(spec), dropout_p=p, seed=seed)
            grads = torch.autograd.grad(out, [q, k, v] + extra, dout)
        keep = backend.module(impl).attention_dropout_mask(seed, p, B, H, Lq, Lk, DEVICE)
        leaves = [t.detach().double().requires_grad_(True) for t in [q, k, v] + extra]
        more = dict(zip([n for n in ("bias", "toeplitz") if n in spec], leaves[3:]))
        truth, _ = oracle(*leaves[:3], visible(spec, B, H, Lq, Lk), more.get("bias"), more.get("toeplitz"),
                          keep=keep, p=p)
        truth_grads = torch.autograd.grad(truth, leaves, dout.double())
        name = f"case {case} seed={rng.seed} p={p} dropout seed={seed} parts={sorted(spec)}"
        assert_close(out, truth, name=f"{name}: out", **F32_TOL)
        for label, g, t in zip(["dq", "dk", "dv", "dbias/dtable", "dtable"], grads, truth_grads):
            assert_close(g, t, name=f"{name}: {label}", **F32_TOL)


# -------------------------------------------------------------------------------------- SDPA drop-in


def random_sdpa_mask(rng, B, H, Lq, Lk):
    kind = rng.py.choice(["none", "bool", "bool_padding", "bool_prefix_padding", "float", "float_inf"])
    if kind == "none":
        return kind, None
    if kind in ("bool_padding", "bool_prefix_padding"):
        if kind == "bool_padding":
            m = rng.rand(B, Lk) < 0.7
        else:
            m = torch.arange(Lk, device=DEVICE) < rng.randint(0, Lk + 1, (B, 1))
        return kind, m.view(B, 1, 1, Lk)
    shape = broadcast_shape(rng, B, H, Lq, Lk)[rng.py.choice([0, 1, 2]):]  # 2 to 4 dims
    if kind == "bool":
        return kind, rng.rand(*shape) < 0.7
    m = rng.randn(*shape)
    if kind == "float_inf":
        m = torch.where(rng.rand(*shape) < 0.3, float("-inf"), 0.0)
    return kind, m


@pytest.mark.parametrize("impl", IMPLS)
def test_sdpa_dropin_matches_torch(impl, rng):
    """Against torch's SDPA in float64: bool and float masks, is_causal (top-left), Lq != Lk, GQA."""
    for case in range(n_cases(impl, 10)):
        B, H, Hk, Lq, Lk, D = random_shape(rng, impl)
        kind, m = random_sdpa_mask(rng, B, H, Lq, Lk)
        # is_causal with a mask: torch refuses it in some kernels, so the drop-in hands it to torch
        # (tests/ops/test_sdpa_dropin.py); here the kernels run
        is_causal = m is None and rng.py.random() < 0.4
        scale = rng.py.choice([None, 0.3])
        q, k, v = (rng.randn(B, h, L, D).requires_grad_(True) for h, L in ((H, Lq), (Hk, Lk), (Hk, Lk)))
        gqa = H != Hk
        with backend.use(attention=impl):
            out = pk.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, scale=scale, enable_gqa=gqa)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        # torch refuses is_causal with a mask in some kernels: fold the causal part into the mask
        tm = m
        if is_causal:
            tril = torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril()
            tm = tril if m is None else (m & tril if m.dtype == torch.bool else m.masked_fill(~tril, float("-inf")))
        tm = tm.double() if tm is not None and tm.dtype != torch.bool else tm
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        truth = F.scaled_dot_product_attention(*leaves, tm, scale=scale, enable_gqa=gqa)
        truth_grads = torch.autograd.grad(truth, leaves, torch.ones_like(truth))
        name = f"case {case} seed={rng.seed} {kind} mask causal={is_causal} shape={(B, H, Hk, Lq, Lk, D)}"
        # torch < 2.5 gave NaN for rows that see no key, we give zeros
        assert_close(out, torch.nan_to_num(truth), name=name, **F32_TOL)
        for label, g, t in zip(["dq", "dk", "dv"], grads, truth_grads):
            assert_close(g, torch.nan_to_num(t), name=f"{name}: {label}", **F32_TOL)


def test_sdpa_shapes_and_mask_recognition(rng):
    q, k, v = rng.randn(5, 32), rng.randn(7, 32), rng.randn(7, 32)
    torch.testing.assert_close(pk.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q3, k3 = rng.randn(2, 5, 32), rng.randn(2, 7, 32)
    m3 = rng.rand(2, 5, 7) < 0.8
    tril = torch.ones(5, 7, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(pk.scaled_dot_product_attention(q3, k3, k3, m3 & tril),
                               F.scaled_dot_product_attention(q3, k3, k3, m3 & tril))
    q4 = rng.randn(2, 3, 5, 32)
    prefix = torch.arange(7, device=DEVICE) < torch.tensor([[4], [7]], device=DEVICE)
    recognised = _sdpa_mask(prefix.view(2, 1, 1, 7), 4, q4)
    assert recognised.key_lengths is not None and recognised.key_lengths.tolist() == [4, 7]
    holes = prefix.clone()
    holes[0, 1] = False
    assert _sdpa_mask(holes.view(2, 1, 1, 7), 4, q4).dense_mask.shape == (2, 1, 1, 7)
    additive = torch.zeros(2, 1, 1, 7, device=DEVICE).masked_fill(~prefix.view(2, 1, 1, 7), float("-inf"))
    assert _sdpa_mask(additive, 4, q4).key_lengths.tolist() == [4, 7]
    assert _sdpa_mask(rng.randn(5, 7), 4, q4).additive_bias is not None
    assert _sdpa_mask(rng.rand(5, 7) < 0.5, 4, q4).dense_mask.shape == (1, 1, 5, 7)


# ------------------------------------------------------------------------------------------ block map


def tile_states(vis, bm, bn):
    """The per-tile state of a dense visibility: 0 none, 1 some, 2 all visible."""
    B, H, Lq, Lk = vis.shape
    nm, nn = -(-Lq // bm), -(-Lk // bn)
    out = torch.empty(B, H, nm, nn, dtype=torch.int8, device=vis.device)
    for a in range(nm):
        for b in range(nn):
            t = vis[:, :, a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            out[:, :, a, b] = t.any((-1, -2)).to(torch.int8) + t.all(-1).all(-1).to(torch.int8)
    # a tile that extends past Lq or Lk is at most "some visible": its padding needs masking
    if Lq % bm:
        out[:, :, -1].clamp_(max=1)
    if Lk % bn:
        out[..., -1].clamp_(max=1)
    return out


def test_block_map_against_dense(rng):
    """2 exactly when a tile is all visible, 0 only when none is; exact for one part alone."""
    for case in range(30):
        B, H = rng.py.randint(1, 2), rng.py.randint(1, 3)
        Lq, Lk = rng.py.randint(1, 90), rng.py.randint(1, 90)
        single = case % 2 == 0
        parts = {rng.py.choice(["causal", "causal_top_left", "window", "key_lengths", "key_mask", "prefix",
                                "dense"])} if single else None
        spec = random_spec(rng, B, H, Lq, Lk, parts)
        mask = mask_of(spec, rng)
        if not mask.has_visibility:
            assert mask.block_map(B, H, Lq, Lk, 16, 16, DEVICE) is None
            continue
        bm, bn = rng.py.choice([1, 3, 16, 32]), rng.py.choice([1, 5, 16, 64])
        got = mask.block_map(B, H, Lq, Lk, bm, bn, DEVICE)
        want = tile_states(visible(spec, B, H, Lq, Lk), bm, bn)
        name = f"case {case} seed={rng.seed} parts={sorted(spec)} L=({Lq}, {Lk}) tile=({bm}, {bn})"
        assert got.dtype == torch.int8 and got.dim() == 4 and got.shape[2:] == want.shape[2:], name
        got = got.expand_as(want)
        assert torch.equal(got == 2, want == 2), f"{name}: 'all visible' tiles differ"
        assert not ((got == 0) & (want != 0)).any(), f"{name}: a tile with a visible entry is marked empty"
        if single:
            assert torch.equal(got, want), f"{name}: a single part's block map is not exact"


def test_block_map_is_cached_and_never_quadratic():
    """Lq = Lk = 2^17 would need 16 GiB as a dense bool mask; the analytic block map is O(tiles)."""
    L, B = 2**17, 2
    mask = (AttentionMask.causal() & AttentionMask.key_padding(lengths=[L, L // 3]) &
            AttentionMask.sliding_window(4096, None) &
            AttentionMask.segments(torch.arange(L, device=DEVICE).div(L // 4, rounding_mode="floor").expand(B, L)))
    bmap = mask.block_map(B, 8, L, L, 128, 128, DEVICE)
    assert bmap.shape == (B, 1, 1024, 1024)
    assert mask.block_map(B, 8, L, L, 128, 128, DEVICE) is bmap, "the block map is not cached"
    assert bmap[0, 0, 5, 5] == 1 and bmap[0, 0, 5, 4] == 2 and bmap[0, 0, 5, 6] == 0
    assert bmap[1, 0, -1].max() == 0  # past the key length
    assert bmap[0, 0, 500, 200] == 0  # outside the window of 4096 keys (32 tiles)
    assert bmap[0, 0, 300, 250] == 0  # another document


@pytest.mark.parametrize("impl", IMPLS)
def test_block_map_only_where_the_backend_uses_it(impl, rng):
    """A backend with `attention_block_map_dense_only` (the C++ CPU one) classifies the analytic parts itself:
    it gets no block map without a dense part (building one costs more than a decode step), and one with."""
    q, k = rng.randn(2, 2, 3, 32), rng.randn(2, 2, 70, 32)
    analytic = AttentionMask.causal() & AttentionMask.key_padding(lengths=torch.tensor([70, 33], device=DEVICE))
    dense = analytic & AttentionMask.dense(torch.rand(2, 1, 3, 70, device=DEVICE) < 0.7)
    mod = backend.module(impl)
    tiled = getattr(mod, "attention_tile", None) is not None
    dense_only = getattr(mod, "attention_block_map_dense_only", False)
    assert (impl == "cpu") == dense_only
    with backend.use(attention=impl):
        maps = [op_args(q, k, k, m, 1.0, 0.0)[ARGS.index("vis.block_map")] for m in (analytic, dense)]
    assert (maps[0] is not None) == (tiled and not dense_only)
    assert (maps[1] is not None) == tiled


def test_op_hands_the_kernel_a_sound_block_map(monkeypatch, rng):
    """With a backend that declares a tile, the kernel gets [B, H, nm, nn] maps that agree with the mask."""
    seen = []

    def checked(fn):
        def run(*args):
            q, k = args[1:3] if fn.__name__ == "attention_bwd" else args[:2]
            B, H, Lq, _ = q.shape
            bmap = args[-1].vis.block_map  # the AttentionParams
            want = tile_states(visible(spec, B, H, Lq, k.shape[2]), 16, 32)
            assert bmap.shape == want.shape and torch.equal(bmap == 2, want == 2)
            assert not ((bmap == 0) & (want != 0)).any()
            seen.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setattr(reference_kernels, "attention_tile", lambda d, dtype, device: (16, 32), raising=False)
    monkeypatch.setattr(reference_kernels, "attention_fwd", checked(reference_kernels.attention_fwd))
    monkeypatch.setattr(reference_kernels, "attention_bwd", checked(reference_kernels.attention_bwd))
    spec = random_spec(rng, 2, 2, 50, 70, {"causal", "key_lengths", "segments", "dense"})
    with backend.use(attention="reference"):
        check_case("reference", rng, (2, 2, 2, 50, 70, 16), spec, what="block map plumbing")
    assert seen == ["attention_fwd", "attention_bwd"]


# ------------------------------------------------------------------------------------ mask semantics


def test_mask_composition_rules(rng):
    a = AttentionMask.sliding_window(10, None) & AttentionMask.sliding_window(20, 3)
    assert (a.window_left, a.window_right) == (10, 3)
    b = AttentionMask.key_padding(lengths=[5, 9]) & AttentionMask.key_padding(lengths=[7, 2])
    assert b.key_lengths.tolist() == [5, 2]
    assert AttentionMask.causal() & AttentionMask.causal() is not None
    with pytest.raises(ValueError, match="prefix_lm already is causal"):
        AttentionMask.prefix_lm([3]) & AttentionMask.causal()
    with pytest.raises(ValueError, match="two segments parts"):
        AttentionMask.segments(torch.zeros(1, 4, dtype=torch.long)) & AttentionMask.segments(
            torch.zeros(1, 4, dtype=torch.long))
    prefix = AttentionMask.key_padding(mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert prefix.key_lengths.tolist() == [2, 3] and prefix.dense_mask is None
    holes = AttentionMask.key_padding(mask=torch.tensor([[1, 0, 1]], dtype=torch.bool))
    assert holes.key_lengths is None and holes.dense_mask.shape == (1, 1, 1, 3)
    biases = AttentionMask.bias(torch.ones(1, 1, 4, 4)) & AttentionMask.bias(torch.ones(4, 4))
    assert biases.additive_bias.eq(2).all()
    assert "causal()" in repr(AttentionMask.causal() & AttentionMask.key_padding(lengths=[3]))


@pytest.mark.parametrize("impl", IMPLS)
def test_relative_position_tables(impl, rng):
    """ALiBi and T5 tables as Toeplitz parts equal the same bias given densely (gradient to T5's weight)."""
    H, Lq, Lk = 4, 21, 34
    i = torch.arange(Lq, device=DEVICE)[:, None] + Lk - Lq
    j = torch.arange(Lk, device=DEVICE)[None, :]
    slopes = alibi_slopes(H).to(DEVICE)
    torch.testing.assert_close(alibi_table(slopes, Lq, Lk)[:, (i - j - (Lk - Lq) + Lk - 1)],
                               -slopes.view(H, 1, 1) * (i - j).abs().float())
    assert alibi_slopes(8)[0].item() == 0.5 and alibi_slopes(6).shape == (6,)
    weight = rng.randn(32, H).requires_grad_(True)
    table = t5_relative_table(weight, Lq, Lk, bidirectional=True)
    dense_bias = weight[t5_bucket(j - i, True, 32, 128)].permute(2, 0, 1).unsqueeze(0)
    q, k, v = rng.randn(1, H, Lq, 32), rng.randn(1, H, Lk, 32), rng.randn(1, H, Lk, 32)
    with backend.use(attention=impl):
        a = pk.attention(q, k, v, AttentionMask.toeplitz(table), scale=1.0)
        ga = torch.autograd.grad(a.sum(), weight)[0]
        b = pk.attention(q, k, v, AttentionMask.bias(dense_bias), scale=1.0)
        gb = torch.autograd.grad(b.sum(), weight)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_t5_buckets_match_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 300)
    for bidirectional in (True, False):
        want = t5.T5Attention._relative_position_bucket(rel, bidirectional, 32, 128)
        assert torch.equal(t5_bucket(rel, bidirectional, 32, 128), want)


# ------------------------------------------------------------------------------------------ bad input


q0 = torch.randn(2, 4, 8, 32, device=DEVICE)
k0 = torch.randn(2, 2, 10, 32, device=DEVICE)
M = AttentionMask
BAD = {
    "k head dim": (lambda: pk.attention(q0, k0[..., :16], k0[..., :16]), ValueError, "k must have shape"),
    "k batch": (lambda: pk.attention(q0, k0[:1], k0[:1]), ValueError, "k must have shape"),
    "v shape": (lambda: pk.attention(q0, k0, k0[:, :, :9]), ValueError, "v must have k's shape"),
    "heads": (lambda: pk.attention(q0, q0[:, :3], q0[:, :3]), ValueError, "not a multiple of k's 3 heads"),
    "head dim small": (lambda: pk.attention(q0[..., :8], k0[..., :8], k0[..., :8]), ValueError,
                       r"head dim .* must be in \[16, 256\]"),
    "head dim large": (lambda: pk.attention(*(torch.randn(1, 1, 2, 264, device=DEVICE),) * 3), ValueError,
                       "head dim"),
    "dtypes": (lambda: pk.attention(q0, k0.half(), k0.half()), TypeError, "k has dtype"),
    "integer": (lambda: pk.attention(q0.long(), k0.long(), k0.long()), TypeError, "q must have dtype"),
    "devices": (lambda: pk.attention(q0, k0.to("meta"), k0.to("meta")), ValueError, "k is on meta"),
    "3-D q": (lambda: pk.attention(q0[0], k0, k0), ValueError, "q must be 4-D"),
    "tensor mask": (lambda: pk.attention(q0, k0, k0, torch.ones(8, 10, dtype=torch.bool)), TypeError,
                    "mask must be an AttentionMask"),
    "dropout": (lambda: pk.attention(q0, k0, k0, dropout_p=1.0), ValueError, "dropout_p must be"),
    "seed and generator": (lambda: pk.attention(q0, k0, k0, dropout_p=0.1, seed=1, generator=torch.Generator()),
                           ValueError, "seed or generator"),
    "scale": (lambda: pk.attention(q0, k0, k0, scale=float("nan")), ValueError, "scale must be"),
    "dense broadcast": (lambda: pk.attention(q0, k0, k0, M.dense(torch.ones(3, 10, dtype=torch.bool))),
                        ValueError, r"dense mask of shape \(1, 1, 3, 10\) does not broadcast"),
    "dense dtype": (lambda: M.dense(torch.ones(8, 10)), TypeError, "dense mask must have dtype"),
    "dense dims": (lambda: M.dense(torch.ones(10, dtype=torch.bool)), ValueError, "2 to 4 dimensions"),
    "bias broadcast": (lambda: pk.attention(q0, k0, k0, M.bias(torch.randn(3, 8, 10))), ValueError,
                       "bias of shape .* does not broadcast"),
    "bias integer": (lambda: M.bias(torch.ones(8, 10, dtype=torch.long)), TypeError, "bias must have dtype"),
    "toeplitz size": (lambda: pk.attention(q0, k0, k0, M.toeplitz(torch.randn(4, 10))), ValueError,
                      r"toeplitz table must have shape \[4 or 1, Lq \+ Lk - 1 = 17\]"),
    "lengths range": (lambda: pk.attention(q0, k0, k0, M.key_padding(lengths=[3, 11])), ValueError,
                      r"key_padding lengths must lie in \[0, Lk = 10\]"),
    "negative lengths": (lambda: pk.attention(q0, k0, k0, M.prefix_lm([-1, 2])), ValueError,
                         r"prefix_lm lengths must lie in \[0, Lk = 10\]"),
    "lengths batch": (lambda: pk.attention(q0, k0, k0, M.key_padding(lengths=[3, 4, 5])), ValueError,
                      "must have 2 entries"),
    "float lengths": (lambda: M.key_padding(lengths=torch.tensor([2.0])), TypeError, "lengths must have dtype"),
    "float ids": (lambda: M.segments(torch.zeros(2, 8)), TypeError, "segments q_ids must have dtype"),
    "ids shape": (lambda: pk.attention(q0, k0, k0, M.segments(torch.zeros(2, 8, dtype=torch.long),
                                                                torch.zeros(2, 9, dtype=torch.long))),
                  ValueError, r"segments k_ids must have shape \[2 or 1, 10\]"),
    "ids without k_ids": (lambda: pk.attention(q0, k0, k0, M.segments(torch.zeros(2, 8, dtype=torch.long))),
                          ValueError, "without k_ids needs Lq == Lk"),
    "key padding both": (lambda: M.key_padding(lengths=[1], mask=torch.ones(1, 2, dtype=torch.bool)), ValueError,
                         "exactly one of"),
    "window": (lambda: M.sliding_window(-1, 0), ValueError, "left must be a non-negative int"),
    "causal align": (lambda: M.causal("top-left"), ValueError, "align must be"),
    # the SDPA drop-in raises what torch raises (torch's own error where the kernels do not cover the input)
    "sdpa gqa": (lambda: pk.scaled_dot_product_attention(q0, k0, k0), RuntimeError, "size of tensor a"),
    "sdpa mask dims": (lambda: pk.scaled_dot_product_attention(q0[0], q0[0], q0[0],
                                                               torch.ones(1, 1, 8, 8, dtype=torch.bool)),
                       RuntimeError, "broadcast shape"),
    "sdpa mask dtype": (lambda: pk.scaled_dot_product_attention(q0, q0, q0, torch.ones(8, 8, dtype=torch.long)),
                        RuntimeError, "attn_mask dtype"),
    "sdpa mask size": (lambda: pk.scaled_dot_product_attention(q0, q0, q0, torch.ones(8, 7, dtype=torch.bool)),
                       RuntimeError, r"attn_mask of shape \(8, 7\) does not broadcast .* \[2, 4, 8, 8\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case):
    fn, exc, message = BAD[case]
    with pytest.raises(exc, match=message):
        fn()


# ----------------------------------------------------------------------------- torch.library contract


def opcheck_cases(rng, impl):
    B, H, Hk, Lq, Lk, D = (2, 2, 1, 13, 21, 16) if interpreted(impl) else (2, 4, 2, 13, 21, 16)
    q = rng.randn(B, Lq, H, D).transpose(1, 2).requires_grad_(True)  # strided
    k, v = (rng.randn(B, Hk, Lk, D).requires_grad_(True) for _ in range(2))
    every = random_spec(rng, B, H, Lq, Lk, {"prefix", "window", "key_lengths", "segments", "dense", "bias",
                                            "toeplitz"})
    return {
        "plain": (q, k, v, AttentionMask(), 0.0),
        "every part and dropout": (q, k, v, mask_of(every), 0.2),
        "causal": (q, k, v, AttentionMask.causal() & AttentionMask.key_padding(lengths=[Lk, 5]), 0.0),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", ["every part and dropout", "plain", "causal"])
def test_opcheck(impl, case, rng):
    if interpreted(impl) and case != "every part and dropout":
        pytest.skip("the Triton interpreter is slow: opcheck runs the case with every part only")
    q, k, v, mask, p = opcheck_cases(rng, impl)[case]
    with backend.use(attention=impl):
        args = op_args(q, k, v, mask, 0.25, p, seed=7 if p else None)
        torch.library.opcheck(torch.ops.ptm.attention.default, args)
        out, lse = torch.ops.ptm.attention(*args)
        q, k, v, params = ARGS.unflatten([a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        bias = params.bias  # the backward op with every gradient the biases can have
        wants = dataclasses.replace(bias, dense_requires_grad=bias.dense is not None,
                                    toeplitz_requires_grad=bias.toeplitz is not None)
        bwd_args = BACKWARD_ARGS.flatten(torch.randn_like(out), q, k, v, out.detach(), lse,
                                         dataclasses.replace(params, bias=wants))
        torch.library.opcheck(torch.ops.ptm.attention_backward.default, bwd_args)


def test_gradcheck_float64(rng):
    """The registered backward against finite differences (float64 runs on the reference)."""
    d = dict(dtype=torch.float64)
    q, k, v = rng.randn(1, 2, 5, 16, **d), rng.randn(1, 1, 7, 16, **d), rng.randn(1, 1, 7, 16, **d)
    bias, table = rng.randn(1, 2, 1, 7, **d), rng.randn(2, 11, **d)
    fixed = AttentionMask.causal() & AttentionMask.key_padding(lengths=[6])

    def f(q, k, v, bias, table):
        return pk.attention(q, k, v, fixed & AttentionMask.bias(bias) & AttentionMask.toeplitz(table))

    leaves = [t.requires_grad_(True) for t in (q, k, v, bias, table)]
    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_compile_fullgraph(impl, rng, monkeypatch):
    """The mask built inside the graph, the dropout seed drawn in-graph, forward and backward."""
    if impl == "reference":  # let the graph compute a block map too (the reference ignores it)
        monkeypatch.setattr(reference_kernels, "attention_tile", lambda d, dtype, device: (16, 16), raising=False)
    torch._dynamo.reset()
    B, H, Lq, Lk, D = 2, 2, 24, 40, 32
    q, k, v = rng.randn(B, H, Lq, D), rng.randn(B, 1, Lk, D), rng.randn(B, 1, Lk, D)
    bias = rng.randn(1, H, Lq, Lk)
    lengths = torch.tensor([Lk, 17], device=DEVICE)

    def f(q, k, v, bias, p):
        mask = AttentionMask.causal() & AttentionMask.key_padding(lengths=lengths) & AttentionMask.bias(bias)
        return pk.attention(q, k, v, mask, dropout_p=p)

    def run(fn, p):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        torch.manual_seed(0)
        out = fn(*leaves, p)
        return (out,) + torch.autograd.grad(out.sum(), leaves)

    compiler = "inductor" if impl == "reference" else "aot_eager"  # inductor once; the rest checks tracing
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    with backend.use(attention=impl):
        for a, b in zip(run(f, 0.0), run(compiled, 0.0)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if impl != "reference":
            return  # dropout's seed is drawn in the graph whatever the backend: checked once
        # inductor draws its own random numbers, but from torch's generator: manual_seed reproduces them
        first, second = run(compiled, 0.1), run(compiled, 0.1)
        for a, b in zip(first, second):
            assert torch.equal(a, b), "compiled dropout is not reproducible under torch.manual_seed"
        assert not torch.equal(first[0], run(compiled, 0.0)[0])


# ---------------------------------------------------------------------------------------- nn module


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_head_attention_module(impl, rng):
    mha = pk.nn.MultiHeadAttention(64, 4, num_kv_heads=2, bias=True, rotary_dim=16).to(DEVICE)
    assert set(mha.state_dict()) == {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}
    x = rng.randn(2, 11, 64)
    mask = AttentionMask.causal() & AttentionMask.key_padding(lengths=[11, 6])
    with backend.use(attention=impl):
        got = mha(x, mask)
    q = mha.q_proj(x).view(2, 11, 4, 16).transpose(1, 2)
    k = mha.k_proj(x).view(2, 11, 2, 16).transpose(1, 2)
    v = mha.v_proj(x).view(2, 11, 2, 16).transpose(1, 2)
    q, k = mha.rotary(q, k)
    vis = visible({"causal": True, "key_lengths": [11, 6]}, 2, 4, 11, 11)
    want, _ = oracle(q.double(), k.double(), v.double(), vis)
    want = mha.o_proj(want.float().transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    with backend.use(attention=impl):
        cross = mha(x, context=rng.randn(2, 5, 64))
    assert cross.shape == (2, 11, 64)
