"""GPT-2 and LLaMA decoders, ptm-kernels against transformers' own: a training step (forward + backward + AdamW
step) and greedy decoding throughput (new tokens / s, with the KV cache).

impl "ptm": our GPT2 / Llama built with from_hf; "eager" / "sdpa": transformers' GPT2LMHeadModel /
LlamaForCausalLM with attn_implementation "eager" / "sdpa". Every implementation loads the same weights;
logits are checked against transformers-eager (atol 1e-3) before timing.

- train-step: batch TRAIN_B x TRAIN_L, labels = inputs (causal LM loss), AdamW.
- decode-b1 / decode-b16: greedy, NEW new tokens after a PROMPT-token prompt, batch 1 / 16; the time is that
  of the whole generate call (prefill + NEW steps), tokens/s = B * NEW / time (recorded in extra_info).

A 2-core CPU runs 2 layers and an 8000-token vocabulary (the embedding and softmax would dominate the step);
a GPU runs GPT-2 small (12 layers, 50257) and a ~1B LLaMA (TinyLlama-1.1B's shape, 32000).
"""

from __future__ import annotations

import pytest
import torch

from .common import (GPU, check_close, measure, random_ids, record_tokens_per_s, train_step, twin_models)

transformers = pytest.importorskip("transformers")

from ptm_kernels.models import gpt2, llama  # noqa: E402

ROUNDS = None if GPU else 3
IMPLS = ["ptm", "eager", "sdpa"]
TRAIN_B, TRAIN_L = 2, 512
PROMPT, NEW = 64, 32
DECODE_BATCHES = (1, 16)


def _gpt2_config():
    kw = dict(n_positions=1024, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
              bos_token_id=None, eos_token_id=None)
    if GPU:
        return transformers.GPT2Config(vocab_size=50257, n_layer=12, **kw)
    return transformers.GPT2Config(vocab_size=8000, n_layer=2, **kw)


def _llama_config():
    kw = dict(max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if GPU:  # TinyLlama-1.1B's shape
        return transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, **kw)
    return transformers.LlamaConfig(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                                    num_attention_heads=12, num_key_value_heads=4, **kw)


MODELS = {  # name: (config, transformers class, our class)
    "gpt2": (_gpt2_config, transformers.GPT2LMHeadModel, gpt2.GPT2),
    "llama": (_llama_config, transformers.LlamaForCausalLM, llama.Llama),
}


def _models(name: str, impl: str):
    make_config, hf_class, ours = MODELS[name]
    return twin_models(hf_class, make_config, ours, impl, perturbed=("ln", "norm"))


def _validate(model, reference, impl, ids, name):
    model.eval(), reference.eval()
    with torch.no_grad():  # a fast wrong model is not a result
        check_close(model(ids).logits, reference(ids).logits, f"{name} {impl}", rtol=1e-3, atol=1e-3)


def _layers(name):
    c = MODELS[name][0]()
    return getattr(c, "n_layer", None) or c.num_hidden_layers


def _params(kind):
    for name in MODELS:
        for impl in IMPLS:
            if kind == "train":
                yield pytest.param(name, impl, id=f"{name}-{impl}-train-step")
            else:
                for B in DECODE_BATCHES:
                    yield pytest.param(name, impl, B, id=f"{name}-{impl}-decode-b{B}")


@pytest.mark.parametrize("name,impl", list(_params("train")))
def test_decoder_train_step(benchmark, name, impl):
    model, reference = _models(name, impl)
    ids = random_ids(TRAIN_B, TRAIN_L, 1, reference.config.vocab_size)
    _validate(model, reference, impl, ids[:, :128], name)
    del reference
    model.train()
    step = train_step(model.parameters(), lambda: model(ids, labels=ids).loss)
    case = f"{name}-{_layers(name)}l {TRAIN_B}x{TRAIN_L}"
    measure(benchmark, step, group=f"{name}-train", case=case, impl=impl, passes="train-step", rounds=ROUNDS,
            peak_memory=True)


@pytest.mark.parametrize("name,impl,B", list(_params("decode")))
def test_decoder_greedy_decode(benchmark, name, impl, B):
    model, reference = _models(name, impl)
    vocab = reference.config.vocab_size
    prompt = random_ids(B, PROMPT, 1, vocab, seed=1)
    _validate(model, reference, impl, prompt, name)
    del reference
    model.eval()
    if impl == "ptm":
        def gen():
            return model.generate(prompt, NEW)
    else:
        mask = torch.ones_like(prompt)

        def gen():
            return model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)
    out = gen()
    assert out.shape == (B, PROMPT + NEW), out.shape
    case = f"{name}-{_layers(name)}l prompt{PROMPT}+{NEW}"
    measure(benchmark, gen, group=f"{name}-decode", case=case, impl=impl, passes=f"decode-b{B}", rounds=ROUNDS)
    record_tokens_per_s(benchmark, B * NEW)


# ------------------------------------------------------------------------ generate: ours against transformers'
#
# The issue-15 setup: hidden 512, a PROMPT-token prompt and GEN_NEW new tokens, batch 1 and 16, greedy, the
# same weights. impl "ptm": models.generation (prefill, then the static decode step, eager); "ptm-compiled": the
# decode step through torch.compile (default mode on a CPU, "reduce-overhead", i.e. CUDA graphs, on a GPU);
# "eager" / "sdpa": transformers' generate with that attention (its fastest CPU setting is one of the two).
# Every impl must give the reference's tokens. passes "generate-bB" times the whole call, "prefill-bB" a call
# with one new token (the prompt's forward, the LM head, the first token).

GEN_NEW = 64
GEN_IMPLS = ["ptm", "ptm-compiled", "eager", "sdpa"]


def _gen_gpt2_config():
    return transformers.GPT2Config(vocab_size=8000, n_positions=1024, n_embd=512, n_layer=2, n_head=8,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                   eos_token_id=None)


def _gen_llama_config():
    return transformers.LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)


GEN_MODELS = {"gpt2": (_gen_gpt2_config, transformers.GPT2LMHeadModel, gpt2.GPT2),
              "llama": (_gen_llama_config, transformers.LlamaForCausalLM, llama.Llama)}


def _generate_fn(model, impl, prompt, new):
    if impl.startswith("ptm"):
        compile_mode = False if impl == "ptm" else ("reduce-overhead" if GPU else True)
        return lambda: model.generate(prompt, new, compile=compile_mode)
    mask = torch.ones_like(prompt)
    return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("passes", ["generate", "prefill"])
@pytest.mark.parametrize("B", DECODE_BATCHES, ids=[f"b{B}" for B in DECODE_BATCHES])
@pytest.mark.parametrize("impl", GEN_IMPLS)
@pytest.mark.parametrize("name", list(GEN_MODELS))
def test_decoder_generate(benchmark, name, impl, B, passes):
    make_config, hf_class, ours = GEN_MODELS[name]
    model, reference = twin_models(hf_class, make_config, ours, impl, perturbed=("ln", "norm"))
    model.eval(), reference.eval()
    prompt = random_ids(B, PROMPT, 1, 8000, seed=1)
    new = GEN_NEW if passes == "generate" else 1
    want = _generate_fn(reference, "eager", prompt, new)()
    del reference
    gen = _generate_fn(model, impl, prompt, new)
    got = gen()
    assert torch.equal(got, want), f"{name} {impl}: tokens differ from transformers'"
    case = f"{name}-h512-2l prompt{PROMPT}+{new}"
    measure(benchmark, gen, group=f"{name}-generate", case=case, impl=impl, passes=f"{passes}-b{B}",
            rounds=ROUNDS)
    record_tokens_per_s(benchmark, B * new)
