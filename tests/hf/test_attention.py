"""attn_implementation="ptm" on its own: same outputs and gradients as transformers' "sdpa" and "eager"."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402
from ptm_kernels import AttentionMask, fallbacks  # noqa: E402
from ptm_kernels.hf import attention as hf_attention  # noqa: E402
from transformers import masking_utils  # noqa: E402

from tests.compare import assert_close  # noqa: E402
from tests.hf._common import VOCAB  # noqa: E402



def llama(**overrides):
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def mistral(window):
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                     max_position_embeddings=256, sliding_window=window)
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def registered():
    hf.register()


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    return model(**inputs).logits


def left_padded(B=3, L=13):
    ids = torch.randint(0, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as generate pads
    mask[2, :1] = 0
    return ids, mask


def assert_ptm_matches_sdpa_and_eager(model, ids, mask):
    """Logits of the real tokens (padded query rows differ by design: eager spreads them uniformly)."""
    real = mask.bool()
    with torch.no_grad():
        got = run(model, "ptm", input_ids=ids, attention_mask=mask)
        for impl in ("sdpa", "eager"):
            want = run(model, impl, input_ids=ids, attention_mask=mask)
            assert_close(got[real], want[real], name=f"logits vs {impl}")


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_llama_matches_sdpa_and_eager(padding):
    model = llama()
    ids = torch.randint(0, VOCAB, (3, 13))
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 9:] = 0
    elif padding == "left":
        mask[1, :4] = 0
    assert_ptm_matches_sdpa_and_eager(model, ids, mask)


def test_llama_gradients_match_sdpa():
    model = llama()
    model.train()
    ids, mask = left_padded()
    grads = {}
    for impl in ("sdpa", "ptm"):
        model.zero_grad()
        model.set_attn_implementation(impl)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["sdpa"].items():
        assert_close(grads["ptm"][name], g, name=name)


@pytest.mark.parametrize("window", [3, 6])
def test_mistral_sliding_window_matches_sdpa_and_eager(window):
    model = mistral(window)
    assert_ptm_matches_sdpa_and_eager(model, *left_padded(L=14))


def test_mistral_window_is_an_analytic_part():
    model = mistral(5)
    model.set_attn_implementation("ptm")
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = masking_utils.create_sliding_window_causal_mask(model.config, model.model.embed_tokens(ids),
                                                           torch.ones_like(ids), None)
    assert isinstance(mask, AttentionMask)
    assert mask.is_causal and (mask.window_left, mask.window_right) == (4, None)
    assert mask.dense_mask is None


@pytest.mark.parametrize("make", [llama, lambda: mistral(4)], ids=["llama", "mistral"])
def test_generate_token_identical_left_padded(make):
    model = make()
    ids, mask = left_padded(L=9)
    out = {}
    for impl in ("sdpa", "ptm"):
        model.set_attn_implementation(impl)
        # 8 new tokens: Mistral's window (4) is passed, so its cache rolls (kv offset > 0)
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["ptm"], out["sdpa"])


def test_packed_sequences_are_segments():
    """DataCollatorWithFlattening: no attention mask, position_ids restart per document."""
    model = llama()
    lengths = [5, 3, 6]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    model.set_attn_implementation("ptm")
    mask = masking_utils.create_causal_mask(model.config, model.model.embed_tokens(ids), None, None,
                                            position_ids=position_ids)
    assert isinstance(mask, AttentionMask) and mask.q_ids is not None and mask.dense_mask is None
    with torch.no_grad():
        # use_cache=False: with a cache, transformers does not look for packed sequences
        got = run(model, "ptm", input_ids=ids, position_ids=position_ids, use_cache=False)
        want = run(model, "sdpa", input_ids=ids, position_ids=position_ids, use_cache=False)
        assert_close(got, want, name="packed logits")
        # and each document alone gives the same logits
        start = 0
        for n in lengths:
            alone = run(model, "sdpa", input_ids=ids[:, start:start + n])
            assert_close(got[:, start:start + n], alone, name="document alone")
            start += n


def test_right_padding_becomes_lengths_left_padding_an_O_L_part():
    ids = torch.zeros(2, 6)
    for side, expect_lengths in (("right", True), ("left", False)):
        pad = torch.ones(2, 6, dtype=torch.bool)
        if side == "right":
            pad[0, 4:] = False
        else:
            pad[0, :2] = False
        mask = hf_attention.mask_function(2, 6, 6, attention_mask=pad)
        assert mask.is_causal
        if expect_lengths:
            assert mask.key_lengths.tolist() == [4, 6] and mask.dense_mask is None
        else:
            assert mask.dense_mask.shape == (2, 1, 1, 6)
    del ids


def test_padding_that_keeps_every_key_adds_no_part():
    """generate passes an all-ones 2-D mask on every step: like transformers' sdpa_mask, it adds nothing (the
    key part would cost more to build than the decode step's attention). A shorter mask still hides the keys
    past its end (transformers pads it with zeros on the right)."""
    mask = hf_attention.mask_function(2, 1, 9, q_offset=8, kv_offset=0, attention_mask=torch.ones(2, 9, dtype=torch.long))
    assert mask.is_causal and mask.key_lengths is None and mask.dense_mask is None
    short = hf_attention.mask_function(2, 1, 9, q_offset=8, kv_offset=0, attention_mask=torch.ones(2, 7, dtype=torch.long))
    assert short.key_lengths.tolist() == [7, 7]
    want = masking_utils.sdpa_mask(2, 1, 9, q_offset=8, attention_mask=torch.ones(2, 7, dtype=torch.bool),
                                   allow_is_causal_skip=False)
    assert torch.equal(_dense(short, 2, 1, 9), want[:, 0])


def test_kv_cache_offset_is_bottom_right():
    """Decoding 2 tokens after 5 cached: query i sees keys j <= 5 + i."""
    mask = hf_attention.mask_function(1, 2, 7, q_offset=5, kv_offset=0)
    want = masking_utils.sdpa_mask(1, 2, 7, q_offset=5, allow_is_causal_skip=False)
    got = _dense(mask, 1, 2, 7)
    assert torch.equal(got, want[:, 0])


def test_unaligned_offsets_and_unknown_patterns_go_dense_and_exact():
    """A static cache (kv_length = max length, keys past the fill unused) and an or_masks composition."""
    fallbacks.reset()
    cases = [
        dict(batch_size=2, q_length=3, kv_length=10, q_offset=4, kv_offset=0),
        dict(batch_size=2, q_length=6, kv_length=6, mask_function=masking_utils.or_masks(
            masking_utils.causal_mask_function, lambda b, h, q, kv: kv == 0)),
    ]
    for case in cases:
        pad = torch.ones(2, case["kv_length"], dtype=torch.bool)
        pad[1, :1] = False
        mask = hf_attention.mask_function(attention_mask=pad, **case)
        want = masking_utils.sdpa_mask(attention_mask=pad, allow_is_causal_skip=False, **case)
        assert mask.dense_mask is not None
        assert torch.equal(_dense(mask, 2, case["q_length"], case["kv_length"]), want[:, 0])
    assert fallbacks.counts()[("hf_attention_mask", "mask function not analysed: dense part")] == 2


def test_refuses_what_it_cannot_honour():
    model = llama()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    mask = AttentionMask.causal()
    for kwargs in ({"softcap": 30.0}, {"s_aux": torch.zeros(4)}, {"output_attentions": True}):
        with pytest.raises(ValueError, match="ptm"):
            hf_attention.attention_forward(attn, q, k, v, mask, **kwargs)


def test_head_dim_outside_kernel_falls_back_to_sdpa_counted():
    model = llama()
    attn = model.model.layers[0].self_attn
    fallbacks.reset()
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, _ = hf_attention.attention_forward(attn, q, k, v, AttentionMask.causal(), scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=0.3)
    assert_close(out, want.transpose(1, 2), name="fallback")
    assert sum(n for (op, _), n in fallbacks.counts().items() if op == "hf_attention") == 1


def _dense(mask, B, Lq, Lk):
    from ptm_kernels.reference_kernels import attention_mask_dense
    return attention_mask_dense(B, 1, Lq, Lk, "cpu", mask.visibility(B, 1, Lq, Lk, "cpu"))[:, 0]


def test_whole_model_compiles_fullgraph_with_padding():
    """attn_implementation="ptm" on its own, the mask function and attention traced in one graph."""
    model = llama()
    model.set_attn_implementation("ptm")
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert_close(got[mask.bool()], want[mask.bool()], name="compiled logits")


def test_generate_with_static_cache():
    """generate prepares the masks ahead for a static cache and hands them back to the model; its kv length is
    the cache size (not aligned bottom-right), so the mask goes dense, and the tokens are the same."""
    model = llama()
    ids, mask = left_padded(L=9)
    out = {}
    for impl in ("sdpa", "ptm"):
        model.set_attn_implementation(impl)
        out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                   cache_implementation="static")
    assert torch.equal(out["ptm"], out["sdpa"])
