"""The task heads of models/heads.py against transformers: the MLM heads' fused loss on the labelled rows
(loss and every gradient, padded and packed), the classification losses, and XLM's beam-search SQuAD head."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from . import parity  # noqa: E402
from ._import import model_module  # noqa: E402
from .parity import TINY, batch  # noqa: E402
from .test_encoder_variants import CASES as VARIANT_CASES  # noqa: E402
from .test_encoders import CASES  # noqa: E402

MLM_CASES = [c for c in CASES + VARIANT_CASES if c.hf_class.endswith(("ForMaskedLM", "WithLMHeadModel"))]


def _labels(inputs, seed=0, fraction=0.3):
    """About `fraction` of the real tokens labelled with random ids, -100 elsewhere (and at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = inputs["input_ids"]
    pick = (torch.rand(ids.shape, generator=g) < fraction) & inputs["attention_mask"].bool()
    pick[0, 1] = True  # at least one labelled row
    return torch.where(pick, torch.randint(5, 100, ids.shape, generator=g), torch.full_like(ids, -100))


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpad"])
@pytest.mark.parametrize("case", MLM_CASES, ids=[c.name for c in MLM_CASES])
def test_mlm_loss_on_labelled_rows_matches_transformers(case, unpad):
    """With labels the head runs on the labelled rows only (ptm_kernels.mlm_loss) and no logits come back; the
    loss and every parameter gradient equal transformers' (which computes the head on every token)."""
    model, hf = case.pair(dropout=0.0)
    model.train(), hf.train()
    inputs = case.inputs()
    labels = _labels(inputs)
    out = model(**inputs, labels=labels, unpad=unpad)
    ref = hf(**inputs, labels=labels)
    assert out.logits is None and out.loss.shape == ()
    d = abs(out.loss.item() - ref.loss.item())
    parity.MAX_DIFFS.setdefault(f"{case.name}-mlm-loss", {})["loss"] = d
    assert d < parity.TOL * max(1.0, abs(ref.loss.item()))
    out.loss.backward()
    ref.loss.backward()
    parity.check_grads_match(model, hf, f"{case.name}-mlm-loss")


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "unpad"])
def test_mlm_head_runs_on_the_labelled_rows_only(unpad):
    """With labels the MLM head's transform sees exactly the labelled rows (not every token, not the padding)."""
    model, _ = MLM_CASES[0].pair()
    inputs = MLM_CASES[0].inputs()
    labels = _labels(inputs)
    seen = []
    handle = model.mlm.transform.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1]))
    try:
        model(**inputs, labels=labels, unpad=unpad)
    finally:
        handle.remove()
    assert seen == [torch.Size([int((labels != -100).sum())])]


def test_mlm_loss_in_bfloat16():
    """The labelled-rows loss of a bfloat16 model: within twice transformers' own bfloat16 error of the float32
    loss (tests/compare.py), padded and packed."""
    from tests.compare import assert_close

    case = MLM_CASES[0]
    model, hf = case.pair(dropout=0.0)
    model.eval(), hf.eval()
    inputs = case.inputs()
    labels = _labels(inputs)
    with torch.no_grad():
        truth = hf(**inputs, labels=labels).loss
        hf_bf16 = hf.to(torch.bfloat16)
        baseline = hf_bf16(**inputs, labels=labels).loss
        ours = type(model).from_hf(hf_bf16)
        for unpad in (False, True):
            loss = ours(**inputs, labels=labels, unpad=unpad).loss
            assert_close(loss.float(), truth, baseline.float(), name=f"{case.name} bf16 mlm loss unpad={unpad}",
                         precision=torch.bfloat16)


def test_mlm_without_labelled_rows_gives_zero_loss_and_gradients():
    model, _ = MLM_CASES[0].pair(dropout=0.0)
    inputs = MLM_CASES[0].inputs()
    out = model(**inputs, labels=torch.full_like(inputs["input_ids"], -100))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_unpad_refuses_a_label_on_padding():
    model, _ = MLM_CASES[0].pair()
    inputs = MLM_CASES[0].inputs()
    labels = _labels(inputs)
    labels[2, -1] = 7  # a padded position of row 2
    with pytest.raises(ValueError, match="padded position"):
        model(**inputs, labels=labels, unpad=True)


@pytest.mark.parametrize("name,label_kw", [
    ("BertForPreTraining", dict(labels="mlm", next_sentence_label=2)),
    ("BertForSequenceClassification", dict(labels=3)),
    ("BertForTokenClassification", dict(labels="tokens")),
    ("BertForQuestionAnswering", dict(start_positions=12, end_positions=12)),
    ("BertForNextSentencePrediction", dict(labels=2)),
])
def test_task_losses_match_transformers(name, label_kw):
    """Each task's loss (fused cross-entropy ops) and gradients against transformers' own loss."""
    bert = model_module("bert")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{**TINY, "num_labels": 2 if "Question" in name else 3}, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    hf = getattr(transformers, name)(cfg)
    model = getattr(bert, name).from_hf(hf)
    inputs = batch()
    g = torch.Generator().manual_seed(3)
    kw = {}
    for k, v in label_kw.items():
        if v == "mlm":
            kw[k] = _labels(inputs)
        elif v == "tokens":
            kw[k] = torch.where(inputs["attention_mask"].bool(), torch.randint(0, 3, (3, 12), generator=g), -100)
        else:
            kw[k] = torch.randint(0, v, (3,), generator=g)
    a, b = model(**inputs, **kw), hf(**inputs, **kw)
    assert abs(a.loss.item() - b.loss.item()) < parity.TOL
    a.loss.backward()
    b.loss.backward()
    parity.check_grads_match(model, hf, f"bert/{name}-loss")


def test_replaced_token_detection_loss_packed_equals_padded():
    """ELECTRA's discriminator loss (binary cross-entropy over the real tokens) is the same with unpad=True, and
    equals transformers'."""
    case = next(c for c in CASES if c.name == "electra-disc")
    model, hf = case.pair(dropout=0.0)
    model.eval(), hf.eval()
    inputs = case.inputs()
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 2, inputs["input_ids"].shape, generator=g)
    with torch.no_grad():
        a, b = model(**inputs, labels=labels).loss, model(**inputs, labels=labels, unpad=True).loss
        ref = hf(**inputs, labels=labels).loss
    assert abs(a.item() - b.item()) < 1e-6 and abs(a.item() - ref.item()) < parity.TOL


def test_electra_pretrainer_packed_equals_padded():
    """The generator's head runs on the selected rows only, packed or padded alike: same samples, same loss."""
    electra, masking = model_module("electra"), model_module("masking")
    disc = electra.ElectraConfig(vocab_size=100, embedding_size=32, hidden_size=64, num_attention_heads=4,
                                 intermediate_size=128, num_hidden_layers=2, max_position_embeddings=40)
    torch.manual_seed(0)
    model = electra.ElectraPreTrainer(electra.generator_config(disc, scale=2), disc).eval()
    inputs = batch()
    special = masking.special_tokens_mask(inputs["input_ids"], (0,))
    selected = masking.mlm_select(inputs["input_ids"], special, generator=torch.Generator().manual_seed(0))
    outs = [model(inputs["input_ids"], inputs["input_ids"], selected, inputs["attention_mask"],
                  inputs["token_type_ids"], unpad=unpad, generator=torch.Generator().manual_seed(1))
            for unpad in (False, True)]
    assert outs[0].prediction_logits.shape == (int(selected.sum()), 100)
    torch.testing.assert_close(outs[1].prediction_logits, outs[0].prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, atol=1e-5, rtol=1e-5)


def test_electra_replace_takes_the_selected_rows():
    masking = model_module("masking")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    selected = torch.rand(2, 5, generator=g) < 0.5
    a = masking.electra_replace(logits, ids, selected, generator=torch.Generator().manual_seed(1))
    b = masking.electra_replace(logits[selected], ids, selected, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- XLM's and XLNet's beam-search SQuAD head

SQUAD = ["XLMForQuestionAnswering", "XLNetForQuestionAnswering"]


def _squad_pair(name):
    torch.manual_seed(0)
    if name.startswith("XLM"):
        cfg = transformers.XLMConfig(vocab_size=100, emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=40,
                                     n_langs=2, dropout=0.0, attention_dropout=0.0, start_n_top=3, end_n_top=2)
    else:
        cfg = transformers.XLNetConfig(vocab_size=100, d_model=64, n_layer=2, n_head=4, d_inner=96, dropout=0.0,
                                       start_n_top=3, end_n_top=2, pad_token_id=2)
    hf = getattr(transformers, name)(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n.lower() or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    module = model_module("xlm" if name.startswith("XLM") else "xlnet")
    return getattr(module, name).from_hf(hf), hf


def _squad_inputs(name):
    inputs = batch(pad_id=2)
    if name.startswith("XLM"):
        inputs["langs"] = (torch.arange(12) >= 6).long().expand(3, 12)
    return inputs


@pytest.mark.parametrize("name", SQUAD)
def test_squad_head_beam_matches_transformers(name):
    model, hf = _squad_pair(name)
    model.eval(), hf.eval()
    inputs = _squad_inputs(name)
    p_mask = (1 - inputs["attention_mask"]).float()
    p_mask[:, 0] = 1.0  # the first token cannot be in an answer
    with torch.no_grad():
        a = model(**inputs, p_mask=p_mask, cls_index=torch.tensor([0, 3, 1]))
        b = hf(**inputs, p_mask=p_mask, cls_index=torch.tensor([0, 3, 1]))
    for f in ("start_top_index", "end_top_index"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    diffs = {f: (getattr(a, f) - getattr(b, f)).abs().max().item()
             for f in ("start_top_log_probs", "end_top_log_probs", "cls_logits")}
    parity.check_worst(f"{name}-squad", "beam", diffs)


@pytest.mark.parametrize("name", SQUAD)
def test_squad_head_training_loss_and_gradients(name):
    model, hf = _squad_pair(name)
    model.train(), hf.train()
    inputs = _squad_inputs(name)
    kw = dict(start_positions=torch.tensor([2, 1, 3]), end_positions=torch.tensor([4, 5, 3]),
              cls_index=torch.tensor([0, 0, 1]), is_impossible=torch.tensor([0.0, 1.0, 0.0]))
    a, b = model(**inputs, **kw), hf(**inputs, **kw)
    assert abs(a.loss.item() - b.loss.item()) < parity.TOL
    a.loss.backward()
    b.loss.backward()
    if name.startswith("XLNet"):  # the query stream's embedding: no target_mapping, no gradient on either side
        assert model.transformer.mask_emb.grad is None and hf.transformer.mask_emb.grad is None
        model.transformer.mask_emb.requires_grad_(False)
    parity.check_grads_match(model, hf, f"{name}-squad-train")
    parity.check_roundtrip(model, hf)
