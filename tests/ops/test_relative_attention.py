"""relative_attention / two_stream_attention: every backend against plain-PyTorch transcriptions (written here)
of transformers' XLNet `rel_attn_core` (einsum + rel_shift_bnij, seg_mat, attn_mask, two streams with a
target_mapping) and of the original Transformer-XL `RelPartialLearnableMultiHeadAttn` (memory, rel_shift by
zero-pad reshape, same_length, clamp_len): forward and every gradient, float32 and bfloat16.

The transcriptions run in float64 (the truth) and in the inputs' dtype (torch's own error, the half-precision
baseline of tests/compare.py). Random data from each test's seed (tests/conftest.py; PTM_TEST_SEED=random draws fresh ones).
"""

import importlib
import math
import random

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import AttentionMask, backend, reference_relative

from ..compare import assert_close, reduced_slack_scale
from ..conftest import DEVICE, backend_params
from .common import run

IMPLS = backend_params("relative_attention")
DTYPES = [torch.float32, torch.bfloat16]
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def interpreted(impl):
    return impl == "triton" and backend.triton_interpreted()


@pytest.fixture
def rng(seed):
    return random.Random(seed)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(DEVICE, dtype)


# ------------------------------------------------------------------------------- XLNet transcription


def rel_shift_bnij(x, klen):
    """transformers' XLNetRelativeAttention.rel_shift_bnij."""
    B, N, I, J = x.shape
    x = x.reshape(B, N, J, I)[:, :, 1:, :].reshape(B, N, I, J - 1)
    return torch.index_select(x, 3, torch.arange(klen, device=x.device, dtype=torch.long))


def xlnet_rel_attn_core(q_head, k_head_h, v_head_h, k_head_r, r_w_bias, r_r_bias, r_s_bias, seg_embed, seg_mat,
                        attn_mask, scale):
    """transformers' XLNetRelativeAttention.rel_attn_core (no dropout): layouts ibnd, seg_mat [i, j, b, 2],
    attn_mask float [i, j, b, 1] (1 = masked)."""
    ac = torch.einsum("ibnd,jbnd->bnij", q_head + r_w_bias, k_head_h)
    bd = torch.einsum("ibnd,jbnd->bnij", q_head + r_r_bias, k_head_r)
    bd = rel_shift_bnij(bd, klen=ac.shape[3])
    if seg_mat is None:
        ef = 0
    else:
        ef = torch.einsum("ibnd,snd->ibns", q_head + r_s_bias, seg_embed)
        ef = torch.einsum("ijbs,ibns->bnij", seg_mat, ef)
    attn_score = (ac + bd + ef) * scale
    if attn_mask is not None:
        attn_score = attn_score - 1e30 * torch.einsum("ijbn->bnij", attn_mask)
    attn_prob = torch.softmax(attn_score, dim=3)
    return torch.einsum("bnij,jbnd->ibnd", attn_prob, v_head_h)


def xlnet_positions(klen, qlen, attn_type="bi", clamp_len=-1):
    beg, end = (klen, -qlen) if attn_type == "bi" else (klen, -1)
    pos = torch.arange(beg, end, -1.0, dtype=torch.float64)
    return pos.clamp(-clamp_len, clamp_len) if clamp_len > 0 else pos


def sinusoid(pos_seq, d_model):
    inv_freq = 1 / torch.pow(10000, torch.arange(0, d_model, 2.0, dtype=torch.float64) / d_model)
    x = pos_seq[:, None] * inv_freq
    return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


def projected_r(pos_seq, H, D, B=None):
    """A position embedding projected per head, [H, R, D] (or [B, H, R, D]), as the models build r."""
    emb = sinusoid(pos_seq, 2 * D).to(DEVICE)  # [R, 2D]
    w = randn(2 * D, H, D, dtype=torch.float64, scale=1 / math.sqrt(2 * D))
    r = torch.einsum("ie,ehd->hid", emb, w)
    if B is not None:
        r = r.unsqueeze(0) + randn(B, H, r.shape[1], D, dtype=torch.float64, scale=0.1)
    return r


def xlnet_reference(q, qg, k, v, r, u, vb, sb, se, seg_ids, mems_len, mask_h, mask_g, tmap, scale):
    """Our layout in, the transformers computation inside: -> (content out, query out or None) [B, H, L, D].

    mask_h / mask_g: float [Lq, Lk, B, 1] (1 = masked); tmap: [Lg, Lq, B] one-hot target_mapping or None.
    """
    tr = lambda t: t.permute(2, 0, 1, 3)  # [B, H, L, D] -> [L, B, H, D]
    back = lambda t: t.permute(1, 2, 0, 3)
    rr = r if r.dim() == 4 else r.unsqueeze(0).expand(q.shape[0], *r.shape)
    k_head_r = rr.permute(2, 0, 1, 3)
    seg_mat = None
    if seg_ids is not None:
        B = q.shape[0]
        cat_ids = torch.cat([seg_ids.new_zeros(B, mems_len), seg_ids], dim=1).t()
        seg_mat = (seg_ids.t()[:, None] != cat_ids[None, :]).long()
        seg_mat = torch.nn.functional.one_hot(seg_mat, num_classes=2).to(q.dtype)
    h = xlnet_rel_attn_core(tr(q), tr(k), tr(v), k_head_r, u, vb, sb, se, seg_mat, mask_h, scale)
    g = None
    if qg is not None:
        q_head_g = tr(qg)
        if tmap is not None:
            q_head_g = torch.einsum("mbnd,mlb->lbnd", q_head_g, tmap.to(q.dtype))
        g = xlnet_rel_attn_core(q_head_g, tr(k), tr(v), k_head_r, u, vb, sb, se, seg_mat, mask_g, scale)
        if tmap is not None:
            g = torch.einsum("lbnd,mlb->mbnd", g, tmap.to(q.dtype))
        g = back(g)
    return back(h), g


# ---------------------------------------------------------------------------- Transformer-XL transcription


def txl_rel_shift(x):
    """The original Transformer-XL RelPartialLearnableMultiHeadAttn._rel_shift: x [qlen, klen, B, H]."""
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)
    x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return x_padded[1:].view_as(x)


def txl_attention(q, k, v, r, u, vb, attn_mask, scale):
    """RelPartialLearnableMultiHeadAttn's core: q [B, H, Lq, D], k/v [B, H, Lk, D] (memory first),
    r [H, Lk, D] (r_head_k), attn_mask bool [Lq, Lk] (True = masked)."""
    w_head_q, w_head_k, w_head_v = (t.permute(2, 0, 1, 3) for t in (q, k, v))
    r_head_k = r.permute(1, 0, 2)  # [rlen, n_head, d_head]
    AC = torch.einsum("ibnd,jbnd->ijbn", w_head_q + u, w_head_k)
    BD = torch.einsum("ibnd,jnd->ijbn", w_head_q + vb, r_head_k)
    BD = txl_rel_shift(BD)
    attn_score = (AC + BD) * scale
    attn_score = attn_score.float().masked_fill(attn_mask[:, :, None, None], -float("inf")).type_as(attn_score)
    attn_prob = torch.softmax(attn_score, dim=1)
    return torch.einsum("ijbn,jbnd->ibnd", attn_prob, w_head_v).permute(1, 2, 0, 3)


def txl_mask(qlen, mlen, same_length, mem_len):
    """The original dec_attn_mask (True = masked)."""
    klen = qlen + mlen
    all_ones = torch.ones(qlen, klen, device=DEVICE)
    if same_length:
        mask_len = klen - mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        return (torch.triu(all_ones, 1 + mlen) + torch.tril(all_ones, -mask_shift_len)).bool()
    return torch.triu(all_ones, diagonal=1 + mlen).bool()


# --------------------------------------------------------------------------------------- comparing


# Known gap: the Triton backward rounds P and dS to the input dtype before its matmuls, and the [H, D] bias
# vectors' gradients sum those rounded rows over every query: in bf16 they reach ~5x torch's error, not 2x.
_BIAS_VECTORS = ("u", "v_bias", "s_bias", "seg_embed")
_TRITON_HALF_FACTOR = {n: 5.0 for n in _BIAS_VECTORS}


def check_all(outs, grads, truth_outs, truth_grads, base_outs, base_grads, names, dtype, impl="reference"):
    for o, t, b, n in zip(outs, truth_outs, base_outs, ("out", "out_g")):
        assert_close(o, t, b, name=n, precision=dtype, **F32_TOL)
    # The [H, D] bias vectors' gradients sum q's gradient rows (both streams): their slack follows that sum.
    dq_rows = [t for t, n in zip(truth_grads, names) if n in ("q", "q_query") and t is not None]
    rows = sum(t.shape[0] * t.shape[2] for t in dq_rows)
    reduced = max(reduced_slack_scale(t, rows) for t in dq_rows)
    for g, t, b, n in zip(grads, truth_grads, base_grads, names):
        if t is None:
            continue
        assert g is not None, f"no gradient for {n}"
        factor = _TRITON_HALF_FACTOR.get(n, 2.0) if impl == "triton" and dtype in (torch.bfloat16, torch.float16) else 2.0
        slack = reduced if n in _BIAS_VECTORS else None
        assert_close(g, t, b, name=f"d{n}", precision=dtype, factor=factor, slack_scale=slack, **F32_TOL)


def max_errors(grads, truth_grads, names):
    return {n: (g.double() - t).abs().max().item() for g, t, n in zip(grads, truth_grads, names)
            if g is not None and t is not None}


# ------------------------------------------------------------------------------------------- tests


def xlnet_case(rng, impl, two_stream, bi_data=False, segments=True):
    small = interpreted(impl)
    B, H = rng.choice([1, 2]), rng.choice([1, 2, 3])
    D = rng.choice([16, 32] if small else [16, 32, 64])
    Lq = rng.randint(3, 12 if small else 40)
    M = rng.choice([0, rng.randint(1, 8 if small else 24)])
    Lk = M + Lq
    attn_type = rng.choice(["bi", "uni"])
    pos = xlnet_positions(Lk, Lq, attn_type, clamp_len=rng.choice([-1, 4]))
    r = projected_r(pos, H, D, B=B if bi_data else None)
    # permutation mask: a random order of the current segment, i sees j iff order[j] < order[i] (+ memory)
    order = torch.stack([torch.randperm(Lq) for _ in range(B)]).to(DEVICE)  # [B, Lq]
    perm = (order[:, None, :] >= order[:, :, None]).double()  # 1 = masked: j not before i (incl. itself)
    if attn_type == "uni":  # XLNet's uni attention is causal too (r has no rows for future keys)
        perm = torch.maximum(perm, torch.ones(Lq, Lq, device=DEVICE, dtype=torch.float64).triu(1))
    mask_g = torch.cat([torch.zeros(B, Lq, M, device=DEVICE, dtype=torch.float64), perm], dim=2)  # [B, Lq, Lk]
    non_tgt = mask_g.clone()
    non_tgt[:, torch.arange(Lq), M + torch.arange(Lq)] = 0.0  # the content stream sees itself
    # a query-stream row that sees nothing (eager gives a uniform row there, we give zeros): let it see itself
    empty = (mask_g == 1).all(-1)  # [B, Lq]
    diag = mask_g[:, torch.arange(Lq), M + torch.arange(Lq)]
    mask_g[:, torch.arange(Lq), M + torch.arange(Lq)] = torch.where(empty, 0.0, diag)
    case = dict(B=B, H=H, D=D, Lq=Lq, M=M, r=r, mask_h=non_tgt, mask_g=mask_g)
    case["seg_ids"] = torch.randint(0, 2, (B, Lq), device=DEVICE) if segments else None
    if two_stream:
        Lg = rng.randint(1, Lq)
        tpos = torch.stack([torch.randperm(Lq)[:Lg] for _ in range(B)]).to(DEVICE)  # [B, Lg]
        tmap = torch.zeros(Lg, Lq, B, device=DEVICE, dtype=torch.float64)
        for b in range(B):
            tmap[torch.arange(Lg), tpos[b], b] = 1.0
        case.update(Lg=Lg, tpos=tpos, tmap=tmap)
    return case


def run_xlnet(impl, case, dtype, two_stream):
    B, H, D, Lq, M = case["B"], case["H"], case["D"], case["Lq"], case["M"]
    Lk = Lq + M
    scale = 1 / math.sqrt(D)
    q, k, v = randn(B, H, Lq, D, dtype=torch.float64), randn(B, H, Lk, D, dtype=torch.float64), \
        randn(B, H, Lk, D, dtype=torch.float64)
    u, vb, sb = (randn(H, D, dtype=torch.float64, scale=0.5) for _ in range(3))
    se = randn(2, H, D, dtype=torch.float64, scale=0.5)
    r = case["r"]
    seg_ids = case["seg_ids"]
    Lg = case.get("Lg", Lq)
    qg = randn(B, H, Lg, D, dtype=torch.float64) if two_stream else None
    mask_h = case["mask_h"].permute(1, 2, 0)[..., None]  # [Lq, Lk, B, 1]
    mask_g = case["mask_g"].permute(1, 2, 0)[..., None]
    tmap = case.get("tmap")
    seg_leaves = (sb, se) if seg_ids is not None else (None, None)
    inputs = [q, qg, k, v, r, u, vb, *seg_leaves]
    names = ["q", "q_query", "k", "v", "r", "u", "v_bias", "s_bias", "seg_embed"]

    def ours(q, qg, k, v, r, u, vb, sb, se):
        kw = dict(scale=scale, segment_ids=seg_ids, seg_embed=se, s_bias=sb) if seg_ids is not None else \
            dict(scale=scale)
        vis_h = AttentionMask.dense(case["mask_h"][:, None] == 0)
        if not two_stream:
            return pk.relative_attention(q, k, v, r, u, vb, mask=vis_h, **kw)
        tpos = case.get("tpos")
        rows = case["mask_g"] if tpos is None else case["mask_g"].gather(1, tpos[..., None].expand(-1, -1, Lk))
        vis_g = AttentionMask.dense(rows[:, None] == 0)
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=tpos, content_mask=vis_h,
                                       query_mask=vis_g, **kw)

    def theirs(q, qg, k, v, r, u, vb, sb, se):
        h, g = xlnet_reference(q, qg, k, v, r, u, vb, sb, se, seg_ids, M, mask_h.to(q.dtype), mask_g.to(q.dtype),
                               tmap, scale)
        return (h, g) if two_stream else h

    gouts = [randn(B, H, Lq, D, dtype=torch.float64)] + ([randn(B, H, Lg, D, dtype=torch.float64)]
                                                         if two_stream else [])
    cast = [None if t is None else t.to(dtype) for t in inputs]
    with backend.use(relative_attention=impl):
        outs, grads = run(ours, cast, gouts)
    truth_outs, truth_grads = run(theirs, inputs, gouts)
    base_outs, base_grads = run(theirs, cast, gouts)
    check_all(outs, grads, truth_outs, truth_grads, base_outs, base_grads, names, dtype, impl)
    return max_errors(grads, truth_grads, names)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_xlnet_single_stream(impl, dtype, rng):
    case = xlnet_case(rng, impl, two_stream=False)
    print(run_xlnet(impl, case, dtype, two_stream=False))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target_mapping", [False, True], ids=["all_rows", "target_mapping"])
def test_xlnet_two_stream(impl, dtype, target_mapping, rng):
    case = xlnet_case(rng, impl, two_stream=True)
    if not target_mapping:
        for key in ("Lg", "tpos", "tmap"):
            case.pop(key)
    print(run_xlnet(impl, case, dtype, two_stream=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_xlnet_bi_data_and_no_segments(impl, rng):
    """r per batch row ([B, H, R, D], XLNet's bi_data) and no segment term."""
    case = xlnet_case(rng, impl, two_stream=True, bi_data=True, segments=False)
    print(run_xlnet(impl, case, torch.float32, two_stream=True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["memory", "same_length", "clamp_len", "no_memory"])
def test_transformer_xl(impl, dtype, variant, rng):
    small = interpreted(impl)
    B, H = rng.choice([1, 2]), rng.choice([1, 2, 4])
    D = rng.choice([16, 32] if small else [16, 32, 64])
    Lq = rng.randint(2, 12 if small else 40)
    M = 0 if variant == "no_memory" else rng.randint(1, 10 if small else 30)
    Lk = M + Lq
    clamp_len = rng.randint(1, Lk) if variant == "clamp_len" else -1
    pos_seq = torch.arange(Lk - 1, -1, -1.0, dtype=torch.float64)
    if clamp_len > 0:
        pos_seq = pos_seq.clamp(max=clamp_len)
    r = projected_r(pos_seq, H, D)  # [H, Lk, D]
    same_length = variant == "same_length"
    mem_len = M + rng.randint(0, 3)  # the configured mem_len (>= the memory actually present)
    masked = txl_mask(Lq, M, same_length, mem_len)
    mask = AttentionMask.causal()
    if same_length:  # visible iff i' - j < mask_shift_len + M (and causal)
        mask_len = Lk - mem_len
        shift = Lq - mask_len if mask_len > 0 else Lq
        mask = mask & AttentionMask.sliding_window(shift + M - 1, 0)
        if (masked.all(-1)).any():
            pytest.skip("this same_length configuration masks whole rows (eager gives NaN there)")
    assert torch.equal(reference_relative.relative_visibility(
        1, 1, Lq, Lk, Lq, None, DEVICE, mask.visibility(1, 1, Lq, Lk, DEVICE))[0, 0], ~masked)
    scale = 1 / math.sqrt(D)
    q, k, v = (randn(B, H, L, D, dtype=torch.float64) for L in (Lq, Lk, Lk))
    u, vb = randn(H, D, dtype=torch.float64, scale=0.5), randn(H, D, dtype=torch.float64, scale=0.5)
    inputs = [q, k, v, r, u, vb]
    names = ["q", "k", "v", "r", "u", "v_bias"]
    gouts = [randn(B, H, Lq, D, dtype=torch.float64)]

    def ours(q, k, v, r, u, vb):
        return pk.relative_attention(q, k, v, r, u, vb, mask=mask, scale=scale)

    def theirs(q, k, v, r, u, vb):
        return txl_attention(q, k, v, r, u, vb, masked, scale)

    cast = [t.to(dtype) for t in inputs]
    with backend.use(relative_attention=impl):
        outs, grads = run(ours, cast, gouts)
    truth_outs, truth_grads = run(theirs, inputs, gouts)
    base_outs, base_grads = run(theirs, cast, gouts)
    check_all(outs, grads, truth_outs, truth_grads, base_outs, base_grads, names, dtype, impl)
    print(max_errors(grads, truth_grads, names))


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_parts_padding_and_empty_rows(impl, rng):
    """Key padding, prefix-LM and segment-visibility parts, and a row that sees nothing (zeros, no NaN),
    against the reference formula in float64."""
    B, H, D, Lq, M = 2, 2, 16, rng.randint(3, 10), rng.randint(0, 5)
    Lk = Lq + M
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r = randn(H, Lk + Lq, D)
    u, vb = randn(H, D), randn(H, D)
    lengths = torch.tensor([Lk, rng.randint(1, Lk)])
    ids = torch.randint(0, 2, (B, Lk), device=DEVICE)
    masks = [AttentionMask.key_padding(lengths=lengths), AttentionMask.prefix_lm([M + 1, Lk]),
             AttentionMask.segments(ids[:, M:], ids) & AttentionMask.causal(),
             AttentionMask.key_padding(lengths=[0, Lk])]  # batch row 0 sees no key
    for mask in masks:
        inputs = [q, k, v, r, u, vb]
        gout = [randn(B, H, Lq, D)]
        f = lambda q, k, v, r, u, vb: pk.relative_attention(q, k, v, r, u, vb, mask=mask)
        with backend.use(relative_attention=impl):
            outs, grads = run(f, inputs, gout)
        truth_outs, truth_grads = run(f, [t.double() for t in inputs], [g.double() for g in gout])
        for a, t, n in zip(list(outs) + list(grads), list(truth_outs) + list(truth_grads),
                           ["out", "dq", "dk", "dv", "dr", "du", "dv_bias"]):
            assert_close(a, t, name=f"{mask}: {n}", **F32_TOL)
    lengths0 = masks[-1]
    out = pk.relative_attention(q, k, v, r, u, vb, mask=lengths0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def _eager_relative(q, k, v, r, u, v_bias, scale, r_offset):
    """The scores of reference_relative's docstring written with autograd's ops (causal, Transformer-XL's mask):
    an oracle for the op's hand-written backward, in float64."""
    Lq, Lk, R = q.shape[2], k.shape[2], r.shape[-2]
    qu = q if u is None else q + u[None, :, None, :]
    qv = q if v_bias is None else q + v_bias[None, :, None, :]
    i, j = torch.arange(Lq, device=q.device)[:, None], torch.arange(Lk, device=q.device)[None, :]
    t = r_offset - (i + Lk - Lq - j)
    valid = (t >= 0) & (t < R)
    pos = (qv @ r.transpose(-1, -2)).gather(-1, t.clamp(0, R - 1).expand(*q.shape[:2], Lq, Lk)) * valid
    s = ((qu @ k.transpose(-1, -2) + pos) * scale).masked_fill(j > i + Lk - Lq, float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("biases", ["u", "v_bias", "none", "both"])
def test_bias_gradients(impl, biases, rng):
    """The op returns the gradients of q, u and v_bias itself (q + u and q + v_bias are formed inside it): each
    combination of given biases against autograd through the eager formula in float64 (row tiles of several key
    tiles, memory, r rows missing at the end)."""
    _bias_gradients(impl, biases, rng)


@pytest.mark.skipif(not backend.triton_interpreted(),
                    reason="the interpreter's own tiles are 16 x 16; a GPU runs 64-row tiles for 16-bit inputs itself")
@pytest.mark.parametrize("biases", ["u", "v_bias", "none"])
def test_bias_gradients_gpu_tiles_interpreted(biases, rng, monkeypatch):
    """test_bias_gradients on the GPU's 16-bit tiles (64 rows, band-major: the dq kernel's one accumulator is
    dq^T there), under the interpreter."""
    _row_tiles_of_64(monkeypatch)
    _bias_gradients("triton", biases, rng)


def _bias_gradients(impl, biases, rng):
    B, H, D = 2, 2, 16
    Lq, M = rng.randint(20, 80), rng.randint(0, 20)
    Lk = Lq + M
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r = randn(H, Lk - rng.randint(0, 4), D)
    u = randn(H, D) if biases in ("u", "both") else None
    vb = randn(H, D) if biases in ("v_bias", "both") else None
    gout = [randn(B, H, Lq, D)]
    scale, r_offset = 0.3, Lk - 1
    with backend.use(relative_attention=impl):
        outs, grads = run(lambda *a: pk.relative_attention(*a, scale=scale, r_offset=r_offset,
                                                           mask=AttentionMask.causal()), [q, k, v, r, u, vb], gout)
    truth_outs, truth = run(lambda *a: _eager_relative(*a, scale, r_offset),
                            [None if t is None else t.double() for t in (q, k, v, r, u, vb)], gout)
    assert_close(outs[0], truth_outs[0], name="out", **F32_TOL)
    for g, t, n in zip(grads, truth, ("q", "k", "v", "r", "u", "v_bias")):
        assert (g is None) == (t is None), f"d{n}: {g is None} / {t is None}"
        if t is not None:
            assert_close(g, t, name=f"d{n}", **F32_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_saves_q_not_its_biased_copies(impl, rng):
    """For the backward the op keeps q itself: q + u and q + v_bias are formed again there, not saved (one
    [B, H, Lq, D] tensor per stream saved besides the output, where the eager models keep two)."""
    B, H, Lq, D = 2, 2, 8, 16
    q, k, v = (randn(B, H, Lq, D).requires_grad_(True) for _ in range(3))
    r, u, vb = randn(H, Lq, D), randn(H, D).requires_grad_(True), randn(H, D).requires_grad_(True)
    saved = []
    with backend.use(relative_attention=impl), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        out = pk.relative_attention(q, k, v, r, u, vb, mask=AttentionMask.causal())
    query_shaped = [t for t in saved if t.shape == q.shape]
    assert len(query_shaped) == 4, [tuple(t.shape) for t in saved]  # q, k, v and the output
    assert any(t.data_ptr() == q.data_ptr() for t in query_shaped), "q itself is not among the saved tensors"
    assert any(t.data_ptr() == out.data_ptr() for t in query_shaped)


@pytest.mark.parametrize("impl", IMPLS)
def test_several_row_and_key_tiles(impl, rng):
    """Rows and keys spanning several tiles (the Triton band path's per-tile offsets into r), r rows missing at
    both ends (r_offset, short r), segment term, both streams (all rows: consecutive rows in both, and target
    positions): forward and every gradient against the formula in float64."""
    _several_row_and_key_tiles(impl, rng)


@pytest.mark.skipif(not backend.triton_interpreted(),
                    reason="the interpreter's own tiles are 16 x 16; a GPU runs 64-row tiles for 16-bit inputs itself")
@pytest.mark.parametrize("row_halves, keys", [(False, None), (True, 32), (False, 64)],
                         ids=["one_band_dot", "dkdv_row_halves", "64_keys"])
def test_band_major_tiles_interpreted(rng, monkeypatch, row_halves, keys):
    """The GPU's 16-bit tiles, 64 rows, under the interpreter: their band products are band-major
    (triton/relative_attention/position._pos_band: r_band qv^T and dqv^T), a layout the 16-row tiles never take,
    and the dq kernel's band spans four 16-key steps (position._band_keys); row_halves: 32 keys a step and the
    dk/dv kernel's position term per row half (ROW_HALVES, as the GPU's D = 128 dk/dv); 64 keys: a band that
    serves one key tile. Same cases and tolerances as test_several_row_and_key_tiles."""
    _row_tiles_of_64(monkeypatch, row_halves=row_halves, keys=keys)
    _several_row_and_key_tiles("triton", rng)


@pytest.mark.skipif(not backend.triton_interpreted(),
                    reason="forces the GPU's 16-bit dk / dv layout on float32 inputs, which only the interpreter "
                           "computes exactly")
@pytest.mark.parametrize("tiles", ["interpreter", "gpu_d128", "gpu_d64_four_mask_terms"])
def test_dkdv_transposed_interpreted(rng, monkeypatch, tiles):
    """dk^T and dv^T accumulated (DKDV_T: the GPU's 16-bit dk / dv kernel, so that its dots have M = D rows) on
    float32 inputs, so the float64 comparison keeps float32 tolerances: the interpreter's 16 x 16 tiles, and the
    GPU's 64-row tiles with 32 keys, the position term per row half (ROW_HALVES, its D = 128 config) or the band
    whole (D = 64 with four mask terms). Same cases and tolerances as test_several_row_and_key_tiles (both streams
    among them)."""
    from ptm_kernels.triton.relative_attention import launch

    if tiles != "interpreter":
        _row_tiles_of_64(monkeypatch, keys=32, row_halves=tiles == "gpu_d128")
    config = launch._config

    def transposed(D, dtype, device, kernel="fwd", streams=1, mask_terms=0):
        cfg, warps = config(D, dtype, device, kernel, streams, mask_terms)
        if kernel == "dkdv":
            assert cfg["DKDV_T"] is False  # float32 keeps [BLOCK_N, D]: the flag below is what changes the path
            cfg = dict(cfg, DKDV_T=True)
        return cfg, warps

    monkeypatch.setattr(launch, "_config", transposed)
    _several_row_and_key_tiles("triton", rng)


@pytest.mark.skipif(not backend.triton_interpreted(),
                    reason="the interpreter's own tiles are 16 x 16; a GPU runs 64-row tiles for 16-bit inputs itself")
def test_dq_band_spans_key_tiles_interpreted(rng, monkeypatch):
    """The GPU's 16-bit dq tiles under the interpreter: 64 rows, 16 keys a step, one band product of 128 rows for
    four steps (position._band_keys; backward._stream_dq), dS's band image gathered over them before one dq^T dot
    and one set of dr atomics. Rows and keys over several tiles: a left window that starts the key loop 16 keys
    into a span, a causal end inside a span (fewer than four steps), r too short at both ends, both streams, dropout
    and every mask part, against the interpreter's own 16 x 16 tiles (same keep-mask); then the float64 formula
    (same cases and tolerances as test_several_row_and_key_tiles)."""
    import functools

    from ptm_kernels.triton.relative_attention import launch

    B, H, D, Lq, M = 1, 2, 16, rng.randint(100, 128), rng.randint(20, 40)
    Lk = Lq + M
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r = randn(H, Lk + rng.randint(0, 5), D)
    u, vb, sb, se = randn(H, D), randn(H, D), randn(H, D), randn(2, H, D)
    ids = torch.randint(0, 2, (B, Lq), device=DEVICE)
    dense = AttentionMask.dense(torch.rand(B, 1, Lq, Lk, device=DEVICE) > 0.2)
    lengths = AttentionMask.key_padding(lengths=torch.tensor([Lk - 7]))
    every = dense & lengths & AttentionMask.segments(ids, torch.randint(0, 2, (B, Lk), device=DEVICE))
    two_streams = functools.partial(pk.two_stream_attention, segment_ids=ids, seg_embed=se, s_bias=sb,
                                    r_offset=Lk - 2, content_mask=every, query_mask=every & AttentionMask.causal(),
                                    dropout_p=0.2, seed=11)
    window = AttentionMask.causal() & AttentionMask.sliding_window(rng.randint(70, 90), 0)
    windowed = functools.partial(pk.relative_attention, r_offset=Lk - 3, mask=window, dropout_p=0.1, seed=5)
    cases = [(two_streams, [q, q.flip(2), k, v, r, u, vb], [randn(B, H, Lq, D) for _ in range(2)]),
             (windowed, [q, k, v, r, u, vb], [randn(B, H, Lq, D)])]
    with backend.use(relative_attention="triton"):
        tiles_16 = [run(*case) for case in cases]
        _row_tiles_of_64(monkeypatch, keys=16)
        cfg, _ = launch._config(D, torch.float32, torch.device(DEVICE), "dq")
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BAND"]) == (64, 16, 128)
        tiles_64 = [run(*case) for case in cases]
    for c, (ours, theirs) in enumerate(zip(tiles_64, tiles_16)):
        for i, (a, t) in enumerate(zip([*ours[0], *ours[1]], [*theirs[0], *theirs[1]])):
            assert_close(a, t, name=f"case {c}, dropout and masks: output/gradient {i}", **F32_TOL)
    _several_row_and_key_tiles("triton", rng, Lq=(100, 128), M=(20, 40))


def _runs_tma() -> bool:
    """Where tensor descriptors run: the interpreter, or a Hopper (or later) GPU with the Triton backend."""
    if backend.triton_interpreted():
        return True
    return (DEVICE.type == "cuda" and backend.supports("triton", "relative_attention", "cuda")
            and torch.cuda.get_device_capability(DEVICE)[0] >= 9)


@pytest.mark.skipif(not _runs_tma(), reason="tensor descriptors (TMA) run under TRITON_INTERPRET=1 or on a Hopper "
                                            "GPU with the Triton backend")
@pytest.mark.parametrize("D, shared_r", [(16, True), (24, False)], ids=["shared_r", "per_batch_r_d24"])
def test_forward_through_tma_descriptors(rng, monkeypatch, D, shared_r):
    """The forward's Hopper TMA loads (triton/relative_attention/launch._tma_loads): r's band, whose first rows
    lie before r (negative coordinates) or past its end where r is short, and the key tiles of k and v, rows past
    Lk read as zeros; two batch rows sharing r (its batch coordinate 0) or each with its own r, a head dim below
    its power of two (D = 24 in 32 columns). The cases of test_several_row_and_key_tiles (causal window, both
    streams: all rows; target positions, whose gather form takes only k and v by TMA) on float32 inputs forced
    onto the TMA path (a GPU takes it for 16-bit inputs): on a Hopper GPU this checks the hardware's reading of a
    box at a negative coordinate."""
    from ptm_kernels.triton import _common
    from ptm_kernels.triton.relative_attention import launch

    made = []

    def recording(t, rows, block_d):
        made.append((tuple(t.shape), rows))
        return real(t, rows, block_d)

    def descriptors_made(name, r):
        # the forward's: r's band (r[:1] where the batch shares r) and k, v; the backward's kernels take none
        cfg, _ = launch._config(D, torch.float32, r.device)
        B, H, R = 2, r.shape[-3], r.shape[-2]
        key_tiles = [shape_rows for shape_rows in made if shape_rows[1] == cfg["BLOCK_N"]]
        assert len(key_tiles) == 2 and all(shape[:2] == (B, H) for shape, _ in key_tiles), (name, made)
        r_shape = (1, H, R, D) if shared_r else (B, H, R, D)
        assert sorted(made) == sorted([(r_shape, cfg["BAND"]), *key_tiles]), (name, made)
        made.clear()

    real = _common.tma_rows
    monkeypatch.setattr(launch, "_FORCE_TMA", True)
    monkeypatch.setattr(_common, "tma_rows", recording)
    _several_row_and_key_tiles("triton", rng, D=D, B=2, per_batch_r=not shared_r, after_case=descriptors_made)


@pytest.mark.skipif(not backend.triton_interpreted(), reason="reads the Triton launcher's arguments (interpreter)")
def test_dq_dqv_buffer_only_where_the_form_writes_it(rng, monkeypatch):
    """The dq kernel's float32 dqv buffer (zeroed [B, H, Lr, D], summed on the host) exists only for a stream
    whose form adds dqv up in memory (launch._dqv_in_memory): the query stream at target positions (the gather
    form) has one, the content stream (the band form, dqv in its dq accumulator) none; float32 head-dim chunks
    (tf32x3 at D >= 64) have one for both. A form that writes dqv without a buffer does not compile. Gradients
    against the float64 formula each time."""
    from ptm_kernels.triton import _common
    from ptm_kernels.triton.relative_attention import launch

    seen = []
    real_launch = launch._launch

    def recording(kernel, *a, **kw):
        args = real_launch(kernel, *a, **kw)
        if kernel is launch._rel_bwd_dq_kernel:
            seen.append([g.dqv is not None for g in args[2:4] if g is not None])
        return args

    monkeypatch.setattr(launch, "_launch", recording)
    B, H, Lq, D = 1, 2, 21, 16
    Lk, Lg = Lq + 4, 6
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r, u, vb = randn(H, Lk + Lq, D), randn(H, D), randn(H, D)
    tpos = torch.randperm(Lq, device=DEVICE)[:Lg].view(1, Lg)

    def targets(q, qg, k, v, r, u, vb):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=tpos)

    inputs = [q, q[:, :, :Lg], k, v, r, u, vb]
    gout = [randn(B, H, Lq, D), randn(B, H, Lg, D)]

    def check():
        with backend.use(relative_attention="triton"):
            outs, grads = run(targets, inputs, gout)
        truth_outs, truth_grads = run(targets, [t.double() for t in inputs], [g.double() for g in gout])
        for i, (a, t) in enumerate(zip(list(outs) + list(grads), list(truth_outs) + list(truth_grads))):
            assert_close(a, t, name=f"output/gradient {i}", **F32_TOL)

    check()
    assert seen == [[False, True]], seen
    monkeypatch.setattr(_common, "precision", lambda dtype, device: "tf32x3")
    D = 64
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    inputs = [q, q[:, :, :Lg], k, v, randn(H, Lk + Lq, D), randn(H, D), randn(H, D)]
    gout = [randn(B, H, Lq, D), randn(B, H, Lg, D)]
    seen.clear()
    check()
    assert seen == [[True, True]], seen
    monkeypatch.setattr(launch, "_dqv_in_memory", lambda *a: False)
    with pytest.raises(Exception, match="dqv buffer"):
        with backend.use(relative_attention="triton"):
            run(targets, inputs, gout)


@pytest.mark.skipif(not backend.triton_interpreted(), reason="reads the Triton launcher's arguments (interpreter)")
@pytest.mark.parametrize("pool", ["per_program", "shared"])
def test_dq_band_slots(rng, monkeypatch, pool):
    """The GPU's 16-bit dq tiles (64 rows, 16 keys a step) under the interpreter: the band-major band form keeps
    each span's band product and dS's band image in a slot of a pool (backward._stream_dq, _take_slot,
    launch._band_slots): the key steps read their position terms from the product and write dS into the image.
    A pool for the content stream only (the query stream at target positions runs the gather form), of
    min(programs, 2 per SM) slots: one per program (8 here), or 2 shared by the 8 programs (num_sms = 1; the
    interpreter runs programs one after another, so a program waits for no slot here: the wait itself needs a
    GPU). Filled with NaN before the launch, every slot's read part is written, and every lock is given back (0)
    after it. A NaN read back from a slot would reach the gradients, checked against the float64 formula. Without
    slots the form does not compile."""
    from ptm_kernels.triton import _common
    from ptm_kernels.triton.relative_attention import launch

    if pool == "shared":
        monkeypatch.setattr(_common, "num_sms", lambda device: 1)

    seen = []
    real_launch = launch._launch

    def unwritten(slots) -> bool:
        # float32 under the interpreter: per slot the product, then the image, each [64 rows, 64 + 128] skewed
        # (position._slot_skewed); the key steps read the product's columns 64 .. 127, the span the whole image
        product, image = slots.words.view(slots.count, 2, 64, 192).unbind(1)
        return bool(product[..., 64:128].isnan().any() or image.isnan().any())

    def recording(kernel, grid, device, cfg, warps, args, **kw):
        if kernel is not launch._rel_bwd_dq_kernel:
            return real_launch(kernel, grid, device, cfg, warps, args, **kw)

        def nan_slots(band):
            built = args(band)
            for g in built[2:4]:
                if g is not None and g.band_slots is not None:
                    g.band_slots.words.fill_(float("nan"))
            return built

        ran = real_launch(kernel, grid, device, cfg, warps, nan_slots, **kw)
        seen.append([(tuple(g.band_slots.words.shape), g.band_slots.count, unwritten(g.band_slots),
                      g.band_slots.locks.tolist()) if g.band_slots is not None else None
                     for g in ran[2:4] if g is not None])
        return ran

    _row_tiles_of_64(monkeypatch, keys=16)
    monkeypatch.setattr(launch, "_launch", recording)
    B, H, D, Lq, Lg = 2, 2, 16, rng.randint(100, 128), 9
    Lk = Lq + rng.randint(20, 40)
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r, u, vb = randn(H, Lk + Lq, D), randn(H, D), randn(H, D)
    tpos = torch.stack([torch.randperm(Lq, device=DEVICE)[:Lg] for _ in range(B)])

    def targets(q, qg, k, v, r, u, vb):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=tpos)

    inputs = [q, q[:, :, :Lg], k, v, r, u, vb]
    gout = [randn(B, H, Lq, D), randn(B, H, Lg, D)]
    with backend.use(relative_attention="triton"):
        outs, grads = run(targets, inputs, gout)
    truth_outs, truth_grads = run(targets, [t.double() for t in inputs], [g.double() for g in gout])
    for i, (a, t) in enumerate(zip(list(outs) + list(grads), list(truth_outs) + list(truth_grads))):
        assert_close(a, t, name=f"output/gradient {i}", **F32_TOL)
    programs = B * H * -(-Lq // 64)
    count = programs if pool == "per_program" else 2
    assert seen == [[((count, 2 * 64 * 192), count, False, [0] * count), None]], seen
    monkeypatch.setattr(launch, "_band_slots_in_memory", lambda *a: False)
    with pytest.raises(Exception, match="band slots"):
        with backend.use(relative_attention="triton"):
            run(targets, inputs, gout)


def _row_tiles_of_64(monkeypatch, keys=None, row_halves=False):
    """launch._config with the GPU's 16-bit row tiles (64 rows; keys per tile: the interpreter's, else `keys`);
    row_halves: the dk/dv kernel's position term per row half (ROW_HALVES, the GPU's D = 128 dk/dv)."""
    import triton

    from ptm_kernels.triton.relative_attention import launch

    interpreter_config = launch._config

    def row_tiles_of_64(D, dtype, device, kernel="fwd", streams=1, mask_terms=0):
        cfg, warps = interpreter_config(D, dtype, device, kernel, streams, mask_terms)
        n = keys or cfg["BLOCK_N"]
        cfg = dict(cfg, BLOCK_M=64, BLOCK_N=n, BAND=triton.next_power_of_2(64 + n))
        if kernel == "dkdv":
            assert cfg["ROW_HALVES"] is False  # the interpreter's own config: the flag below is what changes
            cfg["ROW_HALVES"] = row_halves
        return cfg, warps

    monkeypatch.setattr(launch, "_config", row_tiles_of_64)


@pytest.mark.skipif(not backend.triton_interpreted(),
                    reason="forces the GPU's float32 dot precision on the interpreter; a GPU chooses it itself")
@pytest.mark.parametrize("D", [16, 64])
def test_float32_gpu_paths_interpreted(rng, monkeypatch, D):
    """The GPU's float32 backward (input_precision tf32x3, which the interpreter computes exactly), paths an
    ieee-precision run never takes: at D >= 64 the head-dim dots run in chunks read from memory, dqv and dr per
    chunk (triton/relative_attention/backward._head_dim_dots; D = 64: four 16-column chunks for the dots, two
    32-column chunks for dqv and dr); below, on whole tiles, the dq
    kernel's dr chunks are a loop. Same cases and tolerances as test_several_row_and_key_tiles."""
    from ptm_kernels.triton import _common

    monkeypatch.setattr(_common, "precision", lambda dtype, device: "tf32x3")
    _several_row_and_key_tiles("triton", rng, D=D)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_dropout_matches_reference_given_the_backends_mask(impl, rng, monkeypatch):
    """Dropout (p = 0.3) forward and every gradient, one stream and both streams (the query stream draws with
    seed + 1), against the float64 reference computing with this backend's own keep-mask, so that a mask that
    differs between the forward, dq and dk / dv kernels (or between streams) fails. Same cases as
    test_several_row_and_key_tiles."""
    monkeypatch.setattr(reference_relative, "attention_dropout_mask", backend.module(impl).attention_dropout_mask)
    _several_row_and_key_tiles(impl, rng, dropout=dict(dropout_p=0.3, seed=rng.randrange(2**31)))


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
@pytest.mark.parametrize("seed", [2**31 - 1, 2**63 - 1])
def test_query_stream_seed_at_the_int_limits(impl, seed, rng, monkeypatch):
    """The query stream draws with seed + 1 modulo 2 ** 63, as the reference's mask does, where that crosses
    2 ** 31 (a seed below it is an int32 kernel argument: seed + 1 in the kernel wrapped to a negative seed and
    another mask) and where it wraps to 0. Forward and gradients against the float64 reference with this backend's
    own keep-mask."""
    monkeypatch.setattr(reference_relative, "attention_dropout_mask", backend.module(impl).attention_dropout_mask)
    B, H, D, Lq, M = 1, 2, 16, 20, 4
    Lk = Lq + M
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    r, u, vb = randn(H, Lk + Lq, D), randn(H, D), randn(H, D)

    def f(q, qg, k, v, r, u, vb):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_mask=AttentionMask.causal(), dropout_p=0.3,
                                       seed=seed)

    inputs = [q, q.flip(2), k, v, r, u, vb]
    gout = [randn(B, H, Lq, D) for _ in range(2)]
    with backend.use(relative_attention=impl):
        outs, grads = run(f, inputs, gout)
    truth_outs, truth_grads = run(f, [t.double() for t in inputs], [g.double() for g in gout])
    for i, (a, t) in enumerate(zip(list(outs) + list(grads), list(truth_outs) + list(truth_grads))):
        assert_close(a, t, name=f"seed {seed}: output/gradient {i}", **F32_TOL)


def test_backward_refuses_heads_past_int32_offsets():
    """The dq kernel's per-head int32 offsets into dq and dr: a head of 2 ** 31 elements or more is refused with a
    message naming the sizes, not wrapped (checked without allocating one)."""
    from ptm_kernels.triton.relative_attention import launch

    launch._check_head_offsets(2 ** 24 - 1, 2 ** 24 - 1, 128)  # the largest that fit
    for rows, R in ((2 ** 24, 16), (16, 2 ** 24)):
        with pytest.raises(ValueError, match=f"Lq = {rows}, R = {R}, D = 128"):
            launch._check_head_offsets(rows, R, 128)


def _several_row_and_key_tiles(impl, rng, D=16, Lq=(33, 40), M=(5, 12), dropout=None, B=1, per_batch_r=False,
                               after_case=None):
    """per_batch_r: r [B, H, R, D] (XLNet's bi_data) rather than shared by the batch; after_case(name, r): called
    after each case's checks."""
    dropout = dropout or {}
    H, Lq, M = 2, rng.randint(*Lq), rng.randint(*M)
    Lk = Lq + M
    Lg = rng.randint(3, Lq)
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lk, Lk))
    R = Lk + rng.randint(0, 5)  # shorter than the Lk + Lq - 1 distances
    r = randn(B, H, R, D) if per_batch_r else randn(H, R, D)
    u, vb, sb, se = randn(H, D), randn(H, D), randn(H, D), randn(2, H, D)
    ids = torch.randint(0, 2, (B, Lq), device=DEVICE)
    r_offset = rng.randint(Lk - 6, Lk + 3)
    tpos = torch.stack([torch.randperm(Lq, device=DEVICE)[:Lg] for _ in range(B)])
    seg = dict(segment_ids=ids, seg_embed=se, s_bias=sb)
    window = AttentionMask.causal() & AttentionMask.sliding_window(19, 0)

    def single(q, k, v, r, u, vb):
        return pk.relative_attention(q, k, v, r, u, vb, r_offset=r_offset, mask=window, **dropout)

    def all_rows(q, qg, k, v, r, u, vb):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, r_offset=r_offset, query_mask=AttentionMask.causal(),
                                       **seg, **dropout)

    def targets(q, qg, k, v, r, u, vb):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=tpos, r_offset=r_offset, **seg,
                                       **dropout)

    cases = [("causal window", [q, k, v, r, u, vb], single),
             ("two streams, all rows", [q, q.flip(2), k, v, r, u, vb], all_rows),
             ("two streams, targets", [q, q[:, :, :Lg], k, v, r, u, vb], targets)]
    for name, inputs, f in cases:
        outs0 = f(*inputs)
        gout = [randn(*o.shape) for o in (outs0 if isinstance(outs0, tuple) else (outs0,))]
        with backend.use(relative_attention=impl):
            outs, grads = run(f, inputs, gout)
        truth_outs, truth_grads = run(f, [t.double() for t in inputs], [g.double() for g in gout])
        for i, (a, t) in enumerate(zip(list(outs) + list(grads), list(truth_outs) + list(truth_grads))):
            assert_close(a, t, name=f"{name}: output/gradient {i}", **F32_TOL)
        if after_case is not None:
            after_case(name, r)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_reproducible(impl, rng):
    B, H, D, L = 1, 2, 16, 8
    q, k, v = (randn(B, H, L, D) for _ in range(3))
    r = randn(H, 2 * L, D)
    with backend.use(relative_attention=impl):
        a = pk.relative_attention(q, k, v, r, dropout_p=0.3, seed=5)
        b = pk.relative_attention(q, k, v, r, dropout_p=0.3, seed=5)
        c = pk.relative_attention(q, k, v, r, dropout_p=0.3, seed=6)
        d = pk.relative_attention(q, k, v, r)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_gradcheck_float64(rng):
    d = dict(device=DEVICE, dtype=torch.float64, requires_grad=True)
    B, H, D, Lq, M = 1, 2, 4, 3, 2
    Lk = Lq + M
    q, qg, k, v = torch.randn(B, H, Lq, D, **d), torch.randn(B, H, 2, D, **d), torch.randn(B, H, Lk, D, **d), \
        torch.randn(B, H, Lk, D, **d)
    r, u, vb, sb, se = torch.randn(H, Lk + Lq, D, **d), torch.randn(H, D, **d), torch.randn(H, D, **d), \
        torch.randn(H, D, **d), torch.randn(2, H, D, **d)
    ids = torch.tensor([[0, 1, 1]], device=DEVICE)
    pos = torch.tensor([[2, 0]], device=DEVICE)
    mask = AttentionMask.causal()

    def f(q, qg, k, v, r, u, vb, sb, se):
        return pk.two_stream_attention(q, qg, k, v, r, u, vb, query_positions=pos, content_mask=mask,
                                       query_mask=mask, segment_ids=ids, seg_embed=se, s_bias=sb)

    assert torch.autograd.gradcheck(f, (q, qg, k, v, r, u, vb, sb, se))
    assert torch.autograd.gradcheck(
        lambda q, k, v, r, u, vb: pk.relative_attention(q, k, v, r[:, :Lk], u, vb, mask=mask), (q, k, v, r, u, vb))


def _op_args(rng, Lg):
    ra = importlib.import_module("ptm_kernels.ops.relative_attention")
    B, H, D, Lq, M = 2, 2, 16, 6, 3
    Lk = Lq + M
    rq = lambda *s: randn(*s).requires_grad_(True)
    q, qg, k, v, r, u, vb = rq(B, H, Lq, D), rq(B, H, Lg, D), rq(B, H, Lk, D), rq(B, H, Lk, D), rq(H, Lk + Lq, D), \
        rq(H, D), rq(H, D)
    se, sb = rq(2, H, D), rq(H, D)
    ids = torch.randint(0, 2, (B, Lq), device=DEVICE)
    pos = torch.stack([torch.randperm(Lq)[:Lg] for _ in range(B)]).to(DEVICE)
    shared, seg_fn = ra._shared(q, k, v, r, None, None, ids, None, se, sb, 0.1, 3, None)
    sc = ra._stream("m", q, u, vb, seg_fn, None, AttentionMask.causal(), Lk, Lq)
    dense = AttentionMask.dense(torch.rand(B, 1, Lg, Lk, device=DEVICE) > 0.3)
    sg = ra._stream("m", qg, u, vb, seg_fn, pos, dense, Lk, Lq)
    return ra, shared, sc, sg


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl, rng):
    ra, shared, sc, sg = _op_args(rng, 4)  # shared: (k, v, r, RelativeParams); sc, sg: RelativeStream
    ops = torch.ops.ptm
    # leaves: the segment term is computed from q, itself an argument since the op takes q (opcheck runs
    # autograd.grad more than once, and a path from seg back to q would be freed by the first)
    leaves = lambda ts: [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in ts]
    one, two = leaves(ra.ARGS.flatten(*shared, sc)), leaves(ra.TWO_STREAM_ARGS.flatten(*shared, sc, sg))
    with backend.use(relative_attention=impl):
        torch.library.opcheck(ops.relative_attention.default, one)
        torch.library.opcheck(ops.two_stream_attention.default, two)
        out = ops.relative_attention.default(*one)
        det = lambda ts: [t.detach() if isinstance(t, torch.Tensor) else t for t in ts]
        torch.library.opcheck(ops.relative_attention_backward.default,
                              (torch.randn_like(out[0]), out[0].detach(), out[1], *det(one)))
        oc, lc, og, lg = ops.two_stream_attention.default(*two)
        torch.library.opcheck(ops.two_stream_attention_backward.default,
                              (torch.randn_like(oc), oc.detach(), lc, torch.randn_like(og), og.detach(), lg,
                               *det(two)))


def test_torch_compile_fullgraph(rng):
    torch._dynamo.reset()
    B, H, D, Lq, M = 1, 2, 16, 5, 3
    q, k, v = (randn(B, H, L, D) for L in (Lq, Lq + M, Lq + M))
    r, u, vb = randn(H, Lq + M, D), randn(H, D), randn(H, D)
    mask = AttentionMask.causal()
    f = lambda q, k, v, r: pk.relative_attention(q, k, v, r, u, vb, mask=mask)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    qg = q.clone().requires_grad_(True)
    a = compiled(qg, k, v, r)
    a.sum().backward()
    qe = q.clone().requires_grad_(True)
    b = f(qe, k, v, r)
    b.sum().backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(qg.grad, qe.grad)


def test_position_convention_worked_examples():
    """The docstring's examples: Transformer-XL (M = 2, Lq = 3) and XLNet (M = 0, Lq = 3)."""
    from ptm_kernels.reference_relative import relative_index
    t = relative_index(3, 5, 3, 4, None, "cpu")[0]  # Transformer-XL: r_offset = Lk - 1 = 4
    assert t[0, 0] == 2 and t[0, 2] == 4
    t = relative_index(3, 3, 3, 3, None, "cpu")[0]  # XLNet: r_offset = Lk = 3
    assert t[0, 2] == 5 and t[2, 0] == 1


BAD = {
    "q not 4-D": (lambda q, k, v, r: dict(q=q[0]), ValueError, "q must be 4-D"),
    "k heads": (lambda q, k, v, r: dict(k=k[:, :1]), ValueError, "k must have shape"),
    "v shape": (lambda q, k, v, r: dict(v=v[:, :, :-1]), ValueError, "v must have k's shape"),
    "r heads": (lambda q, k, v, r: dict(r=r[:1]), ValueError, "r must have shape"),
    "r dtype": (lambda q, k, v, r: dict(r=r.double()), TypeError, "r has dtype"),
    "u shape": (lambda q, k, v, r: dict(u=torch.zeros(3, 16)), ValueError, "u must have shape"),
    "mask type": (lambda q, k, v, r: dict(mask=torch.ones(4, 4, dtype=torch.bool)), TypeError, "AttentionMask"),
    "bias part": (lambda q, k, v, r: dict(mask=AttentionMask.bias(torch.zeros(4, 8))), ValueError,
                  "visibility parts only"),
    "seg without embed": (lambda q, k, v, r: dict(segment_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError,
                          "need seg_embed"),
    "embed without ids": (lambda q, k, v, r: dict(seg_embed=torch.zeros(2, 2, 16)), ValueError,
                          "needs segment_ids"),
    "seg_embed shape": (lambda q, k, v, r: dict(seg_embed=torch.zeros(3, 2, 16),
                                                segment_ids=torch.zeros(1, 4, dtype=torch.long)), ValueError,
                        "seg_embed must have shape"),
    "segment ids shape": (lambda q, k, v, r: dict(seg_embed=torch.zeros(2, 2, 16),
                                                  segment_ids=torch.zeros(1, 5, dtype=torch.long)), ValueError,
                          "segment_ids must have shape"),
    "dropout": (lambda q, k, v, r: dict(dropout_p=1.0), ValueError, "dropout_p"),
    "r_offset": (lambda q, k, v, r: dict(r_offset=1.5), ValueError, "r_offset"),
    # Lq = 4, Lk = 8, R = 12: beyond [1 - Lq, R + Lk - 2] no pair finds its row of r (the term would be 0)
    "r_offset too large": (lambda q, k, v, r: dict(r_offset=1000), ValueError, r"r_offset must lie in .*\[-3, 18\]"),
    "r_offset too small": (lambda q, k, v, r: dict(r_offset=-4), ValueError, r"r_offset must lie in .*\[-3, 18\]"),
    "dense shape": (lambda q, k, v, r: dict(mask=AttentionMask.dense(torch.ones(5, 8, dtype=torch.bool))),
                    ValueError, "does not broadcast"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_clear_error(case):
    q, k, v, r = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), \
        torch.randn(2, 12, 16)
    make, exc, msg = BAD[case]
    kw = dict(q=q, k=k, v=v, r=r, u=None)
    kw.update(make(q, k, v, r))
    with pytest.raises(exc, match=msg):
        pk.relative_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("r"), kw.pop("u"), **kw)


def test_two_stream_bad_input():
    q, k, v, r = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), \
        torch.randn(2, 12, 16)
    with pytest.raises(ValueError, match="pass query_positions"):
        pk.two_stream_attention(q, q[:, :, :2], k, v, r)
    with pytest.raises(ValueError, match=r"query_positions must lie in \[0, Lq = 4\)"):
        pk.two_stream_attention(q, q[:, :, :2], k, v, r, query_positions=torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="query_positions must have shape"):
        pk.two_stream_attention(q, q[:, :, :2], k, v, r, query_positions=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match="q_query must have shape"):
        pk.two_stream_attention(q, q[:, :1], k, v, r)
