"""BERT against transformers: every head, eval outputs and train-mode gradients, padding-free path, round trip."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402

from .parity import batch, check_eval, check_grads, check_roundtrip, check_unpadded  # noqa: E402

bert = model_module("bert")

TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=32, num_labels=3)

HEADS = [  # (ours, transformers, compared fields (ours, theirs)); BertModel: the plain model of sentence-transformers
    ("BertModel", "BertModel", [("hidden", "last_hidden_state"), ("pooler_output", "pooler_output")]),
    ("BertForPreTraining", "BertForPreTraining",
     [("hidden", None), ("prediction_logits", "prediction_logits"),
      ("seq_relationship_logits", "seq_relationship_logits")]),
    ("BertForMaskedLM", "BertForMaskedLM", [("hidden", None), ("logits", "logits")]),
    ("BertForNextSentencePrediction", "BertForNextSentencePrediction", [("hidden", None), ("logits", "logits")]),
    ("BertForSequenceClassification", "BertForSequenceClassification", [("hidden", None), ("logits", "logits")]),
    ("BertForTokenClassification", "BertForTokenClassification", [("hidden", None), ("logits", "logits")]),
    ("BertForQuestionAnswering", "BertForQuestionAnswering",
     [("hidden", None), ("start_logits", "start_logits"), ("end_logits", "end_logits")]),
]


def _pair(ours_name, hf_name, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    kw = dict(TINY, num_labels=2) if "QuestionAnswering" in ours_name else TINY  # start and end
    cfg = transformers.BertConfig(**kw, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    hf = getattr(transformers, hf_name)(cfg)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so that a mapping mix-up shows
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return getattr(bert, ours_name).from_hf(hf), hf


@pytest.mark.parametrize("ours,theirs,fields", HEADS, ids=[h[0] for h in HEADS])
def test_eval_parity(ours, theirs, fields):
    model, hf = _pair(ours, theirs)
    check_eval(model, hf, batch(), fields, f"bert/{ours}")


@pytest.mark.parametrize("ours,theirs,fields", HEADS, ids=[h[0] for h in HEADS])
def test_grad_parity(ours, theirs, fields):
    model, hf = _pair(ours, theirs, dropout=0.0)
    check_grads(model, hf, batch(), fields, f"bert/{ours}")


@pytest.mark.parametrize("ours,theirs,fields", HEADS, ids=[h[0] for h in HEADS])
def test_unpadded_equals_padded(ours, theirs, fields):
    model, _ = _pair(ours, theirs)
    check_unpadded(model, batch())


def test_unpadded_grads_equal_padded():
    model, hf = _pair("BertForPreTraining", "BertForPreTraining", dropout=0.0)
    inputs = batch()
    real = inputs["attention_mask"].bool()
    grads = []
    for unpad in (False, True):
        model.zero_grad()
        out = model(**inputs, unpad=unpad)
        (out.prediction_logits[real].square().mean() + out.seq_relationship_logits.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-5, msg=n)


def test_lengths_equal_attention_mask():
    model, _ = _pair("BertForMaskedLM", "BertForMaskedLM")
    model.eval()
    inputs = batch()
    lengths = inputs["attention_mask"].sum(-1)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(inputs["input_ids"], token_type_ids=inputs["token_type_ids"], lengths=lengths).logits
    torch.testing.assert_close(b[real], a[real])


@pytest.mark.parametrize("ours,theirs", [("BertModel", "BertModel"), ("BertForPreTraining", "BertForPreTraining"),
                                         ("BertForQuestionAnswering", "BertForQuestionAnswering")])
def test_to_hf_roundtrip(ours, theirs):
    model, hf = _pair(ours, theirs)
    check_roundtrip(model, hf)


def test_bert_model_without_pooler():
    """A plain BertModel built with add_pooling_layer=False converts to ours without a pooler, same states."""
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**TINY), add_pooling_layer=False)
    model = bert.BertModel.from_hf(hf)
    assert model.pooler is None
    check_eval(model, hf, batch(), [("hidden", "last_hidden_state")], "bert/BertModel-no-pooler")
