"""hf.apply on BART (post-norm) and Pegasus (pre-norm): patched vs unpatched transformers on the same weights
(logits, loss, every gradient; bf16; greedy generate; revert; the masks reaching the kernel as analytic parts)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
import ptm_kernels.hf.attention as hf_attention  # noqa: E402
from ptm_kernels import fallbacks  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf import _common  # noqa: E402
from tests.hf._common import (VOCAB, assert_bf16_within_twice_torch, assert_revert_bit_identical,  # noqa: E402
                              assert_same_results, float64_bf16_patched, perturb, seq2seq_no_labels,
                              unpatched_then_patched)
from tests.hf._common import seq2seq_forward_backward as forward_backward  # noqa: E402
SMALL = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
             eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
KINDS = ["bart", "pegasus"]


def build(kind="bart", **overrides):
    cfg = dict(SMALL, **overrides)
    if kind == "bart":
        model = transformers.BartForConditionalGeneration(transformers.BartConfig(**cfg))
    else:
        model = transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**cfg))
    model.set_attn_implementation("sdpa")
    # norms start at 1/0 and final_logits_bias at 0: move them, so a wrong mapping shows
    perturb(model, lambda name: "norm" in name or name.endswith("bias"))
    with torch.no_grad():
        model.final_logits_bias.add_(0.5 * torch.randn_like(model.final_logits_bias))
    return model


def seq2seq_batch(B=3, Ls=16, Lt=10):
    return _common.seq2seq_batch(B, Ls, Lt, pad_token_id=1, first_id=3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
def test_float32_logits_loss_gradients(kind, activation):
    inputs = seq2seq_batch()
    want, got = unpatched_then_patched(build(kind, activation_function=activation),
                                       lambda m: forward_backward(m, inputs))
    assert got[3] is None, "with labels the patched forward returns no logits"
    assert_same_results(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_within_twice_torch_error(kind):
    """Error against the float64 model within 2x the error of the unpatched bf16 model (+ a rounding unit)."""
    inputs = seq2seq_batch()
    assert_bf16_within_twice_torch(float64_bf16_patched(build(kind), lambda m: forward_backward(m, inputs)))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_token_identical(kind):
    model = build(kind)
    inputs = seq2seq_batch()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12,
                  do_sample=False, num_beams=1)
    want, got = unpatched_then_patched(model, lambda m: m.generate(**kwargs))
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_masks_reach_the_kernel_as_analytic_parts(kind, monkeypatch):
    """Encoder and cross attention get key padding, decoder self-attention causal & key padding; nothing dense."""
    seen = []
    attention = hf_attention.attention

    def spy(q, k, v, mask, **kw):
        seen.append(mask)
        return attention(q, k, v, mask, **kw)

    monkeypatch.setattr(hf_attention, "attention", spy)
    model = hf.apply(build(kind))
    fallbacks.reset()
    model(**seq2seq_no_labels(seq2seq_batch()))
    assert len(seen) == 2 + 2 * 2  # encoder self, decoder self and cross per layer
    assert all(m.dense_mask is None for m in seen), "a mask went dense"
    assert sum(m.is_causal for m in seen) == 2
    assert all(m.key_lengths is not None for m in seen)
    assert not [k for k in fallbacks.counts() if k[0].startswith("hf_")]


@pytest.mark.parametrize("kind", KINDS)
def test_revert_is_bit_identical(kind):
    inputs = seq2seq_batch()
    assert_revert_bit_identical(build(kind), lambda model: forward_backward(model, inputs))


def test_options_one_at_a_time():
    """Each group alone keeps the results (the layer forward serves unfused norms and plain activations too)."""
    reference = build("pegasus")
    inputs = seq2seq_batch()
    want = forward_backward(reference, inputs)
    for group in ("attention", "norms", "mlp", "loss"):
        options = {g: g == group for g in ("attention", "norms", "rope", "mlp", "loss")}
        model = hf.apply(copy.deepcopy(reference), **options)
        assert_same_results(forward_backward(model, inputs), want, logits=False, what=f" ({group} only)")


@pytest.mark.parametrize("cls", ["BartModel", "BartForSequenceClassification", "BartForCausalLM",
                                 "PegasusForCausalLM"])
def test_other_heads_patched_and_equal(cls):
    """The stacks of every head class are found and patched (base_model: the seq2seq model or the decoder
    wrapper); outputs equal the unpatched model's, the loss of the classification and CausalLM heads included."""
    kind = "pegasus" if cls.startswith("Pegasus") else "bart"
    config = (transformers.PegasusConfig if kind == "pegasus" else transformers.BartConfig)(**SMALL, num_labels=3)
    model = getattr(transformers, cls)(config)
    model.set_attn_implementation("sdpa")
    inputs = seq2seq_batch()
    if cls == "BartModel":
        inputs.pop("labels")
    elif cls == "BartForSequenceClassification":
        inputs["labels"] = torch.randint(0, 3, (3,))
        inputs["input_ids"][:, -1] = config.eos_token_id  # the head reads the last eos of each row
        inputs["attention_mask"][:, -1] = 1
    else:  # a decoder alone: the labels are the inputs (shifted inside)
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    want = model(**inputs)
    hf.apply(model)
    assert any("forward" in vars(m) for m in model.modules()), "nothing was patched"
    got = model(**inputs)
    key = "last_hidden_state" if cls == "BartModel" else "logits"
    assert_close(got[key], want[key], name=key)
    if "labels" in inputs:
        assert_close(got.loss, want.loss, name="loss")
