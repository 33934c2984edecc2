"""hf.apply on T5: patched vs unpatched transformers on the same weights (loss, logits, every gradient, the
relative-bias embedding's included; greedy generate; revert; convergence)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
from ptm_kernels import AttentionMask  # noqa: E402
from ptm_kernels.hf import t5 as hf_t5  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import (assert_bf16_within_twice_torch, assert_revert_bit_identical,  # noqa: E402
                              assert_same_results, train_losses)

VOCAB = 128
# 8 buckets up to distance 20: the sequences below are long enough to reach the log-spaced buckets
SMALL = dict(vocab_size=VOCAB, d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2,
             dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=20,
             decoder_start_token_id=0)
FFN = ["relu", "gated-gelu", "gated-silu", "gelu"]


def build(feed_forward_proj="relu", **overrides):
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**SMALL, feed_forward_proj=feed_forward_proj, **overrides))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():  # norm weights start at 1: move them, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def seq2seq_batch(B=3, Ls=24, Lt=10):
    """Source right-padded in rows 1 and 2; target labels ignored (-100) at the end of row 2."""
    ids = torch.randint(2, VOCAB, (B, Ls))
    mask = torch.ones(B, Ls, dtype=torch.long)
    mask[1, 17:] = 0
    mask[2, 6:] = 0
    labels = torch.randint(2, VOCAB, (B, Lt))
    labels[2, Lt - 3:] = -100
    return dict(input_ids=ids * mask, attention_mask=mask, labels=labels)


def forward_backward(model, inputs):
    """(logits without labels but with a padded decoder mask, loss with labels, {name: grad} of the parameters
    that get one (Pegasus' sinusoidal positions are a frozen parameter))."""
    model.zero_grad()
    decoder_mask = torch.ones_like(inputs["labels"])
    decoder_mask[0, -2:] = 0
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                   decoder_input_ids=inputs["labels"].clamp(min=0), decoder_attention_mask=decoder_mask).logits
    out = model(**inputs)
    out.loss.backward()
    return logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out.logits


@pytest.mark.parametrize("ffn", FFN)
def test_float32_logits_loss_gradients(ffn):
    model = build(ffn)
    inputs = seq2seq_batch()
    want = forward_backward(model, inputs)
    hf.apply(model)
    got = forward_backward(model, inputs)
    assert got[3] is None, "with labels the patched forward returns no logits"
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in want[2]
    assert_same_results(got, want)


def test_unscaled_decoder_outputs():
    """T5 v1.1 (tie_word_embeddings=False in its config): no d_model**-0.5 scaling before the head."""
    model = build("gated-gelu", tie_word_embeddings=False)
    assert not hf_t5._scales_decoder_outputs(model.config)
    inputs = seq2seq_batch()
    want = forward_backward(model, inputs)
    got = forward_backward(hf.apply(model), inputs)
    assert_close(got[1], want[1], name="loss")
    for name, g in want[2].items():
        assert_close(got[2][name], g, name=f"grad {name}")


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_bfloat16_within_twice_torch_error(ffn):
    """Error against the float64 model within 2x the error of the unpatched bf16 model (+ a rounding unit)."""
    truth = build(ffn).double()
    base = copy.deepcopy(truth).to(torch.bfloat16)
    patched = hf.apply(copy.deepcopy(truth).to(torch.bfloat16))
    inputs = seq2seq_batch()
    assert_bf16_within_twice_torch([forward_backward(m, inputs) for m in (truth, base, patched)])


def test_greedy_generate_token_identical():
    model = build("gated-gelu")
    inputs = seq2seq_batch()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12,
                  do_sample=False)
    want = model.generate(**kwargs)
    got = hf.apply(model).generate(**kwargs)
    assert torch.equal(got, want)


def test_masks_become_analytic_parts():
    """transformers' 4-D masks are read back as key padding and causal & key padding, not dense parts."""
    q = torch.randn(2, 4, 5, 16)
    padding = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    key_padding = padding[:, None, None, :].expand(2, 1, 5, 5)
    part = hf_t5.analytic_mask(key_padding, False, q)
    assert part.dense_mask is None and part.key_lengths.tolist() == [5, 3]
    causal = key_padding & torch.ones(5, 5, dtype=torch.bool).tril()
    part = hf_t5.analytic_mask(causal, True, q)
    assert part.dense_mask is None and part.is_causal and part.key_lengths.tolist() == [5, 3]
    assert hf_t5.analytic_mask(None, True, q).is_causal
    scattered = key_padding.clone()
    scattered[0, 0, 2, 1] = False  # no analytic form: stays dense
    assert isinstance(hf_t5.analytic_mask(scattered, False, q), AttentionMask)
    assert hf_t5.analytic_mask(scattered, False, q).dense_mask is not None


def test_revert_is_bit_identical():
    inputs = seq2seq_batch()
    assert_revert_bit_identical(build("gated-gelu"), lambda model: forward_backward(model, inputs))


def test_convergence_30_adamw_steps():
    """Liger-style: a mini T5 trained 30 AdamW steps, patched vs unpatched: per-step loss within 1e-5
    relative in float32 (fresh batches each step, the same for both)."""
    reference = build("gated-gelu")
    patched = hf.apply(copy.deepcopy(reference))
    batches = [seq2seq_batch(Ls=12, Lt=6) for _ in range(30)]
    losses = [train_losses(model, batches) for model in (reference, patched)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    assert losses[0][-5:].mean() < losses[0][:5].mean(), "the mini model should learn something"
