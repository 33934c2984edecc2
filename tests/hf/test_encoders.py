"""hf.apply on the BERT family: patched vs unpatched transformers on the same weights.

Every kind gets every patch: labelled-rows MLM loss, unpadded encoder, fused LayerNorm and bias-GELU, attention
on ptm_kernels (BERT/RoBERTa/ELECTRA through their patched self-attention, ALBERT/DistilBERT through
transformers' attention interface).
"""

import copy
import tempfile

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import (VOCAB, assert_bf16_within_twice_torch, assert_revert_bit_identical,  # noqa: E402
                              assert_same_convergence, assert_same_results, float64_bf16_patched,
                              forward_backward, perturb, unpatched_then_patched)
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
KINDS = ["bert", "roberta", "electra", "albert", "distilbert"]


def build(kind="bert", **overrides):
    cfg = dict(SMALL, **overrides)
    if kind == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(**cfg))
    elif kind == "roberta":  # positions start after padding_idx=1: a different embedding path
        model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**cfg))
    elif kind == "electra":  # embedding_size != hidden_size: the embeddings_project path
        model = transformers.ElectraForMaskedLM(transformers.ElectraConfig(**cfg, embedding_size=32))
    elif kind == "albert":
        model = transformers.AlbertForMaskedLM(transformers.AlbertConfig(**cfg, embedding_size=32))
    else:
        model = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, **overrides))
    model.set_attn_implementation("sdpa")
    # norm weights start at 1 and biases at 0: move them, so a wrong mapping shows
    return perturb(model, lambda name: "norm" in name.lower() or name.endswith("bias"))


def mlm_batch(B=3, L=12, label_fraction=0.3):
    """Right padding in every row but the first (lengths L/3 to L); about `label_fraction` of the real tokens
    labelled (MLM)."""
    ids = torch.randint(3, VOCAB, (B, L))
    lengths = torch.randint(L // 3, L + 1, (B,))
    lengths[0] = L
    mask = (torch.arange(L) < lengths[:, None]).long()
    labelled = (torch.rand(B, L) < label_fraction) & (mask == 1)
    labelled[0, 0] = True  # at least one labelled row
    return dict(input_ids=ids, attention_mask=mask, labels=torch.where(labelled, ids, torch.full_like(ids, -100)))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_loss_gradients(kind):
    inputs = mlm_batch()
    want, got = unpatched_then_patched(build(kind), lambda m: forward_backward(m, inputs))
    assert got[3] is None, "with labels the patched MLM forward returns no logits"
    assert_same_results(got, want)


@pytest.mark.parametrize("kind", ["bert", "roberta", "albert", "distilbert"])
def test_bfloat16_within_twice_torch_error(kind):
    """Error against the float64 model within 2x the error of the unpatched bf16 model (+ a rounding unit)."""
    inputs = mlm_batch()
    assert_bf16_within_twice_torch(float64_bf16_patched(build(kind), lambda m: forward_backward(m, inputs)))


@pytest.mark.parametrize("kind", ["bert", "albert", "distilbert"])
@pytest.mark.parametrize("only", ["attention", "norms", "mlp", "loss"])
def test_each_option_alone(only, kind):
    """apply(model, <one group>=True, the others False): each patch group is right on its own (the MLM loss
    without the unpadded encoder runs the padded encoder, then the labelled rows)."""
    model = build(kind)
    inputs = mlm_batch()
    want = forward_backward(model, inputs)
    flags = {name: name == only for name in ("attention", "norms", "rope", "mlp", "loss")}
    assert_same_results(forward_backward(hf.apply(model, **flags), inputs), want)


def test_sequence_classification_padded_encoder():
    """Models without an MLM head get the encoder patches on the padded batch: every row as transformers."""
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3))
    model.set_attn_implementation("sdpa")
    inputs = mlm_batch()
    inputs["labels"] = torch.randint(0, 3, (inputs["input_ids"].shape[0],))
    model.zero_grad()
    want = model(**inputs)
    want.loss.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    hf.apply(model)
    model.zero_grad()
    got = model(**inputs)
    got.loss.backward()
    assert_close(got.logits, want.logits, name="logits")
    hidden = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert_close(model.bert(**hidden).last_hidden_state, hf.revert(model).bert(**hidden).last_hidden_state,
                 name="last_hidden_state (padded rows included)")
    for name, g in want_grads.items():
        assert_close(dict(model.named_parameters())[name].grad, g, name=f"grad {name}")


def test_labelled_padding_row_runs_padded():
    """A label on a padded position needs that row's output: the encoder must not be unpadded then."""
    model = build("bert")
    inputs = mlm_batch()
    inputs["attention_mask"][1, 10:] = 0
    inputs["labels"][1, 10:] = 7  # labels where attention_mask is 0
    want, got = unpatched_then_patched(model, lambda m: forward_backward(m, inputs))
    assert_same_results(got, want, logits=False)


@pytest.mark.parametrize("kind", ["bert", "albert", "distilbert"])
def test_packed_encoder_skips_padding_rows(kind):
    """The unpadded path runs the layers on the real tokens only: the first layer sees T = mask.sum() rows."""
    model = hf.apply(build(kind))
    inputs = mlm_batch()
    seen = []
    layer = {"bert": lambda: model.bert.encoder.layer[0],
             "albert": lambda: model.albert.encoder.albert_layer_groups[0].albert_layers[0],
             "distilbert": lambda: model.distilbert.transformer.layer[0]}[kind]()
    layer.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    model(**inputs).loss.backward()
    T = int(inputs["attention_mask"].sum())
    # ALBERT runs its one shared layer at every depth
    assert seen == [(1, T, 64)] * (2 if kind == "albert" else 1)


def test_dropout_is_applied_in_training_only():
    """With dropout (attention probabilities in-kernel, hidden states by transformers' modules) two training
    forwards differ and give finite gradients; in eval mode the patched model equals the unpatched one."""
    reference = build("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    model = hf.apply(copy.deepcopy(reference))
    inputs = mlm_batch()
    model.train()
    first, second = model(**inputs).loss, model(**inputs).loss
    assert not torch.equal(first, second), "attention dropout was not applied"
    second.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval(), reference.eval()
    assert_close(model(**inputs).loss, reference(**inputs).loss, name="eval loss")


@pytest.mark.parametrize("kind", ["bert", "albert", "distilbert"])
def test_revert_is_bit_identical(kind):
    inputs = mlm_batch()
    assert_revert_bit_identical(build(kind), lambda model: forward_backward(model, inputs))


@pytest.mark.parametrize("field,value", [("is_decoder", True), ("position_embedding_type", "relative_key")])
def test_refuses_config_fields_that_change_the_math(field, value):
    model = build("bert")
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=field):
        hf.apply(model)
    assert not hf.is_applied(model)


def test_non_gelu_activation_is_honoured():
    """hidden_act="relu" has no fused kernel here: the intermediate layer keeps transformers' activation."""
    model = build("bert", hidden_act="relu")
    inputs = mlm_batch()
    want, got = unpatched_then_patched(model, lambda m: forward_backward(m, inputs))
    assert_close(got[1], want[1], name="loss")
    assert_close(got[0], want[0], name="logits")


def test_mlm_convergence_30_adamw_steps():
    """Liger-style: a mini BERT MLM trained 30 AdamW steps, patched vs unpatched: per-step loss within 1e-5
    relative in float32 (fresh batches each step, the same for both)."""
    assert_same_convergence(build("bert"), [mlm_batch(B=4, L=16) for _ in range(30)])


def test_trainer_steps_match():
    """A few transformers.Trainer steps (gradient accumulation: Trainer passes num_items_in_batch), patched vs
    unpatched: the same per-step losses and final weights."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    b = mlm_batch(B=16, L=10)
    data = [{k: v[i] for k, v in b.items()} for i in range(16)]

    def train(model):
        args = transformers.TrainingArguments(
            output_dir=tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=3e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)

    reference = build("bert")
    patched = hf.apply(copy.deepcopy(reference))
    want, got = train(reference), train(patched)
    assert len(want) == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # Adam divides each gradient element by its running RMS, so an element whose gradient is ~0 moves by up to
    # lr (3e-3) on a rounding difference; 1e-4 absolute is well below that and far above float32 noise.
    for (name, a), (_, b) in zip(reference.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
