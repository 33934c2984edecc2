"""GPT, GPT-2, GPT-3 (GPT-Neo), LLaMA, Mistral and Qwen2 against transformers, on the same random weights
(float32, CPU).

Each case builds a tiny transformers model from a config in code, converts it with `from_hf`, and checks:
logits on padded batches, every parameter's gradient in train mode (dropout 0), the `to_hf` round trip,
greedy generation token for token against transformers' `generate`, and cached = uncached decoding.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402
from .parity import check_grads_match, check_roundtrip  # noqa: E402
from ptm_kernels.nn import Linear  # noqa: E402

V, P, NEW = 100, 10, 32  # vocab, prompt length, new tokens
TOL = 1e-4


@dataclass
class Case:
    name: str
    make_hf: Callable
    ours: Callable  # our class (has from_hf)


def _gpt():
    c = transformers.OpenAIGPTConfig(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1)
    model = transformers.OpenAIGPTLMHeadModel(c)
    # post-norm + tied head on random weights repeats the input token forever; larger positions and
    # sub-layers make greedy decoding move (and so test something)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "positions_embed" in name or (name.endswith("weight") and (".attn." in name or ".mlp." in name)):
                p.mul_(5.0)
    return model


def _gpt2():
    c = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3, bos_token_id=None,
                                eos_token_id=None)
    return transformers.GPT2LMHeadModel(c)


def _gpt_neo():  # a window of 4 so that the local layer matters within 10 + 32 tokens
    c = transformers.GPTNeoConfig(vocab_size=V, max_position_embeddings=64, hidden_size=64, num_layers=2,
                                  num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4,
                                  resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                                  initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    return transformers.GPTNeoForCausalLM(c)


def _llama():  # grouped-query attention: 4 query heads, 2 key/value heads
    c = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return transformers.LlamaForCausalLM(c)


def _mistral():  # a sliding window of 5 keys in every layer: it matters within 10 + 32 tokens
    c = transformers.MistralConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   sliding_window=5, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                                   pad_token_id=None)
    return transformers.MistralForCausalLM(c)


def _qwen2():  # q/k/v biases; the second layer slides (a window of 5), the first attends to all
    c = transformers.Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 use_sliding_window=True, sliding_window=5, max_window_layers=1,
                                 initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.Qwen2ForCausalLM(c)
    with torch.no_grad():  # transformers initialises biases to 0: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return model


CASES = [
    Case("gpt", _gpt, lambda: model_module("gpt").GPT),
    Case("gpt2", _gpt2, lambda: model_module("gpt2").GPT2),
    Case("gpt3_neo", _gpt_neo, lambda: model_module("gpt3").GPT3),
    Case("llama", _llama, lambda: model_module("llama").Llama),
    Case("mistral", _mistral, lambda: model_module("llama").Llama),
    Case("qwen2", _qwen2, lambda: model_module("llama").Llama),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES], scope="module")
def pair(request):
    """(transformers model, ours) on the same weights."""
    torch.manual_seed(0)
    hf = request.param.make_hf()
    hf.config._attn_implementation = "eager"
    # LayerNorm / RMSNorm weights start at 1 and biases at 0: perturb them so the mapping of each is tested
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf, request.param.ours().from_hf(hf)


def _batch(left: bool):
    """Three prompts of lengths 10, 6, 3, padded on the left or the right; per-row positions."""
    torch.manual_seed(1)
    ids = torch.randint(1, V, (3, P))
    mask = torch.zeros(3, P, dtype=torch.long)
    for row, n in enumerate((P, 6, 3)):
        if left:
            mask[row, P - n:] = 1
        else:
            mask[row, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _max_diff(a, b, mask):
    return (a - b)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_logits(pair, left):
    hf, ours = pair
    hf.eval(), ours.eval()
    ids, mask, pos = _batch(left)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    assert _max_diff(got, want, mask) <= TOL


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_gradients(pair, left):
    hf, ours = pair
    hf.train(), ours.train()
    hf.zero_grad(), ours.zero_grad()
    ids, mask, pos = _batch(left)
    labels = ids.masked_fill(mask == 0, -100)  # padding takes no part in the loss
    if left:  # nor does the first token, which transformers would predict from the padding before it
        labels[torch.arange(3), (mask == 0).sum(-1)] = -100
    want = hf(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    got = ours(ids, attention_mask=mask, position_ids=pos, labels=labels).loss
    assert abs(got.item() - want.item()) <= TOL
    want.backward()
    got.backward()
    check_grads_match(ours, hf, f"{type(ours).__name__}[{'left' if left else 'right'}_pad]")
    hf.zero_grad(), ours.zero_grad()


def test_to_hf_round_trip(pair):
    hf, ours = pair
    check_roundtrip(ours, hf)


def test_projections_run_through_ops_linear(pair):
    """Every projection and the LM head are ptm_kernels.nn.Linear (ops.linear: the decode step's GEMV) with
    transformers' [out, in] layout and values; a tied embedding is the head's Parameter."""
    hf, ours = pair
    w = ours.lm_head.weight
    assert isinstance(ours.lm_head, Linear) and w.is_contiguous()
    assert torch.equal(ours.state_dict()["lm_head.weight"], hf.lm_head.weight)
    if hf.config.tie_word_embeddings:
        assert ours.wte.weight is w
    linears = [m for m in ours.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) and m.weight.is_contiguous() for m in linears)


def test_generate_matches_transformers(pair):
    hf, ours = pair
    hf.eval(), ours.eval()
    ids, mask, _ = _batch(left=True)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       pad_token_id=0)
    got = ours.generate(ids, NEW, attention_mask=mask)
    assert torch.equal(got[:, P:], want[:, P:])


def test_cached_decoding_equals_recompute(pair):
    hf, ours = pair
    ours.eval()
    ids, mask, _ = _batch(left=False)  # right padding: generate moves it to the left
    cached = ours.generate(ids, NEW, attention_mask=mask)
    full = ours.generate(ids, NEW, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, full)
    # and the logits of one cached step equal those of the whole sequence
    seq, m = cached, torch.ones_like(cached)
    m[:, :P] = mask.int().sort(dim=1, stable=True).values
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        whole = ours(seq, attention_mask=m, position_ids=pos).logits
        cache = ours.new_cache(3, seq.shape[1])
        first = ours(seq[:, :-1], attention_mask=m[:, :-1], position_ids=pos[:, :-1], cache=cache).logits
        last = ours(seq[:, -1:], attention_mask=m, position_ids=pos[:, -1:], cache=cache).logits
    real = m.bool()
    assert _max_diff(torch.cat([first, last], 1), whole, real) <= 1e-5


def test_sampling_is_reproducible(pair):
    _, ours = pair
    ours.eval()
    ids, mask, _ = _batch(left=True)
    kw = dict(attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = ours.generate(ids, 8, generator=torch.Generator().manual_seed(0), **kw)
    b = ours.generate(ids, 8, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and a.shape == (3, P + 8)


def test_train_step_with_dropout(pair):
    """Dropout inside the fused attention and on the residual branches: a finite loss and gradients."""
    _, ours = pair
    for m in ours.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.1
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    try:
        ours.train()
        ids, mask, pos = _batch(left=False)
        loss = ours(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in ours.parameters())
    finally:
        for m in ours.modules():
            if hasattr(m, "dropout") and isinstance(m.dropout, float):
                m.dropout = 0.0
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ours.zero_grad()


def test_loss_ignores_padding(pair):
    """Padding changes nothing: the loss of a padded batch is the token-weighted mean of the rows alone, and
    a prediction made at a left pad (of the row's first token) is ignored without a -100 label."""
    _, ours = pair
    ours.eval()
    ids, mask, pos = _batch(left=True)
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask, position_ids=pos, labels=ids.masked_fill(mask == 0, -100)).loss
        total, count = 0.0, 0
        for row in range(3):
            real = ids[row][mask[row].bool()][None]
            total += ours(real, labels=real).loss * (real.shape[1] - 1)
            count += real.shape[1] - 1
    assert abs(padded.item() - total.item() / count) <= 1e-5
