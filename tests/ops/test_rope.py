"""rope: every implementation against the reference, both layouts, partial rotary, positions, gradients."""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import backend, reference

from ..conftest import DEVICE, backend_params
from .common import DTYPES
from .test_norms import _check


def _shapes(impl):
    small = [(1, 2, 1, 5, 16), (2, 4, 2, 7, 64), (2, 3, 1, 9, 80)]  # B, H, Hk, L, D
    if impl == "triton" and backend.triton_interpreted():
        return small
    return small + [(2, 8, 8, 64, 128), (1, 32, 8, 33, 128)]


@pytest.mark.parametrize("impl", backend_params("rope"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("positions", ["offset", "ids", "batch_ids"])
def test_rope(impl, dtype, interleaved, partial, positions):
    for B, H, Hk, L, D in _shapes(impl):
        R = D // 2 if partial else D
        cos, sin = pk.rope_cos_sin(R, 512, base=10000.0)
        cos, sin = cos.to(DEVICE), sin.to(DEVICE)
        # q as the transposed view of a [B, L, H, D] projection: strided, read without a copy.
        q = torch.randn(B, L, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hk, L, D, device=DEVICE, dtype=dtype)
        if positions == "offset":
            kw, pos = dict(offset=17), torch.arange(17, 17 + L, device=DEVICE)
        elif positions == "ids":
            pos = torch.randperm(512, device=DEVICE)[:L]
            kw = dict(position_ids=pos)
        else:
            pos = torch.randint(0, 512, (B, L), device=DEVICE)
            kw = dict(position_ids=pos)

        def ours(q, k):
            return pk.rope(q, k, cos, sin, interleaved=interleaved, rotary_dim=R, **kw)

        def ref(q, k):
            c, s = cos.to(q.dtype) if q.dtype == torch.float64 else cos, sin.to(q.dtype) if q.dtype == torch.float64 else sin
            return (reference.rope(q, c, s, pos, interleaved, R), reference.rope(k, c, s, pos, interleaved, R))

        _check(impl, ours, ref, [q, k], dtype, f"rope[{B},{H},{Hk},{L},{D}]")


@pytest.mark.parametrize("impl", backend_params("rope"))
def test_rope_matches_transformers_llama(impl):
    """The rotate-half layout is LLaMA's apply_rotary_pos_emb (with its duplicated cos/sin)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, L, D = 2, 4, 11, 32
    q, k = torch.randn(B, H, L, D, device=DEVICE), torch.randn(B, H, L, D, device=DEVICE)
    pos = torch.arange(3, 3 + L, device=DEVICE).expand(B, L)
    rot = pk.nn.RotaryEmbedding(D, max_position_embeddings=64, base=10000.0).to(DEVICE)
    with backend.use(impl):
        q1, k1 = rot(q, k, position_ids=pos)
    cos = torch.cat([rot.cos, rot.cos], -1)[pos]
    sin = torch.cat([rot.sin, rot.sin], -1)[pos]
    q2, k2 = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q1, q2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", backend_params("rope"))
def test_rope_per_row_offsets_and_q_only(impl):
    """A [B] offset tensor (each row's KV-cache fill) equals position_ids built from it; k may be None."""
    B, H, L, D = 3, 2, 4, 16
    cos, sin = pk.rope_cos_sin(D, 64)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    q = torch.randn(B, H, L, D, device=DEVICE)
    offsets = torch.tensor([0, 5, 9], device=DEVICE)
    with backend.use(impl):
        a = pk.rope(q, None, cos, sin, offset=offsets)
        b, _ = pk.rope(q, q, cos, sin, position_ids=offsets[:, None] + torch.arange(L, device=DEVICE))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", backend_params("rope"))
@pytest.mark.parametrize("rows", ["shared", "per_batch_row"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_rope_at_positions_is_rope_at_those_positions(impl, rows, partial):
    """rope_at_positions(q, k, cos[pos], sin[pos]) (transformers' per-token rows) gives the same bits as
    rope(q, k, cos, sin, position_ids=pos), with its gradients; k may be None."""
    from ptm_kernels.ops.rope import rope_at_positions

    B, H, Hk, L, D = 3, 4, 2, 5, 32
    R = D // 2 if partial else D
    cos, sin = pk.rope_cos_sin(R, 64)
    cos, sin = cos.to(DEVICE), sin.to(DEVICE)
    pos = torch.randint(0, 64, (1 if rows == "shared" else B, L), device=DEVICE)
    q = torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, Hk, L, D, device=DEVICE, requires_grad=True)
    with backend.use(impl):
        q1, k1 = rope_at_positions(q, k, cos[pos], sin[pos])
        q2, k2 = pk.rope(q, k, cos, sin, position_ids=pos.expand(B, L), rotary_dim=R)
        q_only = rope_at_positions(q, None, cos[pos], sin[pos])
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and torch.equal(q_only, q2)
    g = torch.randn_like(q1), torch.randn_like(k1)
    grads1 = torch.autograd.grad((q1, k1), (q, k), g)
    grads2 = torch.autograd.grad((q2, k2), (q, k), g)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


def test_rope_at_positions_refuses_tables_of_other_shapes():
    from ptm_kernels.ops.rope import rope_at_positions

    q = torch.randn(2, 4, 5, 32)
    cos = sin = torch.randn(2, 5, 16)
    for bad, match in ((torch.randn(2, 6, 16), "cos must have shape"), (torch.randn(3, 5, 16), "cos must have shape"),
                       (torch.randn(2, 5, 17), "cos must have shape")):
        with pytest.raises(ValueError, match=match):
            rope_at_positions(q, None, bad, bad)
    with pytest.raises(ValueError, match="sin must have shape"):
        rope_at_positions(q, None, cos, torch.randn(1, 5, 16))
    with pytest.raises(ValueError, match="k must have shape"):
        rope_at_positions(q, torch.randn(2, 2, 4, 32), cos, sin)
