"""Parity helpers: run one of our models and its transformers twin on the same padded batch and compare
outputs (eval) and every parameter's gradient (train mode, dropout 0), at the real (non-padded) positions.

`Case` and `parity_tests` are the protocol of the encoder tests (test_encoders.py, test_encoder_variants.py):
eval outputs, gradients, the padding-free path and the to_hf round trip for each case of a table."""

from __future__ import annotations

import atexit
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import pytest
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
    return check_grads_match(model, hf, key)


def check_worst(key: str, what: str, diffs: Dict[str, float], tol: float = TOL) -> float:
    """The largest of `diffs` ({name: max abs difference}), recorded as MAX_DIFFS[key][what], must be below tol."""
    worst = max(diffs, key=diffs.get)
    MAX_DIFFS.setdefault(key, {})[what] = diffs[worst]
    assert diffs[worst] < tol, f"{key}: {what} of {worst} differs by {diffs[worst]}"
    return diffs[worst]


def check_grads_match(model, hf, key) -> float:
    """After backward on both: every gradient of ours (frozen parameters, sinusoids, excepted) against
    transformers', mapped onto our names like the weights."""
    theirs = hf_tensors(hf, model.hf_mapping(), "grad")
    diffs, scale = {}, 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = theirs.get(name)
        assert p.grad is not None and t is not None, f"{key}: no gradient for {name}"
        diffs[name] = (p.grad - t).abs().max().item()
        scale = max(scale, t.abs().max().item())
    MAX_DIFFS.setdefault(key, {})["grad_scale"] = scale
    return check_worst(key, "grad", diffs)


def check_roundtrip(model, hf_like):
    """to_hf gives an HF model with exactly our weights (compared with the HF model we loaded from), which
    from_hf reads back."""
    back = model.to_hf()
    a, b = back.state_dict(), hf_like.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert type(model).from_hf(back).state_dict().keys() == model.state_dict().keys()


# per-token and pooled outputs of the encoders, compared between the padded and the packed (unpad=True) path
OUTPUTS = ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits",
           "start_logits", "end_logits")


def check_unpadded(model, inputs):
    """unpad=True (the real tokens packed) gives the padded batch's outputs at the real positions."""
    model.eval()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        a, b = model(**inputs), model(**inputs, unpad=True)
    for name in OUTPUTS:
        x, y = getattr(a, name, None), getattr(b, name, None)
        if x is None:
            continue
        if x.shape[:2] == real.shape:
            x, y = x[real], y[real]
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ encoder parity cases

HIDDEN = ("hidden", None)
LOGITS = [HIDDEN, ("logits", "logits")]
QA = [HIDDEN, ("start_logits", "start_logits"), ("end_logits", "end_logits")]
TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=40, num_labels=3)  # a BERT-like config small enough for CPU tests


@dataclass
class Case:
    """A transformers class on a tiny config and our twin of it (class `ours` of models/`module`)."""
    name: str
    hf_config: Callable  # dropout -> transformers config
    hf_class: str
    module: str
    ours: str
    fields: list  # compared outputs: (ours, theirs) as in `outputs`
    batch: dict = field(default_factory=dict)  # arguments of `batch`
    extra: Optional[Callable] = None  # inputs -> further inputs of both models (ERNIE's task types, XLM's langs)

    def pair(self, dropout=0.1):
        """(ours, transformers model) on the same weights."""
        import transformers

        torch.manual_seed(0)
        hf = getattr(transformers, self.hf_class)(self.hf_config(dropout))
        with torch.no_grad():  # non-trivial norms and biases, so that a mapping mix-up shows
            for n, p in hf.named_parameters():
                if "norm" in n.lower() or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        return getattr(model_module(self.module), self.ours).from_hf(hf), hf

    def inputs(self) -> dict:
        inputs = batch(**self.batch)
        return {**inputs, **(self.extra(inputs) if self.extra else {})}


def parity_tests(cases):
    """The protocol's four tests over `cases`, for a test module to bind to the same names:

        test_eval_parity, test_grad_parity, test_unpadded_equals_padded, test_to_hf_roundtrip = parity_tests(CASES)
    """
    over_cases = pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])

    @over_cases
    def test_eval_parity(case):
        model, hf = case.pair()
        check_eval(model, hf, case.inputs(), case.fields, case.name)

    @over_cases
    def test_grad_parity(case):
        model, hf = case.pair(dropout=0.0)
        check_grads(model, hf, case.inputs(), case.fields, case.name)

    @over_cases
    def test_unpadded_equals_padded(case):
        model, _ = case.pair()
        check_unpadded(model, case.inputs())

    @over_cases
    def test_to_hf_roundtrip(case):
        model, hf = case.pair()
        check_roundtrip(model, hf)

    return test_eval_parity, test_grad_parity, test_unpadded_equals_padded, test_to_hf_roundtrip
