"""XLNet against transformers' XLNetModel / XLNetLMHeadModel (and the classification and QA heads) on the same
random weights, float32 CPU: two-stream outputs with perm_mask, target_mapping (partial prediction from our
permutation-LM builder), memory from a previous segment, token types and padding; every gradient; to_hf."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from . import parity  # noqa: E402
from ._import import model_module  # noqa: E402

xlnet = model_module("xlnet")
TOL = 1e-4
V, L, M = 50, 10, 4

CONFIGS = {
    "bi": dict(),
    "uni_same_length_bi_data_clamp": dict(attn_type="uni", same_length=True, bi_data=True, clamp_len=3),
}


def _hf_config(**kw):
    return transformers.XLNetConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, d_inner=96, dropout=0.0,
                                    mem_len=M, summary_last_dropout=0.0, pad_token_id=0, **kw)


def _perturb(hf):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name or name.endswith("bias") or "mask_emb" in name or "seg_embed" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return hf


def _inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, L), generator=g)
    lengths = torch.tensor([L, 7, L, 8][:B])
    mask = (torch.arange(L) < lengths[:, None]).long()
    tt = (torch.arange(L) >= 4).long().expand(B, L) * mask
    return ids.masked_fill(mask == 0, 0), mask, tt


def _to_hf_mems(mems):
    return [m.transpose(0, 1).contiguous() for m in mems]


def _lm_pair(name):
    torch.manual_seed(0)
    hf = _perturb(transformers.XLNetLMHeadModel(_hf_config(**CONFIGS[name]))).eval()
    ours = xlnet.XLNetLMHeadModel.from_hf(hf).eval()
    B = 4 if CONFIGS[name].get("bi_data") else 3
    return name, hf, ours, B


@pytest.fixture(params=list(CONFIGS), scope="module")
def lm_pair(request):
    return _lm_pair(request.param)


def _segment_inputs(ours, hf, B):
    """A first segment (giving the memory), then the second segment's permutation-LM inputs."""
    ids0, _, _ = _inputs(B, seed=5)
    with torch.no_grad():
        mems = ours.transformer(ids0, use_mems=True).mems
        hf_mems = hf.transformer(ids0, use_mems=True).mems
    d = max((a - b.transpose(0, 1)).abs().max().item() for a, b in zip(mems, hf_mems))
    assert d < TOL
    ids, mask, tt = _inputs(B)
    batch = xlnet.permutation_lm_inputs(ids, K=3, attention_mask=mask, generator=torch.Generator().manual_seed(1))
    inp = dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, perm_mask=batch["perm_mask"],
               target_mapping=batch["target_mapping"])
    if ours.config.attn_type == "uni":  # transformers fails to add a data mask to the causal one ("uni")
        inp.pop("perm_mask"), inp.pop("attention_mask")
    return mems, inp, batch["labels"]


def test_lm_two_stream_parity(lm_pair):
    name, hf, ours, B = lm_pair
    mems, inp, labels = _segment_inputs(ours, hf, B)
    with torch.no_grad():
        a = ours(**inp, mems=mems, use_mems=True)
        loss = ours(**inp, mems=mems, labels=labels).loss  # the fused linear cross-entropy: no logits
        b = hf(**inp, mems=_to_hf_mems(mems), labels=labels, use_mems=True)
    valid = inp["target_mapping"].sum(-1) > 0  # padded prediction rows: zero attention in both, compare anyway
    d_logits = (a.logits - b.logits).abs().max().item()
    d_mems = max((x - y.transpose(0, 1)).abs().max().item() for x, y in zip(a.mems, b.mems))
    d_loss = abs(loss.item() - b.loss.item())
    parity.MAX_DIFFS.setdefault(f"xlnet_lm[{name}]", {}).update(logits=d_logits, mems=d_mems, loss=d_loss)
    assert valid.any() and a.logits.shape == b.logits.shape
    assert d_logits < TOL and d_mems < TOL and d_loss < TOL


def test_lm_content_stream_parity(lm_pair):
    """No target_mapping: the content stream only (relative_attention), perm_mask and memory still apply."""
    name, hf, ours, B = lm_pair
    mems, inp, _ = _segment_inputs(ours, hf, B)
    inp.pop("target_mapping")
    with torch.no_grad():
        a = ours(**inp, mems=mems).logits
        b = hf(**inp, mems=_to_hf_mems(mems)).logits
    real = inp.get("attention_mask", torch.ones(a.shape[:2])).bool()
    d = (a[real] - b[real]).abs().max().item()
    parity.MAX_DIFFS.setdefault(f"xlnet_lm[{name}]", {}).update(content_logits=d)
    assert d < TOL


def test_lm_gradients(lm_pair):
    name, hf, ours, B = lm_pair
    mems, inp, labels = _segment_inputs(ours, hf, B)
    ours.train(), hf.train()
    ours.zero_grad(), hf.zero_grad()
    try:
        a, loss = ours(**inp, mems=mems), ours(**inp, mems=mems, labels=labels).loss
        b = hf(**inp, mems=_to_hf_mems(mems), labels=labels)
        w = torch.randn(a.logits.shape, generator=torch.Generator().manual_seed(2))
        ((a.logits * w).mean() + loss).backward()
        ((b.logits * w).mean() + b.loss).backward()
    finally:
        ours.eval(), hf.eval()
    parity.check_grads_match(ours, hf, f"xlnet_lm[{name}]")


def test_roundtrip(lm_pair):
    _, hf, ours, _ = lm_pair
    parity.check_roundtrip(ours, hf)


def test_query_stream_with_padding_only():
    """target_mapping and padding without a permutation mask: the query stream's padding is a key-padding part
    (analytic), the content stream keeps its own token (dense); both as transformers. ("bi" only: transformers'
    XLNet fails to add a data mask to the causal one of "uni".)"""
    name, hf, ours, B = _lm_pair("bi")
    mems, inp, _ = _segment_inputs(ours, hf, B)
    inp.pop("perm_mask")
    with torch.no_grad():
        a = ours(**inp, mems=mems, use_mems=True)
        b = hf(**inp, mems=_to_hf_mems(mems), use_mems=True)
    assert (a.logits - b.logits).abs().max().item() < TOL
    assert max((x - y.transpose(0, 1)).abs().max().item() for x, y in zip(a.mems, b.mems)) < TOL


@pytest.mark.parametrize("config", list(CONFIGS))
def test_masks_are_analytic_where_they_can_be(config):
    """"uni" (causal), same_length (a window) and memory are analytic parts, and so is the query stream's
    padding; only the permutation mask (and the content stream's 'padding but its own token') is dense."""
    model = xlnet.XLNetModel(xlnet.XLNetConfig(**{**CONFIGS[config], "n_layer": 1}))
    B, L_, M_ = 2, 6, 3
    positions = torch.tensor([[1, 4], [0, 2]])
    content, query = model.masks(B, L_, M_, None, None, None, positions, "cpu")
    if config.startswith("uni"):
        assert content is query and content.dense_mask is None and content.is_causal
        assert content.window_left == (M_ if CONFIGS[config].get("same_length") else None)
    else:
        assert content is None and query is None
    pad = torch.tensor([[1] * L_, [1] * 4 + [0] * 2])
    content, query = model.masks(B, L_, M_, pad, None, None, positions, "cpu")
    assert query.dense_mask is None and query.key_lengths.tolist() == [M_ + L_, M_ + 4]
    assert content.dense_mask.shape == (B, 1, L_, M_ + L_)


@pytest.mark.parametrize("head", ["XLNetForSequenceClassification", "XLNetForQuestionAnsweringSimple"])
def test_heads(head):
    torch.manual_seed(1)
    hf = _perturb(getattr(transformers, head)(_hf_config(num_labels=3 if "Sequence" in head else 2))).eval()
    ours = getattr(xlnet, head).from_hf(hf).eval()
    ids, mask, tt = _inputs(3, seed=3)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=tt)
        b = hf(ids, attention_mask=mask, token_type_ids=tt)
    fields = ["logits"] if "Sequence" in head else ["start_logits", "end_logits"]
    d = max((getattr(a, f) - getattr(b, f)).abs().max().item() for f in fields)
    parity.MAX_DIFFS.setdefault(f"xlnet_{head}", {}).update(out=d)
    assert d < TOL
    parity.check_roundtrip(ours, hf)


def test_permutation_lm_inputs():
    ids = torch.arange(1, 13).view(2, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    out = xlnet.permutation_lm_inputs(ids, K=3, attention_mask=mask, generator=torch.Generator().manual_seed(0))
    pm, tm, labels = out["perm_mask"], out["target_mapping"], out["labels"]
    assert tm.shape == (2, 2, 6) and labels[1, 1] == -100 and tm[1, 1].sum() == 0
    for b in range(2):
        targets = tm[b].sum(0).bool()
        assert not targets[mask[b] == 0].any()
        # every token sees all non-targets; targets are hidden from non-targets; no target sees itself
        assert (pm[b][:, ~targets] == 0).all()
        assert (pm[b][~targets][:, targets] == 1).all()
        assert all(pm[b, i, i] == 1 for i in targets.nonzero().squeeze(1))
        for row, lab in zip(tm[b], labels[b]):
            if row.sum() > 0:
                assert lab == ids[b, row.argmax()]
