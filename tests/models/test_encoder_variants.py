"""ERNIE, XLM, MobileBERT (and DistilBERT's sinusoidal positions) against transformers: eval outputs and
train-mode gradients on padded batches, the padding-free path, and the to_hf round trip: the protocol of
test_encoders.py (parity.parity_tests). These models take extra per-token inputs (task_type_ids, langs), added by
a case's `extra`."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402
from .parity import HIDDEN, LOGITS, QA, TINY, Case, parity_tests  # noqa: E402

PRETRAIN = [HIDDEN, ("prediction_logits", "prediction_logits"),
            ("seq_relationship_logits", "seq_relationship_logits")]


def _ernie(dropout, **kw):
    return transformers.ErnieConfig(**{**TINY, **kw}, use_task_id=True, task_type_vocab_size=3,
                                    hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _task_types(inputs):
    return dict(task_type_ids=(inputs["input_ids"] % 3) * inputs["attention_mask"])


def _xlm(dropout, **kw):
    kw = {"vocab_size": 100, "emb_dim": 64, "n_layers": 2, "n_heads": 4, "max_position_embeddings": 40,
          "num_labels": 3, "n_langs": 3, **kw}
    return transformers.XLMConfig(**kw, dropout=dropout, attention_dropout=dropout, summary_first_dropout=dropout)


def _langs(inputs):  # TLM-like: each sequence's first half in one language, the rest in another
    L = inputs["input_ids"].shape[1]
    return dict(langs=(torch.arange(L) >= L // 3).long().expand_as(inputs["input_ids"]) + 1)


def _mobilebert(dropout, **kw):
    # bottleneck 32 with 2 heads (head dim 16), 3 stacked FFNs, NoNorm, trigram input: the defaults' structure
    kw = {**TINY, "num_attention_heads": 2, "intermediate_size": 64, "embedding_size": 32,
          "intra_bottleneck_size": 32, "num_feedforward_networks": 3, **kw}
    return transformers.MobileBertConfig(**kw, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)


def _distilbert_sinusoidal(dropout, **kw):
    return transformers.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                         max_position_embeddings=40, dropout=dropout, attention_dropout=dropout,
                                         sinusoidal_pos_embds=True, **{"num_labels": 3, **kw})


XLM_BATCH = dict(pad_id=2)  # XLM's pad index
NO_TYPES = dict(token_types=False)

CASES = [
    Case("ernie-pretraining", _ernie, "ErnieForPreTraining", "ernie", "ErnieForPreTraining", PRETRAIN,
         extra=_task_types),
    Case("ernie-mlm", _ernie, "ErnieForMaskedLM", "ernie", "ErnieForMaskedLM", LOGITS, extra=_task_types),
    Case("ernie-nsp", _ernie, "ErnieForNextSentencePrediction", "ernie", "ErnieForNextSentencePrediction", LOGITS,
         extra=_task_types),
    Case("ernie-cls", _ernie, "ErnieForSequenceClassification", "ernie", "ErnieForSequenceClassification", LOGITS,
         extra=_task_types),
    Case("ernie-tok", _ernie, "ErnieForTokenClassification", "ernie", "ErnieForTokenClassification", LOGITS),
    Case("ernie-qa", lambda d: _ernie(d, num_labels=2), "ErnieForQuestionAnswering", "ernie",
         "ErnieForQuestionAnswering", QA, extra=_task_types),
    Case("xlm-mlm", _xlm, "XLMWithLMHeadModel", "xlm", "XLMWithLMHeadModel", LOGITS, XLM_BATCH, _langs),
    Case("xlm-mlm-sinusoidal-relu", lambda d: _xlm(d, sinusoidal_embeddings=True, gelu_activation=False),
         "XLMWithLMHeadModel", "xlm", "XLMWithLMHeadModel", LOGITS, XLM_BATCH, _langs),
    Case("xlm-clm", lambda d: _xlm(d, causal=True, n_langs=1), "XLMWithLMHeadModel", "xlm", "XLMWithLMHeadModel",
         LOGITS, XLM_BATCH),
    Case("xlm-cls", lambda d: _xlm(d, summary_activation="tanh"), "XLMForSequenceClassification", "xlm",
         "XLMForSequenceClassification", LOGITS, XLM_BATCH, _langs),
    Case("xlm-tok", _xlm, "XLMForTokenClassification", "xlm", "XLMForTokenClassification", LOGITS, XLM_BATCH, _langs),
    Case("xlm-qa", lambda d: _xlm(d, num_labels=2), "XLMForQuestionAnsweringSimple", "xlm",
         "XLMForQuestionAnsweringSimple", QA, XLM_BATCH, _langs),
    Case("mobilebert-pretraining", _mobilebert, "MobileBertForPreTraining", "mobilebert", "MobileBertForPreTraining",
         PRETRAIN),
    Case("mobilebert-mlm-layernorm", lambda d: _mobilebert(d, normalization_type="layer_norm"),
         "MobileBertForMaskedLM", "mobilebert", "MobileBertForMaskedLM", LOGITS),
    Case("mobilebert-mlm-no-bottleneck", lambda d: _mobilebert(d, use_bottleneck=False, trigram_input=False,
                                                               num_feedforward_networks=1, hidden_act="gelu"),
         "MobileBertForMaskedLM", "mobilebert", "MobileBertForMaskedLM", LOGITS),
    Case("mobilebert-mlm-bottleneck-attention",
         lambda d: _mobilebert(d, use_bottleneck_attention=True, key_query_shared_bottleneck=False),
         "MobileBertForMaskedLM", "mobilebert", "MobileBertForMaskedLM", LOGITS),
    Case("mobilebert-nsp", _mobilebert, "MobileBertForNextSentencePrediction", "mobilebert",
         "MobileBertForNextSentencePrediction", LOGITS),
    Case("mobilebert-cls", _mobilebert, "MobileBertForSequenceClassification", "mobilebert",
         "MobileBertForSequenceClassification", LOGITS),
    Case("mobilebert-cls-no-activation", lambda d: _mobilebert(d, classifier_activation=False),
         "MobileBertForSequenceClassification", "mobilebert", "MobileBertForSequenceClassification", LOGITS),
    Case("mobilebert-tok", _mobilebert, "MobileBertForTokenClassification", "mobilebert",
         "MobileBertForTokenClassification", LOGITS),
    Case("mobilebert-qa", lambda d: _mobilebert(d, num_labels=2), "MobileBertForQuestionAnswering", "mobilebert",
         "MobileBertForQuestionAnswering", QA),
    Case("distilbert-sinusoidal-mlm", _distilbert_sinusoidal, "DistilBertForMaskedLM", "distilbert",
         "DistilBertForMaskedLM", LOGITS, NO_TYPES),
]


test_eval_parity, test_grad_parity, test_unpadded_equals_padded, test_to_hf_roundtrip = parity_tests(CASES)


def test_sinusoidal_positions_are_fixed_sinusoids():
    """Built from our own config (no HF weights), the table is the sinusoid and takes no gradient."""
    xlm = model_module("xlm")
    model = xlm.XLMModel(xlm.XLMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       max_position_embeddings=20, sinusoidal_embeddings=True))
    w = model.embeddings.position.weight
    assert not w.requires_grad
    pos, j = 7, torch.arange(32)
    angle = pos / torch.pow(10000.0, 2 * (j // 2) / 32).double()
    expected = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()
    torch.testing.assert_close(w[pos], expected)


def test_ernie_task_types_change_the_output():
    """task_type_ids reach the embeddings, padded and packed alike (a mapping that dropped them would pass the
    parity tests only if both sides ignored them)."""
    case = CASES[1]
    model, _ = case.pair()
    model.eval()
    inputs = case.inputs()
    with torch.no_grad():
        a = model(**inputs).logits
        b = model(**{**inputs, "task_type_ids": torch.zeros_like(inputs["input_ids"])}).logits
    assert (a - b).abs().max() > 1e-3


def test_mobilebert_trigram_neighbours_stay_in_their_sequence():
    """With unpad=True the packed tokens of two sequences sit side by side: the trigram input must still see
    each sequence's own neighbours (as the padded batch does), not the next sequence's first token."""
    mb = model_module("mobilebert")
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    nb = mb.trigram_neighbours(ids)
    assert nb[0, :, 0].tolist() == [6, 7, 0, -1] and nb[0, :, 1].tolist() == [-1, 5, 6, 7]
    assert nb[1, 1].tolist() == [0, 8]  # the last real token's next is the pad id, not 5
