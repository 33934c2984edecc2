"""models.generation against transformers' `generate`, for decoder-only and encoder-decoder models alike.

Same random weights (models built from configs in code, converted with from_hf), same settings: greedy and beam
search token-identical (GPT-2, LLaMA, GPT-Neo, T5, BART, Pegasus) on left-padded batches, with the logit
processors (repetition penalty, no-repeat n-grams, min_new_tokens, eos lists, forced bos/eos); sampling
reproducible with a torch.Generator and equal to transformers' draws from the same global seed; the static
decode step captured by torch.compile without graph breaks.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402
from .test_decoders import P, V, _batch, _gpt2, _gpt_neo, _llama  # noqa: E402
from .test_seq2seq import CASES as SEQ2SEQ_CASES  # noqa: E402
from .test_seq2seq import _batch as _source_batch  # noqa: E402
from .test_seq2seq import _build  # noqa: E402

NEW = 16

DECODERS = {"gpt2": (_gpt2, "gpt2", "GPT2"), "llama": (_llama, "llama", "Llama"),
            "gpt_neo": (_gpt_neo, "gpt3", "GPT3")}
SEQ2SEQ = [c for c in SEQ2SEQ_CASES if c.name in ("t5_v1_0", "bart", "pegasus")]


def _perturb_norms(hf):
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))


@pytest.fixture(params=list(DECODERS), scope="module")
def decoder(request):
    make, module, cls = DECODERS[request.param]
    torch.manual_seed(0)
    hf = make()
    hf.config._attn_implementation = "eager"
    _perturb_norms(hf)
    hf.eval()
    return hf, getattr(model_module(module), cls).from_hf(hf).eval()


@pytest.fixture(params=SEQ2SEQ, ids=[c.name for c in SEQ2SEQ], scope="module")
def seq2seq(request):
    """Weights scaled so that decoding moves (see test_seq2seq.gen_pair)."""
    hf, ours, case = _build(request.param, request.param.gen_scale)
    return hf.eval(), ours.eval(), case.pad


def _frequent_token(tokens, exclude=()):
    """A token that greedy decoding emits often, in the first half: an eos that rows reach at different steps."""
    counts = torch.bincount(tokens.flatten(), minlength=V)
    counts[list(exclude)] = 0
    return int(counts.argmax())


def _same(got, want, start=0):
    """Token for token, the filling after an eos included."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got[:, start:], want[:, start:]), (got, want)


# ------------------------------------------------------------------------------------------- decoder-only


def _decoder_eos(hf, ids, mask):
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      pad_token_id=0)
    return _frequent_token(out[:, P + 1:P + NEW // 2], exclude=(0,))


@pytest.mark.parametrize("kw", [dict(length_penalty=1.0, early_stopping=False),
                                dict(length_penalty=2.0, early_stopping=True, num_return_sequences=2),
                                dict(length_penalty=0.5, early_stopping="never")], ids=["lp1", "lp2_n2", "never"])
def test_decoder_beam_search_matches_transformers(decoder, kw):
    hf, ours = decoder
    ids, mask, _ = _batch(left=True)
    eos = _decoder_eos(hf, ids, mask)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=3, pad_token_id=0,
                       eos_token_id=eos, **kw)
    got = ours.generate(ids, NEW, attention_mask=mask, num_beams=3, eos_token_id=eos, pad_token_id=0, **kw)
    _same(got, want, start=P)
    assert torch.equal(ours.generate(ids, NEW, attention_mask=mask, num_beams=3, eos_token_id=eos, pad_token_id=0,
                                     use_cache=False, **kw), got)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_decoder_processors_match_transformers(decoder, num_beams):
    """repetition penalty, no-repeat 3-grams, min_new_tokens, two eos ids and a forced eos, left padding."""
    hf, ours = decoder
    ids, mask, _ = _batch(left=True)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      pad_token_id=0)
    first = _frequent_token(out[:, P + 1:P + NEW // 2], exclude=(0,))
    second = _frequent_token(out[:, P + 1:P + NEW // 2], exclude=(0, first))
    eos = [first, second]
    kw = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=3, eos_token_id=eos,
              forced_eos_token_id=first, num_beams=num_beams)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
    got = ours.generate(ids, NEW, attention_mask=mask, pad_token_id=0, **kw)
    _same(got, want, start=P)


def test_decoder_unpadded_batch_matches_transformers(decoder):
    """No row padded: the eager decode step attends over the filled cache with no mask at all (a window only
    where the model has one), the compiled step over the whole cache with its biases; both give transformers'
    tokens."""
    hf, ours = decoder
    ids, _, _ = _batch(left=True)
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                       do_sample=False, pad_token_id=0)
    _same(ours.generate(ids, NEW), want)
    torch._dynamo.reset()
    _same(ours.generate(ids, NEW, compile=True), want)


def test_decoder_sampling_reproducible_and_equal_to_transformers(decoder):
    hf, ours = decoder
    ids, mask, _ = _batch(left=True)
    kw = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, min_p=0.05)
    a = ours.generate(ids, NEW, attention_mask=mask, generator=torch.Generator().manual_seed(3), **kw)
    b = ours.generate(ids, NEW, attention_mask=mask, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    # transformers draws with torch's default generator: the same seed, the same draws
    torch.manual_seed(5)
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, **kw)
    torch.manual_seed(5)
    got = ours.generate(ids, NEW, attention_mask=mask, **kw)
    assert torch.equal(got[:, P:], want[:, P:])
    # top_k=1 and min_p=1 leave one token: sampling is greedy
    greedy = ours.generate(ids, NEW, attention_mask=mask)
    for one in (dict(top_k=1), dict(min_p=1.0)):
        assert torch.equal(ours.generate(ids, NEW, attention_mask=mask, do_sample=True, **one), greedy)


def test_stopping_criteria(decoder):
    """A criterion ends a row like an eos does; generation stops once every row has ended."""
    hf, ours = decoder
    ids, mask, _ = _batch(left=True)
    stop = _decoder_eos(hf, ids, mask)
    with_eos = ours.generate(ids, NEW, attention_mask=mask, eos_token_id=stop)
    with_criterion = ours.generate(ids, NEW, attention_mask=mask,
                                   stopping_criteria=[lambda tokens, scores: tokens[:, -1] == stop])
    assert with_criterion.shape == with_eos.shape
    for a, b in zip(with_criterion[:, P:], with_eos[:, P:]):  # equal up to the stop (then eos-only padding)
        n = int((b == stop).nonzero()[0]) + 1 if bool((b == stop).any()) else len(b)
        assert torch.equal(a[:n], b[:n])
    assert with_eos.shape[1] < P + NEW or not bool((with_eos[:, P:] == stop).any(1).all())


def test_decode_step_has_no_graph_breaks(decoder):
    """The static decode step traces as one graph (torch._dynamo.explain counts the breaks)."""
    _, ours = decoder
    ids, mask, _ = _batch(left=True)
    cache = ours.new_cache(3, P + 4)
    with torch.no_grad():
        ours(ids, attention_mask=mask.bool(), cache=cache, num_logits_to_keep=1)
        cache.index = torch.tensor([P])
        key_mask = torch.ones(3, P + 4, dtype=torch.bool)
        key_mask[:, :P] = mask.bool()
        token, position = ids[:, -1:].clone(), mask.sum(1, keepdim=True)
        explain = torch._dynamo.explain(ours.decode_step)(token, position, cache, key_mask)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.slow
def test_compiled_generate_equals_eager():
    torch.manual_seed(0)
    hf = _llama()
    ours = model_module("llama").Llama.from_hf(hf).eval()
    ids, mask, _ = _batch(left=True)
    eager = ours.generate(ids, 8, attention_mask=mask)
    torch._dynamo.reset()
    compiled = ours.generate(ids, 8, attention_mask=mask, compile=True)
    assert torch.equal(compiled, eager)


# -------------------------------------------------------------------------------------------- seq2seq


def test_seq2seq_processors_match_transformers(seq2seq):
    """Greedy and beam search with the processors, a forced bos, num_return_sequences, on a padded batch."""
    hf, ours, pad = seq2seq
    src, mask, _ = _source_batch(pad)
    start = ours.config.decoder_start_token_id
    base = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       decoder_start_token_id=start, pad_token_id=pad, eos_token_id=None)
    eos = _frequent_token(base[:, 2:NEW // 2], exclude=(start, pad))
    for kw in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2, length_penalty=1.5)):
        kw.update(repetition_penalty=1.2, no_repeat_ngram_size=2, min_new_tokens=2, eos_token_id=eos,
                  forced_bos_token_id=eos + 1, forced_eos_token_id=eos)
        want = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                           decoder_start_token_id=start, pad_token_id=pad, **kw)
        got = ours.generate(src, NEW, attention_mask=mask, **kw)
        _same(got, want)
        assert bool((got[:, 1] == eos + 1).all())  # the forced bos


def test_seq2seq_sampling(seq2seq):
    hf, ours, pad = seq2seq
    src, mask, _ = _source_batch(pad)
    kw = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.95, eos_token_id=None)
    a = ours.generate(src, NEW, attention_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
    b = ours.generate(src, NEW, attention_mask=mask, generator=torch.Generator().manual_seed(1), **kw)
    c = ours.generate(src, NEW, attention_mask=mask, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    want = hf.generate(src, attention_mask=mask, max_new_tokens=NEW, decoder_start_token_id=ours.config.
                       decoder_start_token_id, pad_token_id=pad, **kw)
    torch.manual_seed(7)
    assert torch.equal(ours.generate(src, NEW, attention_mask=mask, **kw), want)
    # num_return_sequences draws several continuations per source
    many = ours.generate(src, NEW, attention_mask=mask, num_return_sequences=2,
                         generator=torch.Generator().manual_seed(1), **kw)
    assert many.shape[0] == 2 * src.shape[0]


def test_seq2seq_decode_step_has_no_graph_breaks(seq2seq):
    """EncoderDecoderLM.decode_step traces as one graph, as the decoder-only step does."""
    _, ours, pad = seq2seq
    src, mask, _ = _source_batch(pad)
    with torch.no_grad():
        cache = ours.new_cache(ours.encode(src, mask), mask, 6)
        cache.self_attn.index = torch.tensor([2])
        token = torch.full((src.shape[0], 1), 5)
        explain = torch._dynamo.explain(ours.decode_step)(token, cache)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


@pytest.mark.slow
def test_seq2seq_compiled_generate_equals_eager(seq2seq):
    _, ours, pad = seq2seq
    src, mask, _ = _source_batch(pad)
    eager = ours.generate(src, 8, attention_mask=mask, num_beams=2)
    torch._dynamo.reset()
    assert torch.equal(ours.generate(src, 8, attention_mask=mask, num_beams=2, compile=True), eager)


def test_bad_arguments_are_refused(seq2seq):
    _, ours, pad = seq2seq
    src, mask, _ = _source_batch(pad)
    with pytest.raises(TypeError, match="num_beam"):
        ours.generate(src, 4, num_beam=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(src, 4, num_beams=2, num_return_sequences=3)
    with pytest.raises(NotImplementedError, match="beam sampling"):
        ours.generate(src, 4, num_beams=2, do_sample=True)
