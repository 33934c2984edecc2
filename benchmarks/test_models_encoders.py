"""BERT-base-like encoder, ptm-kernels against transformers' own BERT: inference forward and a fine-tuning
training step (forward + backward + AdamW step), on a batch with 20% padding.

impl "ptm": our BertForSequenceClassification on the padded batch (key-padding mask, no [B, 1, L, L] tensor);
"ptm-unpad": the same model with unpad=True (the real tokens packed, attending with segment ids);
"eager" / "sdpa": transformers' BertForSequenceClassification with attn_implementation "eager" / "sdpa".
Every implementation loads the same weights; logits are checked against transformers-eager before timing.
report.py gives speedups of "ptm" against each other impl, "ptm-unpad" included (< 1: unpad is faster).

A 2-core CPU cannot run 12 layers at 8 x 512 a few dozen times in a couple of minutes: there the model has
fewer layers (the per-layer ratios are what matter) and a shorter sequence; a GPU runs the issue's shapes.
"""

from __future__ import annotations

import pytest
import torch

from .common import DEVICE, GPU, check_close, measure, train_step, twin_models

transformers = pytest.importorskip("transformers")

try:
    from ptm_kernels.models import bert
except ModuleNotFoundError:  # not installed: the source tree's models/
    from models import bert

LAYERS = 12 if GPU else 2
SHAPES = [(8, 128), (8, 512)] if GPU else [(8, 128), (2, 512)]  # (batch, length)
IMPLS = ["ptm", "ptm-unpad", "eager", "sdpa"]
ROUNDS = None if GPU else 3
PAD_FRACTION = 0.2


def _config(dropout: float):
    return transformers.BertConfig(num_hidden_layers=LAYERS, hidden_dropout_prob=dropout,
                                   attention_probs_dropout_prob=dropout, num_labels=2)


def _batch(B: int, L: int):
    """Lengths falling linearly from L to (1 - 2 * PAD_FRACTION) L: PAD_FRACTION of the batch is padding."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([round(L * (1 - 2 * PAD_FRACTION * i / max(1, B - 1))) for i in range(B)])
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (B, L), generator=g) * mask
    labels = torch.randint(0, 2, (B,), generator=g)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _models(impl: str, dropout: float):
    return twin_models(transformers.BertForSequenceClassification, lambda: _config(dropout),
                       bert.BertForSequenceClassification, impl, perturbed=())


def _call(model, impl: str, ids, mask, labels=None):
    if impl.startswith("ptm"):
        return model(ids, attention_mask=mask, labels=labels, unpad=impl == "ptm-unpad")
    return model(input_ids=ids, attention_mask=mask, labels=labels)


def _params():
    for B, L in SHAPES:
        for passes in ("fwd", "train-step"):
            for impl in IMPLS:
                yield pytest.param(B, L, impl, passes, id=f"bert-{LAYERS}l-{B}x{L}-{impl}-{passes}")


@pytest.mark.parametrize("B,L,impl,passes", list(_params()))
def test_bert_encoder(benchmark, B, L, impl, passes):
    train = passes == "train-step"
    model, reference = _models(impl, dropout=0.1 if train else 0.0)
    ids, mask, labels = _batch(B, L)
    model.eval(), reference.eval()
    with torch.no_grad():  # a fast wrong model is not a result
        check_close(_call(model, impl, ids, mask).logits, reference(input_ids=ids, attention_mask=mask).logits,
                    f"bert {impl}", rtol=1e-3, atol=1e-3)
    del reference
    case = f"bert-{LAYERS}l {B}x{L} pad{int(PAD_FRACTION * 100)}%"
    if not train:
        def step():
            with torch.no_grad():
                _call(model, impl, ids, mask)
    else:
        model.train()
        step = train_step(model.parameters(), lambda: _call(model, impl, ids, mask, labels).loss)
    measure(benchmark, step, group="bert-encoder", case=case, impl=impl, passes=passes, rounds=ROUNDS, peak_memory=True)
