"""Transformer-XL against the transcription of the release (tests/models/transformer_xl_reference.py) on a state
dict in the release's layout: three consecutive segments with the memory carried, same_length both ways,
clamp_len, adaptive input and softmax (div_val 1 and > 1, shared and untied r biases, pre/post-norm); hidden
states, memories and per-token NLL, and every gradient through three segments."""

import pytest
import torch

from . import parity
from . import transformer_xl_reference as ref
from ._import import model_module

txl = model_module("transformer_xl")
TOL = 1e-4
B, TGT = 2, 5

CONFIGS = {
    "div4_same_length_clamp": dict(n_token=60, d_model=32, d_embed=32, n_head=2, d_head=16, d_inner=48, n_layer=2,
                                   cutoffs=(20, 40), div_val=2, mem_len=6, same_length=True, clamp_len=4),
    "div1_proj_untie_prenorm": dict(n_token=50, d_model=32, d_embed=24, n_head=2, d_head=16, d_inner=48, n_layer=2,
                                    cutoffs=(30,), div_val=1, mem_len=7, same_length=False, clamp_len=0,
                                    untie_r=True, pre_lnorm=True, tie_projs=(False, True)),
}


def _model(name):
    torch.manual_seed(0)
    c = txl.TransfoXLConfig(dropout=0.0, dropatt=0.0, **CONFIGS[name])
    m = txl.TransfoXLLMHeadModel(c)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "norm" not in n else 0.1) + (1.0 if n.endswith("norm.weight") else 0))
    return m.eval()


def _state(model):
    """The model's weights as the release stores them (pos_emb.inv_freq included)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = model.config
    sd["pos_emb.inv_freq"] = 1 / (10000 ** (torch.arange(0.0, c.d_model, 2.0) / c.d_model))
    return sd


@pytest.fixture(params=list(CONFIGS), scope="module")
def setup(request):
    model = _model(request.param)
    ids = torch.randint(0, model.config.n_token, (B, 3 * TGT + 1), generator=torch.Generator().manual_seed(1))
    return request.param, model, _state(model), ids


def test_release_layout_loads(setup):
    name, model, sd, ids = setup
    fresh = txl.TransfoXLLMHeadModel(model.config)
    fresh.load_state_dict(sd)  # strict, with the release's extra buffer
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    keys = set(sd)
    assert "layers.0.dec_attn.qkv_net.weight" in keys and "word_emb.emb_layers.0.weight" in keys
    assert ("r_w_bias" in keys) != model.config.untie_r


def test_three_segments_match_release(setup):
    name, model, sd, ids = setup
    c = model.config
    mems = ref_mems = None
    diffs = dict(hidden=0.0, mems=0.0, nll=0.0)
    for s in range(3):
        x, y = ids[:, s * TGT:(s + 1) * TGT], ids[:, s * TGT + 1:(s + 1) * TGT + 1]
        with torch.no_grad():
            out = model(x, mems=mems, labels=y)
            h, ref_mems = ref.forward(sd, c, x, ref_mems)
            nll = ref.adaptive_nll(sd, c, h.reshape(-1, c.d_model), y.reshape(-1)).view(B, TGT)
        diffs["hidden"] = max(diffs["hidden"], (out.last_hidden_state - h).abs().max().item())
        diffs["nll"] = max(diffs["nll"], (out.nll - nll).abs().max().item())
        assert len(out.mems) == len(ref_mems) == c.n_layer + 1
        diffs["mems"] = max(diffs["mems"], max((a - b.transpose(0, 1)).abs().max().item()
                                               for a, b in zip(out.mems, ref_mems)))
        mems = out.mems
    assert mems[0].shape[1] == c.mem_len  # the memory filled up and was cut to mem_len
    parity.MAX_DIFFS.setdefault(f"transformer_xl[{name}]", {}).update(diffs)
    assert max(diffs.values()) < TOL, diffs


def test_same_length_other_way(setup):
    """The same weights with same_length flipped (and clamp_len changed) still match."""
    name, model, sd, ids = setup
    c = model.config
    flipped = txl.TransfoXLConfig(**{**c.__dict__, "same_length": not c.same_length, "clamp_len": 3})
    m2 = txl.TransfoXLLMHeadModel(flipped)
    m2.load_state_dict(sd)
    m2.eval()
    mems = ref_mems = None
    worst = 0.0
    for s in range(3):
        x = ids[:, s * TGT:(s + 1) * TGT]
        with torch.no_grad():
            out = m2(x, mems=mems)
            h, ref_mems = ref.forward(sd, flipped, x, ref_mems)
        worst = max(worst, (out.last_hidden_state - h).abs().max().item())
        mems = out.mems
    parity.MAX_DIFFS.setdefault(f"transformer_xl[{name}]", {}).update(hidden_flipped=worst)
    assert worst < TOL


def test_gradients_through_segments(setup):
    """Loss summed over three segments (memory detached between them, as in training): every gradient."""
    name, model, sd, ids = setup
    c = model.config
    model.train()
    model.zero_grad()
    leaves = {k: v.clone().requires_grad_(True) for k, v in sd.items() if k != "pos_emb.inv_freq"}
    mems = ref_mems = None
    loss_a = loss_b = 0
    try:
        for s in range(3):
            x, y = ids[:, s * TGT:(s + 1) * TGT], ids[:, s * TGT + 1:(s + 1) * TGT + 1]
            out = model(x, mems=mems, labels=y)
            h, ref_mems = ref.forward(leaves, c, x, ref_mems)
            ref_mems = [m.detach() for m in ref_mems]
            loss_a = loss_a + out.loss
            loss_b = loss_b + ref.adaptive_nll(leaves, c, h.reshape(-1, c.d_model), y.reshape(-1)).mean()
            mems = out.mems
        loss_a.backward()
        loss_b.backward()
    finally:
        model.eval()
    # tied tensors appear under several release keys: their gradients add up
    by_ptr = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    diffs = {}
    for n, p in model.named_parameters():
        g = sum(leaves[k].grad for k in by_ptr[p.data_ptr()] if leaves[k].grad is not None)
        diffs[n] = (p.grad - g).abs().max().item()
    parity.check_worst(f"transformer_xl[{name}]", "grad", diffs, TOL)


def test_evaluate_stream(setup):
    name, model, sd, ids = setup
    got = txl.evaluate_stream(model, ids, TGT)
    c, ref_mems, total = model.config, None, 0.0
    for s in range(3):
        x, y = ids[:, s * TGT:(s + 1) * TGT], ids[:, s * TGT + 1:(s + 1) * TGT + 1]
        h, ref_mems = ref.forward(sd, c, x, ref_mems)
        total += ref.adaptive_nll(sd, c, h.reshape(-1, c.d_model), y.reshape(-1)).sum().item()
    assert abs(got - total / (3 * TGT * B)) < TOL
