"""transformers decoders patched in place by `ptm_kernels.hf.apply` against the same model unpatched (SDPA).

impl "ptm": `LlamaForCausalLM` after `ptm_kernels.hf.apply(model)` (fused residual RMSNorm, RoPE, SwiGLU,
attn_implementation "ptm", fused linear cross-entropy: no [tokens, vocab] logits); "sdpa": the same model and
weights, unpatched, attn_implementation="sdpa". Loss and logits are checked against each other before timing.

- train-step: a LLaMA-style model (4 layers, d 512, 8 heads / 4 kv heads, MLP 1536, vocab 32000), batch
  TRAIN_B x TRAIN_L, labels = inputs, forward + backward + AdamW step. Gradients are zeroed in place (not
  freed), so the recorded peak memory growth is what the step adds beyond weights, gradients and the AdamW
  state: activations and the logits.
- decode-b1 / decode-b16: greedy generate, NEW tokens after a PROMPT-token prompt (prefill included), with
  the KV cache; tokens/s in extra_info. The LLaMA model above, and a GPT-2 of the same size (4 layers, d 512,
  8 heads, MLP 2048, vocab 32000: Conv1D projections, whose [in, out] weights ops.linear reads transposed).
"""

from __future__ import annotations

import copy

import pytest
import torch

from .common import DEVICE, check_close, measure, random_ids, record_tokens_per_s

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("ptm_kernels.hf")

ROUNDS = 3 if DEVICE.type == "cpu" else None
TRAIN_B, TRAIN_L = 4, 256
PROMPT, NEW = 64, 32
VOCAB = 32000


def _build(kind: str):
    if kind == "gpt2":  # Conv1D projections ([in, out] weights), GELU MLP 4 x d, tied LM head
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=512, n_layer=4, n_head=8, n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
        pad_token_id=None))


def _model(impl: str, kind: str = "llama"):
    """The model for impl, and the unpatched twin it is validated against (same weights)."""
    torch.manual_seed(0)
    reference = _build(kind)
    reference.set_attn_implementation("sdpa")
    with torch.no_grad():  # norm weights start at 1: move them so that a wrong weight mapping would show
        for n, p in reference.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    reference = reference.to(DEVICE)
    model = hf.apply(copy.deepcopy(reference)) if impl == "ptm" else reference
    return model, reference


def _validate(model, reference, ids, name):
    if model is reference:
        return
    with torch.no_grad():  # a fast wrong model is not a result
        check_close(model(ids).logits, reference(ids).logits, f"{name} logits", rtol=1e-3, atol=1e-3)
        check_close(model(ids, labels=ids).loss, reference(ids, labels=ids).loss, f"{name} loss", rtol=1e-4,
                    atol=1e-4)


@pytest.mark.parametrize("impl", ["ptm", "sdpa"])
def test_hf_llama_train_step(benchmark, impl):
    model, reference = _model(impl)
    ids = random_ids(TRAIN_B, TRAIN_L, 0, VOCAB)
    _validate(model, reference, ids[:, :64], "hf-llama train")
    del reference
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: the peak is activations + logits
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()  # allocate the gradients and the AdamW state before the peak window opens
    measure(benchmark, step, group="hf-llama-train", case=f"llama-4l-d512-v32k {TRAIN_B}x{TRAIN_L}", impl=impl,
            passes="train-step", rounds=ROUNDS, peak_memory=True)


@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("impl", ["ptm", "sdpa"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_decode(benchmark, kind, impl, B):
    model, reference = _model(impl, kind)
    prompt = random_ids(B, PROMPT, 0, VOCAB, seed=1)
    _validate(model, reference, prompt, f"hf-{kind} decode")
    model.eval()
    mask = torch.ones_like(prompt)

    def gen():
        return model.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0, eos_token_id=None)

    assert gen().shape == (B, PROMPT + NEW)
    del reference
    measure(benchmark, gen, group=f"hf-{kind}-decode", case=f"{kind}-4l-d512-v32k prompt{PROMPT}+{NEW}", impl=impl,
            passes=f"decode-b{B}", rounds=ROUNDS)
    record_tokens_per_s(benchmark, B * NEW)
