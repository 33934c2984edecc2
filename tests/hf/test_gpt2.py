"""hf.apply on GPT-2 and GPT-Neo: patched vs unpatched transformers on the same weights."""

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import (VOCAB, assert_causal_lm_bf16_within_twice_torch,  # noqa: E402
                              assert_causal_lm_patched_equal, assert_revert_bit_identical, batch,
                              forward_backward, greedy_left_padded)

KINDS = ["gpt2", "gpt_neo"]


def build(kind, **overrides):
    """Dropout off (its random masks differ by design); eval mode is not needed for equality then."""
    if kind == "gpt2":
        cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cfg.update(overrides)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    # one global and one local layer; window 4 < the sequences, so the local band matters
    cfg = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
               attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=0, eos_token_id=0)
    cfg.update(overrides)
    return transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**cfg))


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_loss_gradients(kind):
    assert_causal_lm_patched_equal(build(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_within_twice_torch_error(kind):
    assert_causal_lm_bf16_within_twice_torch(build(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_revert_is_bitwise(kind):
    inputs = batch()
    assert_revert_bit_identical(build(kind), lambda model: forward_backward(model, inputs))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_token_identical_left_padded(kind):
    _, want, got = greedy_left_padded(build(kind), 10)  # GPT-Neo's local layer (window 4) slides over the cache
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_trains_and_differs_only_by_its_masks(kind):
    """With dropout the patched model draws its own masks: losses differ, but eval outputs still match."""
    drop = dict(resid_pdrop=0.1, attn_pdrop=0.1) if kind == "gpt2" else dict(attention_dropout=0.1)
    model = build(kind, **drop)
    hf.apply(model)
    inputs = batch()
    model.train()
    losses = {model(**inputs).loss.item() for _ in range(2)}
    assert len(losses) == 2  # a new dropout mask per call
    model.eval()
    got = forward_backward(model, inputs)[1]
    hf.revert(model)
    assert_close(got, forward_backward(model, inputs)[1], name="eval loss")


@pytest.mark.parametrize("kind,field", [("gpt2", "activation_function"), ("gpt_neo", "activation_function")])
def test_refuses_an_activation_it_cannot_fuse(kind, field):
    model = build(kind, activation_function="relu")
    with pytest.raises(ValueError, match=field):
        hf.apply(model)
    assert not hf.is_applied(model)
    inputs = batch()
    want = forward_backward(model, inputs)
    hf.apply(model, mlp=False)
    assert_close(forward_backward(model, inputs)[1], want[1], name="loss with mlp=False")


def test_gpt2_unscaled_and_layer_scaled_attention():
    """scale_attn_weights=False and scale_attn_by_inverse_layer_idx reach the kernel as its scale."""
    model = build("gpt2", scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    inputs = batch()
    want = forward_backward(model, inputs)
    hf.apply(model)
    got = forward_backward(model, inputs)
    assert_close(got[1], want[1], name="loss")
    for name, g in want[2].items():
        assert_close(got[2][name], g, name=f"grad {name}")


def test_gpt2_cross_attention_with_padded_encoder():
    """add_cross_attention: the residual fused into ln_cross_attn, the encoder's padding as key padding."""
    model = build("gpt2", add_cross_attention=True)
    inputs = batch()
    enc = torch.randn(3, 7, 64)
    enc_mask = torch.ones(3, 7, dtype=torch.long)
    enc_mask[0, 5:] = 0
    inputs.update(encoder_hidden_states=enc, encoder_attention_mask=enc_mask)

    def run():
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want = run()
    hf.apply(model)
    got = run()
    assert_close(got[0], want[0], name="loss")
    for name, g in want[1].items():
        assert_close(got[1][name], g, name=f"grad {name}")


def test_conv1d_runs_ptm_linear_until_reverted(monkeypatch):
    """Every Conv1D of GPT-2 (weight [in, out]) gets ops.linear over its transposed weight as its forward:
    beyond ops.linear's few CPU rows that is the same addmm (bit-identical), one-row decoding (the C++ GEMV down
    the columns on a CPU) gives transformers' tokens; revert removes the forwards."""
    from transformers.pytorch_utils import Conv1D

    model = build("gpt2")
    convs = [m for m in model.modules() if type(m) is Conv1D]
    ids = torch.randint(1, VOCAB, (1, 9))
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    x = torch.randn(3, 40, 64)  # 120 rows: F.linear, the same product as Conv1D's addmm
    many = convs[0](x)
    w, b = convs[0].weight.detach().double(), convs[0].bias.detach().double()
    one = x[:1, :1].double() @ w + b
    hf.apply(model, attention=False, norms=False, mlp=False, loss=False)
    assert len(convs) == 4 * 2 and all("forward" in m.__dict__ for m in convs)
    assert torch.equal(convs[0](x), many)
    linear_op = importlib.import_module("ptm_kernels.ops.linear")  # the module (ptm_kernels.ops.linear is the op)
    ops_called, call = [], linear_op._fast_path.call
    monkeypatch.setattr(linear_op._fast_path, "call", lambda op, *args: ops_called.append(op) or call(op, *args))
    assert_close(convs[0](x[:1, :1]), one, name="one row (GEMV)")
    assert ops_called == [linear_op._linear]  # the op (the C++ GEMV on a CPU), not F.linear
    monkeypatch.undo()
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), want)
    hf.revert(model)
    assert not any("forward" in m.__dict__ for m in convs)
