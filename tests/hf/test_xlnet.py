"""hf.apply on XLNet: patched vs unpatched transformers on the same weights, with padding and segments, the
two-stream inputs (perm_mask / target_mapping) and memory (mems); bf16; greedy generate; revert."""


import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
from ptm_kernels.hf import xlnet as hf_xlnet  # noqa: E402
from models.xlnet import permutation_lm_inputs  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import (assert_bf16_within_twice_torch, assert_revert_bit_identical,  # noqa: E402
                              assert_same_results, float64_bf16_patched, perturb)

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, d_model=64, n_layer=2, n_head=4, d_inner=128, dropout=0.0, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def build(**overrides):
    model = transformers.XLNetLMHeadModel(transformers.XLNetConfig(**dict(SMALL, **overrides)))
    # norms start at 1/0 and the attention biases small: move them, so a wrong mapping shows
    return perturb(model, lambda name: "norm" in name or "bias" in name or "seg_embed" in name)


def batch(B=3, L=12, two_stream=False, segments=True, padding=True):
    """Right padding in row 1; token types 0 then 1 (two segments); labels for every real token, or (two_stream)
    XLNet's permutation-LM inputs: perm_mask, one-hot target_mapping with some all-zero rows, their labels."""
    ids = torch.randint(3, VOCAB, (B, L))
    mask = torch.ones(B, L)
    mask[1, 9:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask) if padding else dict(input_ids=ids)
    if segments:
        inputs["token_type_ids"] = (torch.arange(L) >= torch.tensor([4, 6, 3, 5])[:B, None]).long()
    if two_stream:
        inputs.update(permutation_lm_inputs(ids, K=3, attention_mask=mask.long()))
    else:
        inputs["labels"] = ids.masked_fill(mask == 0, -100) if padding else ids
    return inputs


def forward_backward(model, inputs, mems=None):
    """(logits without labels, loss with labels, {name: grad}, logits of the call with labels, mems out)."""
    model.zero_grad()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**no_labels, mems=mems).logits
    out = model(**inputs, mems=mems, use_mems=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), out.loss.detach(), grads, out.logits, out.mems


CASES = {
    "padding+segments": (dict(), dict()),
    "two-stream": (dict(), dict(two_stream=True)),
    # transformers' "uni" cannot add a padding or perm_mask to its causal mask (an in-place broadcast error)
    "uni same_length": (dict(attn_type="uni", same_length=True), dict(padding=False)),
    "bi_data clamp_len": (dict(bi_data=True, clamp_len=5), dict(B=4, two_stream=True)),
    "no segments, no mask": (dict(), dict(segments=False, padding=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_logits_loss_gradients(case):
    config, inputs = CASES[case]
    model = build(**config)
    inputs = batch(**inputs)
    want = forward_backward(model, inputs)
    hf.apply(model)
    got = forward_backward(model, inputs)
    assert got[3] is None, "with labels the patched forward returns no logits"
    assert_same_results(got, want)
    for i, (m_got, m_want) in enumerate(zip(got[4], want[4])):
        assert_close(m_got, m_want, name=f"mems {i}")


@pytest.mark.parametrize("two_stream", [False, True])
def test_memory_segment_recurrence(two_stream):
    """A second segment attending to the first one's mems (keys memory first, memory in segment 0)."""
    model = build(mem_len=16)
    first, second = batch(), batch(two_stream=two_stream)
    with torch.no_grad():
        mems = model(**{k: v for k, v in first.items() if k != "labels"}, use_mems=True).mems
    want = forward_backward(model, second, mems=mems)
    hf.apply(model)
    got = forward_backward(model, second, mems=mems)
    assert_same_results(got, want)


def test_bfloat16_within_twice_torch_error():
    """Single stream: transformers' two-stream path multiplies float32 positions by the model's r without a
    cast, so it runs in float32 only (its float64 truth and its bf16 baseline raise)."""
    inputs = batch()

    def run(model):  # float inputs (the attention mask) in the model's dtype
        dtype = next(model.parameters()).dtype
        return forward_backward(model, {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()})

    assert_bf16_within_twice_torch(float64_bf16_patched(build(), run))


def test_greedy_generate_token_identical():
    """transformers' XLNet generate: a mask token appended, perm_mask and a one-hot target_mapping per step."""
    model = build()
    ids = torch.randint(3, VOCAB, (2, 7))
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    want = model.generate(ids, **kwargs)
    got = hf.apply(model).generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_inputs_that_no_analytic_form_covers_run_transformers():
    """A target_mapping that is not one-hot, and a seg_mat no segment ids produce, fall back (exactly)."""
    assert hf_xlnet.one_hot_positions(torch.full((2, 5, 1), 0.5)) is None
    assert hf_xlnet.one_hot_positions(torch.ones(2, 5, 1).tril()) is None  # rows with several ones
    seg_mat = torch.nn.functional.one_hot(torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 0]]), 2)  # not an equivalence
    assert hf_xlnet.segment_ids(seg_mat[:, :, None, :].float()) is None
    model = build()
    inputs = batch(two_stream=True)
    inputs["target_mapping"] = inputs["target_mapping"] * 0.5
    want = forward_backward(model, inputs)
    got = forward_backward(hf.apply(model), inputs)
    assert_close(got[1], want[1], name="loss")


def test_revert_is_bit_identical():
    inputs = batch(two_stream=True)
    assert_revert_bit_identical(build(), lambda model: forward_backward(model, inputs))


def test_sequence_classification_head_patched_and_equal():
    """Heads on XLNetModel get the layer patches too (no fused loss there): logits, loss and gradients equal."""
    model = transformers.XLNetForSequenceClassification(transformers.XLNetConfig(**SMALL, num_labels=3, summary_last_dropout=0.0))
    inputs = batch()
    inputs["labels"] = torch.randint(0, 3, (3,))

    def run(m):
        m.zero_grad()
        out = m(**inputs)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                        if p.grad is not None}

    want = run(model)
    hf.apply(model)
    assert "forward" in vars(model.transformer.layer[0].rel_attn)
    assert_same_results(run(model), want)
