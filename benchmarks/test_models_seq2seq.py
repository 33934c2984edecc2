"""T5 and BART encoder-decoders, ptm-kernels against transformers' own: a training step (forward + backward +
AdamW step) and greedy generation throughput (new tokens / s, with the KV cache and cached cross keys/values).

impl "ptm": our T5 / Bart built with from_hf; "eager" / "sdpa": transformers' T5ForConditionalGeneration /
BartForConditionalGeneration with attn_implementation "eager" / "sdpa" (transformers supports sdpa for both).
Every implementation loads the same weights; encoder states and logits are checked against transformers-eager
(atol 1e-3) before timing.

- train-step: batch TRAIN_B, source SRC_L tokens, target TGT_L tokens (labels; decoder inputs shifted right).
- generate-b4: greedy, NEW new tokens (eos disabled) for GEN_B sources of SRC_L tokens; the time is that of the
  whole generate call (encoder + NEW decoder steps), tokens/s = B * NEW / time (recorded in extra_info).

A 2-core CPU runs 2 + 2 layers, an 8000-token vocabulary, source 512 / target 128 at batch 2 (and generation
from 128-token sources); a GPU runs T5-small and BART-base (6 + 6 layers, full vocabularies) at batch 8.
"""

from __future__ import annotations

import pytest
import torch

from .common import (GPU, check_close, measure, random_ids, record_tokens_per_s, train_step, twin_models)

transformers = pytest.importorskip("transformers")

from ptm_kernels.models import bart, t5  # noqa: E402

ROUNDS = None if GPU else 3
IMPLS = ["ptm", "eager", "sdpa"]
LAYERS = 6 if GPU else 2
TRAIN_B, SRC_L, TGT_L = (8 if GPU else 2), 512, 128
GEN_B, GEN_SRC_L, NEW = 4, (512 if GPU else 128), 32


def _t5_config():
    return transformers.T5Config(vocab_size=32128 if GPU else 8000, d_model=512, d_kv=64, d_ff=2048,
                                 num_layers=LAYERS, num_heads=8, feed_forward_proj="relu", dropout_rate=0.0,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _bart_config():
    return transformers.BartConfig(vocab_size=50265 if GPU else 8000, d_model=768, encoder_layers=LAYERS,
                                   decoder_layers=LAYERS, encoder_attention_heads=12, decoder_attention_heads=12,
                                   encoder_ffn_dim=3072, decoder_ffn_dim=3072, dropout=0.0, attention_dropout=0.0,
                                   activation_dropout=0.0, max_position_embeddings=1024, forced_eos_token_id=None,
                                   forced_bos_token_id=None)


MODELS = {  # name: (config, transformers class, our class, pad token)
    "t5": (_t5_config, transformers.T5ForConditionalGeneration, t5.T5, 0),
    "bart": (_bart_config, transformers.BartForConditionalGeneration, bart.Bart, 1),
}


def _models(name: str, impl: str):
    make_config, hf_class, ours, _ = MODELS[name]
    return twin_models(hf_class, make_config, ours, impl)


def _tokens(B: int, L: int, vocab: int, seed: int):
    """Random ids clear of the special tokens (T5's and BART's pad, eos and start ids are below 3)."""
    return random_ids(B, L, 3, vocab, seed)


def _call(model, impl, src, labels):
    if impl == "ptm":
        return model(src, torch.ones_like(src), labels=labels)
    return model(input_ids=src, attention_mask=torch.ones_like(src), labels=labels)


def _validate(model, reference, impl, src, labels, name):
    model.eval(), reference.eval()
    with torch.no_grad():  # a fast wrong model is not a result
        got, want = _call(model, impl, src, labels), _call(reference, "eager", src, labels)
        check_close(got.encoder_last_hidden_state, want.encoder_last_hidden_state, f"{name} {impl} encoder",
                    rtol=1e-3, atol=1e-3)
        check_close(got.logits, want.logits, f"{name} {impl} logits", rtol=1e-3, atol=1e-3)


def _params(passes):
    for name in MODELS:
        for impl in IMPLS:
            yield pytest.param(name, impl, id=f"{name}-{LAYERS}l-{impl}-{passes}")


@pytest.mark.parametrize("name,impl", list(_params("train-step")))
def test_seq2seq_train_step(benchmark, name, impl):
    model, reference = _models(name, impl)
    vocab = reference.config.vocab_size
    src, labels = _tokens(TRAIN_B, SRC_L, vocab, 0), _tokens(TRAIN_B, TGT_L, vocab, 1)
    _validate(model, reference, impl, src[:, :128].contiguous(), labels[:, :32].contiguous(), name)
    del reference
    model.train()
    step = train_step(model.parameters(), lambda: _call(model, impl, src, labels).loss)
    case = f"{name}-{LAYERS}+{LAYERS}l {TRAIN_B}x{SRC_L}->{TGT_L}"
    measure(benchmark, step, group=f"{name}-train", case=case, impl=impl, passes="train-step", rounds=ROUNDS,
            peak_memory=True)


@pytest.mark.parametrize("name,impl", list(_params(f"generate-b{GEN_B}")))
def test_seq2seq_greedy_generate(benchmark, name, impl):
    model, reference = _models(name, impl)
    vocab, pad = reference.config.vocab_size, MODELS[name][3]
    src = _tokens(GEN_B, GEN_SRC_L, vocab, 2)
    mask = torch.ones_like(src)
    _validate(model, reference, impl, src, _tokens(GEN_B, 16, vocab, 3), name)
    start = reference.config.decoder_start_token_id
    del reference
    model.eval()
    if impl == "ptm":
        def gen():
            return model.generate(src, NEW, attention_mask=mask, eos_token_id=None)
    else:
        def gen():
            return model.generate(src, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  num_beams=1, decoder_start_token_id=start, pad_token_id=pad, eos_token_id=None)
    out = gen()
    assert out.shape == (GEN_B, 1 + NEW), out.shape
    case = f"{name}-{LAYERS}+{LAYERS}l src{GEN_SRC_L}+{NEW}"
    measure(benchmark, gen, group=f"{name}-generate", case=case, impl=impl, passes=f"generate-b{GEN_B}",
            rounds=ROUNDS)
    record_tokens_per_s(benchmark, GEN_B * NEW)
