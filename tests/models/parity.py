"""Parity helpers: run one of our models and its transformers twin on the same padded batch and compare
outputs (eval) and every parameter's gradient (train mode, dropout 0), at the real (non-padded) positions."""

from __future__ import annotations

import atexit
import json
import os

import torch

from ._import import model_module

hf_tensors = model_module("convert").hf_tensors

TOL = 1e-4
MAX_DIFFS = {}  # test id -> {what: max abs diff}; written to $PTM_PARITY_REPORT (json) at exit when set


@atexit.register
def _report():
    path = os.environ.get("PTM_PARITY_REPORT")
    if path and MAX_DIFFS:
        with open(path, "w") as f:
            json.dump(MAX_DIFFS, f, indent=1, sort_keys=True)


def batch(B=3, L=12, vocab=100, lengths=(12, 9, 5), pad_id=0, low=5, seed=0, token_types=True):
    """Random ids in [low, vocab) for the real tokens, pad_id after each sequence's length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (B, L), generator=g)
    lens = torch.tensor(lengths[:B])
    real = torch.arange(L) < lens[:, None]
    ids = ids.masked_fill(~real, pad_id)
    out = dict(input_ids=ids, attention_mask=real.long())
    if token_types:
        out["token_type_ids"] = (torch.arange(L) >= (lens[:, None] // 2)).long() * real.long()
    return out


def _diff(a, b, real):
    if a.dim() >= 2 and a.shape[:2] == real.shape:  # per-token output: compare real positions only
        a, b = a[real], b[real]
    return (a.float() - b.float()).abs().max().item()


def outputs(model, hf, inputs, fields, ours_kwargs=None):
    """{field: (ours, theirs)} for fields = [(our_name, hf_name)]; 'hidden' compares the last hidden state."""
    o = model(**inputs, **(ours_kwargs or {}))
    h = hf(**inputs, output_hidden_states=True)
    res = {}
    for ours, theirs in fields:
        if ours == "hidden":
            res["hidden"] = (o.last_hidden_state, h.hidden_states[-1] if theirs is None else getattr(h, theirs))
        else:
            res[ours] = (getattr(o, ours), getattr(h, theirs))
    return res


def check_eval(model, hf, inputs, fields, key, ours_kwargs=None):
    model.eval(), hf.eval()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        res = outputs(model, hf, inputs, fields, ours_kwargs)
    diffs = {k: _diff(a, b, real) for k, (a, b) in res.items()}
    MAX_DIFFS.setdefault(key, {}).update(diffs)
    for k, d in diffs.items():
        assert d < TOL, f"{key}: {k} differs by {d}"
    return diffs


def check_grads(model, hf, inputs, fields, key, ours_kwargs=None):
    """Same random projection of every output (real positions only) as the loss; compare all gradients."""
    model.train(), hf.train()
    real = inputs["attention_mask"].bool()
    model.zero_grad(), hf.zero_grad()
    res = outputs(model, hf, inputs, fields, ours_kwargs)
    g = torch.Generator().manual_seed(1)
    loss_a = loss_b = 0
    for k, (a, b) in res.items():
        w = torch.randn(a.shape, generator=g)
        if a.dim() >= 2 and a.shape[:2] == real.shape:
            w = w * real.view(*real.shape, *([1] * (a.dim() - 2)))
        n = w.count_nonzero()  # a mean, so gradients are O(1), as from a real loss
        loss_a, loss_b = loss_a + (a * w).sum() / n, loss_b + (b * w).sum() / n
    loss_a.backward()
    loss_b.backward()
    theirs = hf_tensors(hf, model.hf_mapping(), "grad")
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}  # frozen ones (sinusoids) excepted
    worst, worst_name, scale = 0.0, None, 0.0
    for name, p in ours.items():
        t = theirs[name]
        assert p.grad is not None and t is not None, f"{key}: no gradient for {name}"
        d = (p.grad - t).abs().max().item()
        scale = max(scale, t.abs().max().item())
        if d > worst:
            worst, worst_name = d, name
    MAX_DIFFS.setdefault(key, {}).update(grad=worst, grad_scale=scale)
    assert worst < TOL, f"{key}: gradient of {worst_name} differs by {worst}"
    return worst


def check_roundtrip(model, hf_like):
    """to_hf gives an HF model with exactly our weights (compared with the HF model we loaded from)."""
    back = model.to_hf()
    a, b = back.state_dict(), hf_like.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
