"""hf.apply on Llama, Mistral and Qwen2: patched vs unpatched transformers on the same weights."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
from ptm_kernels import AttentionMask  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import (VOCAB, assert_causal_lm_bf16_within_twice_torch,  # noqa: E402
                              assert_causal_lm_patched_equal, assert_revert_bit_identical, assert_same_results,
                              batch, forward_backward, greedy_left_padded, real_rows)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)


def build(kind="llama", **overrides):
    cfg = dict(SMALL, **overrides)
    if kind == "llama":
        config, cls = transformers.LlamaConfig(**cfg), transformers.LlamaForCausalLM
    elif kind == "mistral":
        config, cls = transformers.MistralConfig(sliding_window=5, **cfg), transformers.MistralForCausalLM
    else:  # qwen2: q/k/v biases, and a sliding window on the upper layer
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **cfg)
        cls = transformers.Qwen2ForCausalLM
    model = cls(config)
    model.set_attn_implementation("sdpa")
    return model


KINDS = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("kind", KINDS)
def test_float32_logits_loss_gradients(kind):
    assert_causal_lm_patched_equal(build(kind))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_bfloat16_within_twice_torch_error(kind):
    """Error against the float64 model within 2x the error of the unpatched bf16 model (+ a rounding unit)."""
    assert_causal_lm_bf16_within_twice_torch(build(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_revert_is_bitwise(kind):
    inputs = batch()
    assert_revert_bit_identical(build(kind), lambda model: forward_backward(model, inputs))


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_token_identical_left_padded(kind):
    model = build(kind)
    ids, want, got = greedy_left_padded(model, 8)
    assert torch.equal(got, want)
    single = model.generate(ids[1:2], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(single, want[1:2])


def test_loss_returns_no_logits_and_follows_num_items_in_batch_and_logits_to_keep():
    model = build()
    inputs = batch()
    inputs["labels"] = inputs["labels"][:, -5:]  # transformers scores the kept positions only
    n = torch.tensor(17)
    want = model(**inputs, num_items_in_batch=n, logits_to_keep=5).loss
    hf.apply(model)
    out = model(**inputs, num_items_in_batch=n, logits_to_keep=5)
    assert out.logits is None
    assert_close(out.loss, want, name="loss / num_items_in_batch over the last 5 positions")
    positional = model(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"], logits_to_keep=5)
    assert_close(positional.loss, model(**inputs, logits_to_keep=5).loss, name="positional inputs")
    as_tuple = model(**inputs, logits_to_keep=5, return_dict=False)
    assert_close(as_tuple[0], model(**inputs, logits_to_keep=5).loss, name="return_dict=False")


def test_apply_contract():
    model = build()
    with pytest.raises(TypeError, match="instance"):
        hf.apply(transformers.LlamaForCausalLM)
    signature = inspect.signature(model.forward)
    hf.apply(model)
    assert inspect.signature(model.forward) == signature  # generate/Trainer choose their inputs from it
    assert hf.apply(model) is model  # the same options again: nothing to do
    with pytest.raises(ValueError, match="already patched"):
        hf.apply(model, loss=False)
    hf.revert(model)
    with pytest.raises(ValueError, match="not patched"):
        hf.revert(model)
    other = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="gpt_neox.*supported: .*llama"):
        hf.apply(other)


def test_linears_run_ptm_linear_until_reverted():
    """Every module of class exactly nn.Linear (the projections and the LM head) gets ops.linear as its forward;
    one-row decoding (the C++ GEMV on a CPU) then gives transformers' tokens; revert removes the forwards."""
    model = build()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(1, VOCAB, (1, 9))
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    hf.apply(model, attention=False, norms=False, rope=False, mlp=False, loss=False)
    assert len(linears) == 1 + 7 * 2 and all("forward" in m.__dict__ for m in linears)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), want)
    hf.revert(model)
    assert not any("forward" in m.__dict__ for m in linears)


def test_refuses_an_activation_it_cannot_fuse():
    model = build(hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_act"):
        hf.apply(model)
    assert not hf.is_applied(model) and "forward" not in model.model.layers[0].__dict__  # left as it was
    inputs = batch()
    want = forward_backward(model, inputs)
    hf.apply(model, mlp=False)
    got = forward_backward(model, inputs)
    assert_close(got[1], want[1], name="loss with mlp=False")


def test_each_group_alone_matches():
    inputs = batch()
    model = build()
    want = forward_backward(model, inputs)
    groups = ("attention", "norms", "rope", "mlp", "loss", "linear")
    for group in groups:
        only = {g: g == group for g in groups}
        hf.apply(model, **only)
        got = forward_backward(model, inputs)
        hf.revert(model)
        assert_close(got[1], want[1], name=f"loss with {group} only")
        for name, g in want[2].items():
            assert_close(got[2][name], g, name=f"{group} only: grad {name}")


def test_gradient_checkpointing_still_checkpoints():
    model = build()
    model.activation_checkpointing_enable()
    model.train()
    inputs = batch()
    want = forward_backward(model, inputs)
    hf.apply(model)
    calls = []
    func = model.model.layers[0]._gradient_checkpointing_func
    model.model.layers[0]._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or func(*a, **k)
    got = forward_backward(model, inputs)
    assert calls, "the patched layer skipped gradient checkpointing"
    assert_close(got[1], want[1], name="loss")
    for name, g in want[2].items():
        assert_close(got[2][name], g, name=f"grad {name}")


def test_compiled_decoder_layer_fullgraph():
    model = build()
    hf.apply(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 9, 64, requires_grad=True)
    position_ids = torch.arange(9).unsqueeze(0)
    cos_sin = model.model.rotary_emb(x, position_ids)
    mask = AttentionMask.causal()
    eager = layer(x, attention_mask=mask, position_embeddings=cos_sin)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, attention_mask=mask, position_embeddings=cos_sin)
    assert_close(out, eager, name="compiled layer")
    (gx,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(eager.sum(), x)
    assert_close(gx, want, name="compiled layer dx")


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                                  {"rope_type": "linear", "factor": 2.0}], ids=["yarn", "linear"])
def test_rope_scaling_carries_over(rope):
    """The patched rotation uses the model's own cos/sin, so rope types (and yarn's attention scaling) hold."""
    model = build(rope_parameters=dict(rope, rope_theta=10000.0))
    inputs = batch()
    want = forward_backward(model, inputs)
    hf.apply(model, attention=False, norms=False, mlp=False, loss=False)  # the rotation alone
    got = forward_backward(model, inputs)
    assert_same_results(got, want, rows=lambda logits: real_rows(logits, inputs))
