"""BERT-base-like encoders (BERT, ALBERT, ELECTRA), ptm-kernels against transformers' own classes: inference
forward and a fine-tuning training step (forward + backward + AdamW step), on a batch with 20% padding.

impl "ptm": our <Family>ForSequenceClassification on the padded batch (key-padding mask, no [B, 1, L, L]
tensor); "ptm-unpad": the same model with unpad=True (the real tokens packed, attending with segment ids);
"eager" / "sdpa": transformers' <Family>ForSequenceClassification with attn_implementation "eager" / "sdpa".
ALBERT: bert-base widths with its factorized embeddings (E = 128) and all layers sharing one set of weights;
ELECTRA: ELECTRA-base (E = H = 768, no projection) with its GELU classification head.
bert-mlm: the MLM pre-training step of our BertForMaskedLM given labels (head and loss on the labelled rows only)
against transformers' BertForMaskedLM (head on every token), same impls.
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

from ptm_kernels.models import albert, bert, electra  # noqa: E402

LAYERS = 12 if GPU else 2
SHAPES = [(8, 128), (8, 512)] if GPU else [(8, 128), (2, 512)]  # (batch, length)
IMPLS = ["ptm", "ptm-unpad", "eager", "sdpa"]
ROUNDS = None if GPU else 3
PAD_FRACTION = 0.2


FAMILIES = {  # name: (transformers config class, extra config fields, our module)
    "bert": ("BertConfig", {}, bert),
    "albert": ("AlbertConfig", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                    embedding_size=128, hidden_act="gelu_new"), albert),
    "electra": ("ElectraConfig", dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                      embedding_size=768), electra),
}


def _config(family: str, dropout: float):
    config, extra, _ = FAMILIES[family]
    kw = dict(classifier_dropout_prob=dropout) if family == "albert" else {}
    return getattr(transformers, config)(num_hidden_layers=LAYERS, hidden_dropout_prob=dropout,
                                         attention_probs_dropout_prob=dropout, num_labels=2, **extra, **kw)


def _batch(B: int, L: int):
    """Lengths falling linearly from L to (1 - 2 * PAD_FRACTION) L: PAD_FRACTION of the batch is padding."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([round(L * (1 - 2 * PAD_FRACTION * i / max(1, B - 1))) for i in range(B)])
    mask = (torch.arange(L) < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (B, L), generator=g) * mask
    labels = torch.randint(0, 2, (B,), generator=g)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _models(family: str, impl: str, dropout: float):
    name = f"{family.capitalize()}ForSequenceClassification"
    return twin_models(getattr(transformers, name), lambda: _config(family, dropout),
                       getattr(FAMILIES[family][2], name), impl, perturbed=())


def _call(model, impl: str, ids, mask, labels=None):
    if impl.startswith("ptm"):
        return model(ids, attention_mask=mask, labels=labels, unpad=impl == "ptm-unpad")
    return model(input_ids=ids, attention_mask=mask, labels=labels)


def _params():
    for family in FAMILIES:
        for B, L in SHAPES:
            for passes in ("fwd", "train-step"):
                for impl in IMPLS:
                    yield pytest.param(family, B, L, impl, passes, id=f"{family}-{LAYERS}l-{B}x{L}-{impl}-{passes}")


@pytest.mark.parametrize("family,B,L,impl,passes", list(_params()))
def test_bert_encoder(benchmark, family, B, L, impl, passes):
    train = passes == "train-step"
    model, reference = _models(family, impl, dropout=0.1 if train else 0.0)
    ids, mask, labels = _batch(B, L)
    model.eval(), reference.eval()
    with torch.no_grad():  # a fast wrong model is not a result
        check_close(_call(model, impl, ids, mask).logits, reference(input_ids=ids, attention_mask=mask).logits,
                    f"{family} {impl}", rtol=1e-3, atol=1e-3)
    del reference
    case = f"{family}-{LAYERS}l {B}x{L} pad{int(PAD_FRACTION * 100)}%"
    if not train:
        def step():
            with torch.no_grad():
                _call(model, impl, ids, mask)
    else:
        model.train()
        step = train_step(model.parameters(), lambda: _call(model, impl, ids, mask, labels).loss)
    measure(benchmark, step, group=f"{family}-encoder", case=case, impl=impl, passes=passes, rounds=ROUNDS,
            peak_memory=True)


# ----------------------------------------------------------------------- MLM pre-training step (own model)

LABEL_FRACTION = 0.15


def _mlm_batch(B: int, L: int, vocab: int):
    """The encoder batch with LABEL_FRACTION of the real tokens labelled (the rest -100)."""
    ids, mask, _ = _batch(B, L)
    g = torch.Generator().manual_seed(1)
    labelled = (torch.rand(B, L, generator=g) < LABEL_FRACTION).to(DEVICE) & (mask == 1)
    return ids, mask, torch.where(labelled, ids, torch.full_like(ids, -100))


@pytest.mark.parametrize("impl", IMPLS)
def test_bert_mlm_train_step(benchmark, impl):
    """Our BertForMaskedLM given labels (the head and the loss on the labelled rows only, ptm_kernels.mlm_loss)
    against transformers' (the head on every token), 4 layers at bert-base widths, 8 x 128, 20% padding, 15%
    labels, dropout 0.1: the shape of benchmarks/test_hf_encoders.py's hf-bert-mlm case."""
    config = lambda: transformers.BertConfig(num_hidden_layers=4)  # noqa: E731  (dropout 0.1: BERT's default)
    model, reference = twin_models(transformers.BertForMaskedLM, config, bert.BertForMaskedLM, impl, perturbed=())
    ids, mask, labels = _mlm_batch(8, 128, 30522)
    model.eval(), reference.eval()
    with torch.no_grad():  # a fast wrong model is not a result
        check_close(_call(model, impl, ids, mask, labels).loss, reference(input_ids=ids, attention_mask=mask,
                                                                          labels=labels).loss,
                    f"bert mlm {impl}", rtol=1e-4, atol=1e-4)
    del reference
    model.train()
    step = train_step(model.parameters(), lambda: _call(model, impl, ids, mask, labels).loss)
    measure(benchmark, step, group="bert-mlm", case="4l bert-base 8x128 pad20% labels15% dropout0.1", impl=impl,
            passes="train-step", rounds=ROUNDS, peak_memory=True)
