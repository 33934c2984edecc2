"""The BERT variants against transformers: eval outputs and train-mode gradients on padded batches, the
padding-free path, and the to_hf round trip (parity.parity_tests over CASES). (BERT itself: test_bert.py.)"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402
from .parity import HIDDEN, LOGITS, QA, TINY, Case, batch, check_eval, parity_tests  # noqa: E402


def _roberta(dropout, **kw):
    return transformers.RobertaConfig(**{**TINY, **kw}, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout, pad_token_id=1)


def _albert(dropout, **kw):
    # 3 layers over 2 groups of 2 inner layers: sharing and grouping both exercised
    return transformers.AlbertConfig(**{**TINY, "num_hidden_layers": 3, **kw}, embedding_size=32,
                                     num_hidden_groups=2, inner_group_num=2, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, classifier_dropout_prob=dropout)


def _distilbert(dropout, **kw):
    return transformers.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                         max_position_embeddings=40, dropout=dropout, attention_dropout=dropout,
                                         seq_classif_dropout=dropout, qa_dropout=dropout, **{"num_labels": 3, **kw})


def _electra(dropout, **kw):
    return transformers.ElectraConfig(**{**TINY, **kw}, embedding_size=32, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)


PRETRAIN = [HIDDEN, ("prediction_logits", "prediction_logits"), ("seq_relationship_logits", "sop_logits")]
NO_TYPES = dict(token_types=False)

CASES = [
    Case("roberta-mlm", _roberta, "RobertaForMaskedLM", "roberta", "RobertaForMaskedLM", LOGITS, dict(pad_id=1)),
    Case("roberta-cls", _roberta, "RobertaForSequenceClassification", "roberta", "RobertaForSequenceClassification",
         LOGITS, dict(pad_id=1)),
    Case("roberta-tok", _roberta, "RobertaForTokenClassification", "roberta", "RobertaForTokenClassification",
         LOGITS, dict(pad_id=1)),
    Case("roberta-qa", lambda d: _roberta(d, num_labels=2), "RobertaForQuestionAnswering", "roberta",
         "RobertaForQuestionAnswering", QA, dict(pad_id=1)),
    Case("albert-pretraining", _albert, "AlbertForPreTraining", "albert", "AlbertForPreTraining", PRETRAIN),
    Case("albert-mlm", _albert, "AlbertForMaskedLM", "albert", "AlbertForMaskedLM", LOGITS),
    Case("albert-cls", _albert, "AlbertForSequenceClassification", "albert", "AlbertForSequenceClassification",
         LOGITS),
    Case("albert-tok", _albert, "AlbertForTokenClassification", "albert", "AlbertForTokenClassification", LOGITS),
    Case("albert-qa", lambda d: _albert(d, num_labels=2), "AlbertForQuestionAnswering", "albert",
         "AlbertForQuestionAnswering", QA),
    Case("distilbert-mlm", _distilbert, "DistilBertForMaskedLM", "distilbert", "DistilBertForMaskedLM", LOGITS,
         NO_TYPES),
    Case("distilbert-cls", _distilbert, "DistilBertForSequenceClassification", "distilbert",
         "DistilBertForSequenceClassification", LOGITS, NO_TYPES),
    Case("distilbert-tok", _distilbert, "DistilBertForTokenClassification", "distilbert",
         "DistilBertForTokenClassification", LOGITS, NO_TYPES),
    Case("distilbert-qa", lambda d: _distilbert(d, num_labels=2), "DistilBertForQuestionAnswering", "distilbert",
         "DistilBertForQuestionAnswering", QA, NO_TYPES),
    Case("electra-disc", _electra, "ElectraForPreTraining", "electra", "ElectraForPreTraining", LOGITS),
    Case("electra-gen", _electra, "ElectraForMaskedLM", "electra", "ElectraForMaskedLM", LOGITS),
    Case("electra-cls", _electra, "ElectraForSequenceClassification", "electra", "ElectraForSequenceClassification",
         LOGITS),  # ELECTRA's GLUE head
    Case("electra-tok", _electra, "ElectraForTokenClassification", "electra", "ElectraForTokenClassification",
         LOGITS),
    Case("electra-qa", lambda d: _electra(d, num_labels=2), "ElectraForQuestionAnswering", "electra",
         "ElectraForQuestionAnswering", QA),
]


test_eval_parity, test_grad_parity, test_unpadded_equals_padded, test_to_hf_roundtrip = parity_tests(CASES)


def test_electra_pretrainer_shares_embeddings_and_trains():
    electra = model_module("electra")
    masking = model_module("masking")
    disc = electra.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128, num_hidden_layers=2, max_position_embeddings=40)
    torch.manual_seed(0)
    model = electra.ElectraPreTrainer(electra.generator_config(disc, scale=2), disc)
    assert model.generator.backbone.embeddings is model.discriminator.backbone.embeddings
    n_shared = sum(p.numel() for p in model.discriminator.backbone.embeddings.parameters())
    n_separate = sum(p.numel() for m in (model.generator, model.discriminator) for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_separate - n_shared
    inputs = batch()
    g = torch.Generator().manual_seed(0)
    special = masking.special_tokens_mask(inputs["input_ids"], (0,))
    selected = masking.mlm_select(inputs["input_ids"], special, generator=g)
    masked, _ = masking.mask_tokens(inputs["input_ids"], selected, 3, 100, mask_prob=1.0, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out = model(masked, inputs["input_ids"], selected, inputs["attention_mask"], inputs["token_type_ids"],
                    generator=g)
        opt.zero_grad()
        out.loss.backward()
        assert model.discriminator.backbone.embeddings.word.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))


def _sbo_reference(head, h, spans, word):
    """The span boundary objective as the paper writes it, one token at a time (plain PyTorch)."""
    out = []
    for b, s, e in spans.tolist():
        for i in range(s, e):
            x = torch.cat([h[b, s - 1], h[b, e], head.position.weight[min(i - s, head.max_span - 1)]])
            x = torch.nn.functional.gelu(x @ head.fc1.weight.t() + head.fc1.bias)
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), head.norm1.weight, head.norm1.bias, 1e-12)
            x = torch.nn.functional.gelu(x @ head.fc2.weight.t() + head.fc2.bias)
            x = torch.nn.functional.layer_norm(x, (x.shape[-1],), head.norm2.weight, head.norm2.bias, 1e-12)
            out.append(x @ word.t() + head.bias)
    return torch.stack(out)


def test_spanbert_mlm_parity_and_sbo_reference():
    spanbert = model_module("spanbert")
    masking = model_module("masking")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = transformers.BertForMaskedLM(cfg)
    model = spanbert.SpanBertForPreTraining.from_hf(hf, max_span_length=4)
    with torch.no_grad():  # a non-trivial head
        for p in model.sbo.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    inputs = batch()
    check_eval(model, hf, inputs, LOGITS, "spanbert-mlm")
    # spans on the real tokens, boundaries inside the sequence
    words = torch.where(inputs["attention_mask"].bool(), torch.arange(12).expand(3, 12) - 1, -1)
    words[:, 0] = -1
    words[torch.arange(3), inputs["attention_mask"].sum(-1) - 1] = -1
    _, spans = masking.span_select(words, prob=0.4, seed=0)
    model.eval()
    out = model(**inputs, spans=spans)
    ref = _sbo_reference(model.sbo, out.last_hidden_state, spans, model.backbone.embeddings.word.weight)
    torch.testing.assert_close(out.prediction_logits, ref, atol=1e-4, rtol=1e-4)
    # the loss trains every part
    labels = torch.full_like(inputs["input_ids"], -100)
    for b, s, e in spans.tolist():
        labels[b, s:e] = inputs["input_ids"][b, s:e]
    model.train()
    model(**inputs, spans=spans, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(model.to_hf().state_dict()) == set(hf.state_dict())
