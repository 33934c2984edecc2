"""The encoder-decoder pre-training corruptions (models/noising.py): rates, span lengths, sentinel numbering."""

import math

import torch

from ._import import model_module

noising = model_module("noising")
V = 32100  # T5's tokenizer: <extra_id_0> = 32099


def test_t5_span_corruption_rates_and_sentinels():
    g = torch.Generator().manual_seed(0)
    n_noise = n_spans = n_tokens = 0
    for _ in range(300):
        tokens = torch.randint(100, 30000, (200,), generator=g)
        mask = noising.random_spans_noise_mask(200, generator=g)
        n_tokens += 200
        n_noise += int(mask.sum())
        n_spans += int((mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).sum())
        inputs, targets = noising.t5_span_corruption(tokens, V, generator=g)
        assert inputs[-1] == 1 and targets[-1] == 1  # eos
        sent_in = inputs[inputs >= 32000].tolist()
        sent_out = targets[targets >= 32000].tolist()
        assert sent_in == sent_out == [V - 1 - i for i in range(len(sent_in))]  # <extra_id_0> = 32099, down
        # inputs + targets rebuild the sequence
        spans, cur = [], None
        for t in targets[:-1].tolist():
            if t >= 32000:
                cur = []
                spans.append(cur)
            else:
                cur.append(t)
        rebuilt = []
        for t in inputs[:-1].tolist():
            rebuilt += spans[V - 1 - t] if t >= 32000 else [t]
        assert rebuilt == tokens.tolist()
    assert abs(n_noise / n_tokens - 0.15) < 0.005
    assert abs(n_noise / n_spans - 3.0) < 0.1


def test_t5_sentinel_id():
    assert noising.sentinel_id(0, 32100) == 32099 and noising.sentinel_id(99, 32100) == 32000


def test_bart_text_infilling_poisson_spans():
    g = torch.Generator().manual_seed(0)
    lengths, masked, total = [], 0, 0
    for _ in range(400):
        tokens = torch.randint(10, 1000, (100,), generator=g)
        out = noising.bart_text_infilling(tokens, 3, generator=g)
        lengths += [n for _, n in out.spans]
        masked += sum(n for _, n in out.spans)
        total += 100
        assert (out.tokens == 3).sum() == len(out.spans)  # one mask token per span, zero-length ones included
        assert len(out.tokens) == 100 - sum(n for _, n in out.spans) + len(out.spans)
        kept = torch.ones(100, dtype=torch.bool)
        for s, n in out.spans:
            kept[s:s + n] = False
        assert out.tokens[out.tokens != 3].tolist() == tokens[kept].tolist()  # the rest in order
    assert masked / total == 0.3
    lengths = torch.tensor(lengths, dtype=torch.float)
    assert abs(lengths.mean().item() - 3.0) < 0.15  # Poisson(3) (the last span of each sequence is cut)
    zero = (lengths == 0).float().mean().item()
    assert abs(zero - math.exp(-3)) < 0.02  # zero-length spans (insertions) happen, at Poisson's rate


def test_bart_sentence_permutation():
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([10, 11, 2, 20, 2, 30, 31, 32, 2, 40])  # 2 = full stop; the last sentence has none
    orders = set()
    for _ in range(300):
        out = noising.bart_sentence_permutation(tokens, [2], generator=g)
        assert sorted(out.tolist()) == sorted(tokens.tolist())
        text = " ".join(map(str, out.tolist()))
        for s in ("10 11 2", "20 2", "30 31 32 2", "40"):
            assert s in text  # sentences stay whole
        orders.add(text)
    assert len(orders) == 24  # all 4! orders occur


def test_mass_fragment_masking():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    starts = []
    for _ in range(500):
        tokens = torch.randint(10, 1000, (20,), generator=g)
        ex = noising.mass_fragment_mask(tokens, 3, 1000, generator=g)
        k = len(ex.labels)
        assert k == 10 and torch.equal(ex.labels, tokens[ex.start:ex.start + k])
        assert torch.equal(ex.decoder_positions, torch.arange(ex.start, ex.start + k))
        assert ex.decoder_input[0] == 3 and torch.equal(ex.decoder_input[1:], ex.labels[:-1])
        outside = torch.ones(20, dtype=torch.bool)
        outside[ex.start:ex.start + k] = False
        assert torch.equal(ex.encoder_input[outside], tokens[outside])
        frag = ex.encoder_input[ex.start:ex.start + k]
        counts += torch.tensor([(frag == 3).sum(), ((frag != 3) & (frag != ex.labels)).sum(),
                                ((frag == ex.labels)).sum()])
        starts.append(ex.start)
    rates = counts / counts.sum()
    assert abs(rates[0] - 0.8) < 0.02 and abs(rates[1] - 0.1) < 0.015 and abs(rates[2] - 0.1) < 0.015
    assert set(starts) == set(range(11))  # every start position occurs
