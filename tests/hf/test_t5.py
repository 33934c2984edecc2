"""hf.apply on T5: patched vs unpatched transformers on the same weights (loss, logits, every gradient, the
relative-bias embedding's included; greedy generate; revert; convergence)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

from ptm_kernels import AttentionMask  # noqa: E402
from ptm_kernels.hf import t5 as hf_t5  # noqa: E402

from tests.hf import _common  # noqa: E402
from tests.hf._common import (assert_bf16_within_twice_torch, assert_revert_bit_identical,  # noqa: E402
                              assert_same_convergence, assert_same_results, float64_bf16_patched, perturb,
                              unpatched_then_patched)
from tests.hf._common import seq2seq_forward_backward as forward_backward  # noqa: E402

VOCAB = _common.VOCAB
# 8 buckets up to distance 20: the sequences below are long enough to reach the log-spaced buckets
SMALL = dict(vocab_size=VOCAB, d_model=64, d_ff=128, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2,
             dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=20,
             decoder_start_token_id=0)
FFN = ["relu", "gated-gelu", "gated-silu", "gelu"]


def build(feed_forward_proj="relu", **overrides):
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(**SMALL, feed_forward_proj=feed_forward_proj, **overrides))
    model.set_attn_implementation("sdpa")
    return perturb(model, lambda name: "layer_norm" in name)  # norm weights start at 1


def seq2seq_batch(B=3, Ls=24, Lt=10, padded_from=(17, 6)):
    return _common.seq2seq_batch(B, Ls, Lt, pad_token_id=0, first_id=2, padded_from=padded_from)


@pytest.mark.parametrize("ffn", FFN)
def test_float32_logits_loss_gradients(ffn):
    inputs = seq2seq_batch()
    want, got = unpatched_then_patched(build(ffn), lambda m: forward_backward(m, inputs))
    assert got[3] is None, "with labels the patched forward returns no logits"
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in want[2]
    assert_same_results(got, want)


def test_unscaled_decoder_outputs():
    """T5 v1.1 (tie_word_embeddings=False in its config): no d_model**-0.5 scaling before the head."""
    model = build("gated-gelu", tie_word_embeddings=False)
    assert not hf_t5._scales_decoder_outputs(model.config)
    inputs = seq2seq_batch()
    want, got = unpatched_then_patched(model, lambda m: forward_backward(m, inputs))
    assert_same_results(got, want, logits=False)


@pytest.mark.parametrize("ffn", ["relu", "gated-gelu"])
def test_bfloat16_within_twice_torch_error(ffn):
    """Error against the float64 model within 2x the error of the unpatched bf16 model (+ a rounding unit)."""
    inputs = seq2seq_batch()
    assert_bf16_within_twice_torch(float64_bf16_patched(build(ffn), lambda m: forward_backward(m, inputs)))


def test_greedy_generate_token_identical():
    model = build("gated-gelu")
    inputs = seq2seq_batch()
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=12,
                  do_sample=False)
    want, got = unpatched_then_patched(model, lambda m: m.generate(**kwargs))
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
    relative in float32 (fresh batches each step, the same for both), with source rows 1 and 2 padded.

    The bound against the float32 drift of training itself (this batch, 30 steps, 14 seeds): transformers'
    eager vs its SDPA drift apart by at most 6.9e-7, the patched model from SDPA by at most 1.5e-6 (2.8e-7
    at this test's seed). In float64 (transformers' T5LayerNorm kept in both: it rounds the variance to float32)
    the first step's loss and every gradient agree to 2e-15: the drift is rounding, not different math."""
    assert_same_convergence(build("gated-gelu"), [seq2seq_batch(Ls=12, Lt=6, padded_from=(9, 6)) for _ in range(30)])
