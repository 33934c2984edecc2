"""T5 (v1.0, v1.1), BART and Pegasus against transformers, on the same random weights (float32, CPU).

Each case builds a tiny transformers model from a config in code, converts it with `from_hf`, and checks on a
padded batch: encoder states and decoder logits, the loss and every parameter's gradient in train mode
(dropout 0), the `to_hf` round trip, cached = uncached decoding (the static decode step too), and greedy and
beam-search generation token for token against transformers' `generate`.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402
from .parity import check_grads_match, check_roundtrip  # noqa: E402

V, LS, LT, NEW = 100, 12, 9, 12  # vocab, source length, target length, new tokens
TOL = 1e-4


@dataclass
class Case:
    name: str
    make_hf: Callable
    ours: Callable  # our class (has from_hf)
    pad: int
    gen_scale: float = 3.0  # weight scale for the generation tests (see gen_pair)


def _t5(proj, tie):
    c = transformers.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                              feed_forward_proj=proj, tie_word_embeddings=tie, dropout_rate=0.0,
                              relative_attention_num_buckets=8, relative_attention_max_distance=16,
                              decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(c)


_BART_KW = dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, dropout=0.0,
                max_position_embeddings=64, forced_eos_token_id=None)


def _bart():
    return transformers.BartForConditionalGeneration(transformers.BartConfig(**_BART_KW))


def _pegasus():
    return transformers.PegasusForConditionalGeneration(transformers.PegasusConfig(**_BART_KW, scale_embedding=True))


CASES = [
    Case("t5_v1_0", lambda: _t5("relu", True), lambda: model_module("t5").T5, 0),
    Case("t5_v1_1", lambda: _t5("gated-gelu", False), lambda: model_module("t5").T5, 0),
    Case("bart", _bart, lambda: model_module("bart").Bart, 1),
    Case("pegasus", _pegasus, lambda: model_module("pegasus").Pegasus, 0, gen_scale=8.0),
]


def _build(case, scale):
    """(transformers model, ours, case) on the same weights."""
    torch.manual_seed(0)
    hf = case.make_hf()
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # norms start at 1 / 0: perturb them so that each mapping is tested
                p.add_(0.1 * torch.randn_like(p))
            elif p.requires_grad and ("layers" in name or "block" in name or "positions" in name):
                p.mul_(scale)
        if hasattr(hf, "final_logits_bias") and scale == 1.0:  # (it would pick one token at every step)
            hf.final_logits_bias.normal_()
    return hf, case.ours().from_hf(hf), case


@pytest.fixture(params=CASES, ids=[c.name for c in CASES], scope="module")
def pair(request):
    return _build(request.param, 1.0)


@pytest.fixture(params=CASES, ids=[c.name for c in CASES], scope="module")
def gen_pair(request):
    """On the initial weights every model repeats one token forever: larger sub-layers (and positions,
    relative biases) make greedy and beam decoding move, and so test something."""
    return _build(request.param, request.param.gen_scale)


def _batch(pad):
    """Sources of lengths 12, 8, 4 and targets of lengths 9, 9, 6 (right padding; labels -100 at padding)."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, V, (3, LS), generator=g)
    mask = (torch.arange(LS) < torch.tensor([LS, 8, 4])[:, None]).long()
    src = src.masked_fill(mask == 0, pad)
    labels = torch.randint(3, V, (3, LT), generator=g)
    labels[2, 6:] = -100
    return src, mask, labels


def test_logits(pair):
    hf, ours, case = pair
    hf.eval(), ours.eval()
    src, mask, labels = _batch(case.pad)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, labels=labels)
        got = ours(src, mask, labels=labels)
    real = mask.bool()
    enc = (got.encoder_last_hidden_state - want.encoder_last_hidden_state)[real].abs().max().item()
    logits = (got.logits - want.logits)[labels != -100].abs().max().item()
    assert enc <= TOL and logits <= TOL, (enc, logits)
    assert abs(got.loss.item() - want.loss.item()) <= TOL


def test_gradients(pair):
    hf, ours, case = pair
    hf.train(), ours.train()
    hf.zero_grad(), ours.zero_grad()
    src, mask, labels = _batch(case.pad)
    want = hf(input_ids=src, attention_mask=mask, labels=labels).loss
    got = ours(src, mask, labels=labels).loss
    assert abs(got.item() - want.item()) <= TOL
    want.backward()
    got.backward()
    check_grads_match(ours, hf, case.name)
    hf.zero_grad(), ours.zero_grad()


def test_to_hf_round_trip(pair):
    hf, ours, _ = pair
    check_roundtrip(ours, hf)


def test_cached_decoding_equals_recompute(gen_pair):
    _, ours, case = gen_pair
    ours.eval()
    src, mask, _ = _batch(case.pad)
    cached = ours.generate(src, NEW, attention_mask=mask, eos_token_id=None)
    full = ours.generate(src, NEW, attention_mask=mask, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, full)
    with torch.no_grad():  # one cached step's logits equal the whole sequence's
        enc = ours.encode(src, mask)
        whole = ours.project(ours.decode(cached, enc, mask))
        cache = ours.new_cache(enc, mask, cached.shape[1])
        first = ours.project(ours.decode(cached[:, :-1], cache=cache))
        last = ours.project(ours.decode(cached[:, -1:], cache=cache))
    assert (torch.cat([first, last], 1) - whole).abs().max().item() <= TOL


def test_decode_step_equals_whole_sequence(gen_pair):
    """The static decode step (cache column a tensor index, additive masks; T5's relative bias gathered from its
    Toeplitz table) gives the whole sequence's logits at every position; spare cache columns stay hidden."""
    _, ours, case = gen_pair
    ours.eval()
    src, mask, labels = _batch(case.pad)
    tgt = labels.clamp(min=3)
    with torch.no_grad():
        enc = ours.encode(src, mask)
        whole = ours.project(ours.decode(tgt, enc, mask))
        cache = ours.new_cache(enc, mask, LT + 3)
        steps = []
        for t in range(LT):
            cache.self_attn.index = torch.tensor([t])
            steps.append(ours.decode_step(tgt[:, t:t + 1], cache))
    assert (torch.stack(steps, 1) - whole).abs().max().item() <= TOL


def _trim(row, eos):
    """A generated row up to its first eos (inclusive): transformers fills after it with pad or eos."""
    hits = (row == eos).nonzero()
    return row[: int(hits[0]) + 1] if len(hits) else row


def _eos_for(hf, src, mask, start, pad):
    """An eos that greedy decoding reaches mid-way on these weights, so that beams finish at different steps."""
    out = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      decoder_start_token_id=start, pad_token_id=pad, eos_token_id=None)
    counts = torch.bincount(out[:, 2:NEW // 2].flatten(), minlength=V)
    counts[start] = counts[pad] = 0
    return int(counts.argmax())


def test_greedy_matches_transformers(gen_pair):
    hf, ours, case = gen_pair
    hf.eval(), ours.eval()
    src, mask, _ = _batch(case.pad)
    start = ours.config.decoder_start_token_id
    want = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       decoder_start_token_id=start, pad_token_id=case.pad, eos_token_id=None)
    got = ours.generate(src, NEW, attention_mask=mask, eos_token_id=None)
    assert torch.equal(got, want)
    assert len(set(got[:, 1:].flatten().tolist())) > 3, "degenerate decoding tests little"
    # with an eos that occurs: rows stop, then pad
    eos = _eos_for(hf, src, mask, start, case.pad)
    want = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, do_sample=False, decoder_start_token_id=start,
                       pad_token_id=case.pad, eos_token_id=eos)
    got = ours.generate(src, NEW, attention_mask=mask, eos_token_id=eos)
    assert got.shape == want.shape and all(torch.equal(_trim(a, eos), _trim(b, eos)) for a, b in zip(got, want))


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (2.0, True), (0.5, "never")])
def test_beam_search_matches_transformers(gen_pair, length_penalty, early_stopping):
    hf, ours, case = gen_pair
    hf.eval(), ours.eval()
    src, mask, _ = _batch(case.pad)
    start = ours.config.decoder_start_token_id
    eos = _eos_for(hf, src, mask, start, case.pad)
    kw = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    want = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, do_sample=False, decoder_start_token_id=start,
                       pad_token_id=case.pad, eos_token_id=eos, **kw)
    got = ours.generate(src, NEW, attention_mask=mask, eos_token_id=eos, **kw)
    assert got.shape == want.shape
    for a, b in zip(got, want):
        assert torch.equal(_trim(a, eos), _trim(b, eos)), (a, b)
    uncached = ours.generate(src, NEW, attention_mask=mask, eos_token_id=eos, use_cache=False, **kw)
    assert torch.equal(uncached, got)
