"""AttentionMask parts check their sizes against q and k when used, and follow in-place changes of their tensors.

Issue 11 items 2 and 3: a key-padding mask of the wrong width was silently turned into lengths, and a mask
whose lengths / ids / dense tensor changed in place after its first use kept its old cached block map.
"""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import AttentionMask as M
from ptm_kernels import backend

from ..conftest import DEVICE, backend_params
from ..compare import assert_close

B, H, L, D = 2, 2, 32, 16


def qkv():
    return [torch.randn(B, H, L, D, device=DEVICE) for _ in range(3)]


def ints(values):
    return torch.tensor(values, device=DEVICE)


# ------------------------------------------------------------------------------------- size checks (item 2)

WRONG_SIZE = {
    # part: (mask for Lq = Lk = 32, the message naming the part and both sizes)
    "key_padding mask, 31 columns": (lambda: M.key_padding(mask=torch.ones(B, L - 1, dtype=torch.bool, device=DEVICE)),
                                     r"key_padding mask has 31 columns but there are Lk = 32 keys"),
    "key_padding mask, 1 column": (lambda: M.key_padding(mask=torch.ones(B, 1, dtype=torch.bool, device=DEVICE)),
                                   r"key_padding mask has 1 columns but there are Lk = 32 keys"),
    "key_padding mask with holes, 33 columns": (
        lambda: M.key_padding(mask=torch.arange(L + 1, device=DEVICE).remainder(3).bool().expand(B, -1)),
        r"key_padding mask has 33 columns but there are Lk = 32 keys"),
    "key_padding mask batch": (lambda: M.key_padding(mask=torch.ones(3, L, dtype=torch.bool, device=DEVICE)),
                               r"key_padding lengths must have 2 entries \(the batch size\) or 1, got 3"),
    "key_padding lengths": (lambda: M.key_padding(lengths=ints([L + 1, 3])),
                            r"key_padding lengths must lie in \[0, Lk = 32\], got values in \[3, 33\]"),
    "prefix_lm lengths": (lambda: M.prefix_lm(ints([4, L + 2])), r"prefix_lm lengths must lie in \[0, Lk = 32\]"),
    "segments q_ids": (lambda: M.segments(torch.zeros(B, L - 1, dtype=torch.long, device=DEVICE),
                                          torch.zeros(B, L, dtype=torch.long, device=DEVICE)),
                       r"segments q_ids must have shape \[2 or 1, 32\], got \(2, 31\)"),
    "segments k_ids": (lambda: M.segments(torch.zeros(B, L, dtype=torch.long, device=DEVICE),
                                          torch.zeros(B, L + 1, dtype=torch.long, device=DEVICE)),
                       r"segments k_ids must have shape \[2 or 1, 32\], got \(2, 33\)"),
    "dense": (lambda: M.dense(torch.ones(L, L - 1, dtype=torch.bool, device=DEVICE)),
              r"dense mask of shape \(1, 1, 32, 31\) does not broadcast to \[B, H, Lq, Lk\] = \[2, 2, 32, 32\]"),
    "bias": (lambda: M.bias(torch.zeros(3, 1, L, L, device=DEVICE)),
             r"bias of shape \(3, 1, 32, 32\) does not broadcast to \[B, H, Lq, Lk\] = \[2, 2, 32, 32\]"),
    "toeplitz": (lambda: M.toeplitz(torch.zeros(H, 2 * L, device=DEVICE)),
                 r"toeplitz table must have shape \[2 or 1, Lq \+ Lk - 1 = 63\] .* got \(2, 64\)"),
}


@pytest.mark.parametrize("part", list(WRONG_SIZE))
def test_every_mask_part_checks_its_sizes(part):
    make, message = WRONG_SIZE[part]
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        pk.attention(q, k, v, make())
    with pytest.raises(ValueError, match=message):  # also when it is one part of several
        pk.attention(q, k, v, M.sliding_window(8, 8) & make())


def test_key_padding_mask_of_the_right_width_still_works():
    q, k, v = qkv()
    real = torch.arange(L, device=DEVICE) < ints([L, 20])[:, None]
    torch.testing.assert_close(pk.attention(q, k, v, M.key_padding(mask=real)),
                               pk.attention(q, k, v, M.key_padding(lengths=ints([L, 20]))))


def test_sdpa_refuses_a_key_padding_mask_of_the_wrong_width_like_torch():
    """The issue's reproducer: [2, 1, 1, 31] with Lk = 32 was accepted (as key padding); torch raises."""
    q, k, v = qkv()
    mask = torch.ones(B, 1, 1, L - 1, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(2, 1, 1, 31\) does not broadcast .* "
                                           r"\[2, 2, 32, 32\] \(L = 32 queries, S = 32 keys\)"):
        pk.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# ----------------------------------------------------------------------------- in-place changes (item 3)

CHANGES = {
    # part: (make the tensor, build the mask from it, change it in place). Most start with every key visible,
    # so the first use caches a block map (Triton) of all-visible tiles that skip the mask work.
    "key_padding lengths int64": (lambda: ints([L, L]), lambda t: M.key_padding(lengths=t),
                                  lambda t: t.copy_(ints([5, 11]))),
    "key_padding lengths int32": (lambda: ints([L, 20]).int(), lambda t: M.key_padding(lengths=t),
                                  lambda t: t.sub_(9)),
    "key_padding mask": (lambda: torch.ones(B, L, dtype=torch.bool, device=DEVICE),
                         lambda t: M.key_padding(mask=t), lambda t: t[:, 7:].fill_(False)),
    "key_padding 0/1 mask with holes": (lambda: torch.ones(B, L, dtype=torch.long, device=DEVICE),
                                        lambda t: M.key_padding(mask=t), lambda t: t[:, 1::3].zero_()),
    "prefix_lm": (lambda: ints([3, 9]), lambda t: M.prefix_lm(t), lambda t: t.add_(17)),
    "segments": (lambda: torch.zeros(B, L, dtype=torch.long, device=DEVICE),
                 lambda t: M.segments(t), lambda t: t.copy_(torch.arange(L, device=DEVICE) % 3)),
    "dense": (lambda: torch.ones(B, 1, L, L, dtype=torch.bool, device=DEVICE), lambda t: M.dense(t),
              lambda t: t.copy_(torch.rand(B, 1, L, L, device=DEVICE) < 0.5)),
    "bias": (lambda: torch.randn(1, H, L, L, device=DEVICE), lambda t: M.bias(t), lambda t: t.mul_(-3)),
    "dense, set_ to new storage": (lambda: torch.ones(B, 1, L, L, dtype=torch.bool, device=DEVICE),
                                   lambda t: M.dense(t),
                                   lambda t: t.set_(torch.rand(B, 1, L, L, device=DEVICE) < 0.3)),
}


TRITON_PARTS = ("key_padding mask", "dense")


@pytest.mark.parametrize("part", list(CHANGES))
def test_block_map_follows_in_place_changes(part):
    """The cached block map (which tiles the kernels skip, or run without mask work) is rebuilt too."""
    make, build, change = CHANGES[part]
    t = make()
    mask = M.sliding_window(None, 20) & build(t)
    before = mask.block_map(B, H, L, L, 8, 8, DEVICE)
    change(t)
    fresh = (M.sliding_window(None, 20) & build(t.clone())).block_map(B, H, L, L, 8, 8, DEVICE)
    if part != "bias":  # a bias hides nothing: no block map of its own
        assert not torch.equal(before.expand_as(fresh), fresh), "the change must change the block map"
    got = mask.block_map(B, H, L, L, 8, 8, DEVICE)
    assert torch.equal(got.expand_as(fresh), fresh)


@pytest.mark.parametrize("impl", backend_params("attention"))
@pytest.mark.parametrize("combined", [False, True], ids=["alone", "combined"])
@pytest.mark.parametrize("part", list(CHANGES))
def test_mask_follows_in_place_changes_of_its_tensors(part, combined, impl):
    """Use a mask, change its tensor in place, use it again: the result equals a mask built afresh."""
    if impl == "triton" and backend.triton_interpreted() and (combined or part not in TRITON_PARTS):
        pytest.skip("the Triton interpreter is slow: a few parts alone run on it (the rebuild is backend-free)")
    make, build, change = CHANGES[part]
    q, k, v = qkv()
    t = make()

    def mask_of(t):
        return M.sliding_window(None, 20) & build(t) if combined else build(t)

    mask = mask_of(t)
    with backend.use(attention=impl):
        before = pk.attention(q, k, v, mask)
        change(t)
        after = pk.attention(q, k, v, mask)
        fresh = pk.attention(q, k, v, mask_of(t.clone()))
    assert (before - fresh).abs().max() > 0.1, "the change must matter for this test to mean anything"
    assert_close(after, fresh, name=f"{part} after the change")


def test_an_unchanged_mask_keeps_its_cache():
    lengths = ints([L, 20])
    mask = M.causal() & M.key_padding(lengths=lengths)
    first = mask.block_map(B, H, L, L, 16, 16, DEVICE)
    assert mask.block_map(B, H, L, L, 16, 16, DEVICE) is first
    lengths[1] = 3
    rebuilt = mask.block_map(B, H, L, L, 16, 16, DEVICE)
    assert rebuilt is not first and not torch.equal(rebuilt, first)
    assert mask.block_map(B, H, L, L, 16, 16, DEVICE) is rebuilt, "the rebuilt mask's cache is not reused"


def test_a_change_between_building_a_part_and_combining_it_is_seen():
    q, k, v = qkv()
    src = ints([L, 20]).int()  # int32: the part holds a converted int64 copy
    part = M.key_padding(lengths=src)
    src.fill_(4)
    mask = M.causal() & part
    torch.testing.assert_close(pk.attention(q, k, v, mask),
                               pk.attention(q, k, v, M.causal() & M.key_padding(lengths=[4, 4])))


def test_inference_mode_tensors_work():
    """Inference tensors have no version counter: the mask uses their data pointer only."""
    q, k, v = qkv()
    with torch.inference_mode():
        lengths = ints([L, 9])
        out = pk.attention(q, k, v, M.key_padding(lengths=lengths))
    torch.testing.assert_close(out, pk.attention(q, k, v, M.key_padding(lengths=[L, 9])))
