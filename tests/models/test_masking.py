"""Statistical tests of the pre-training corruption functions: rates, span lengths, special tokens."""

import torch

from ._import import model_module

masking = model_module("masking")

V, MASK, CLS, SEP, PAD = 1000, 3, 1, 2, 0
SPECIAL = (PAD, CLS, SEP, MASK)


def _batch(B=64, L=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, V, (B, L), generator=g)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    real = torch.arange(L) < lengths[:, None]
    ids = ids.masked_fill(~real, PAD)
    ids[:, 0] = CLS
    ids[torch.arange(B), lengths - 1] = SEP
    return ids


def _word_ids(ids, seed=0):
    """Words of 1 to 3 tokens over the non-special tokens; -1 on special tokens."""
    g = torch.Generator().manual_seed(seed)
    special = masking.special_tokens_mask(ids, SPECIAL)
    starts = (torch.rand(ids.shape, generator=g) < 0.5) & ~special
    words = starts.long().cumsum(1) - 1
    return torch.where(special, -1, words.clamp(min=0))


def test_mlm_rates_and_80_10_10():
    ids = _batch()
    g = torch.Generator().manual_seed(1)
    corrupted, labels = masking.mlm_corrupt(ids, MASK, V, SPECIAL, generator=g)
    special = masking.special_tokens_mask(ids, SPECIAL)
    sel = labels != masking.IGNORE
    assert not (sel & special).any(), "special tokens must never be masked"
    assert torch.equal(labels[sel], ids[sel])
    assert abs(sel.sum().item() / (~special).sum().item() - 0.15) < 0.01
    n = sel.sum().item()
    masked = (corrupted[sel] == MASK).sum().item() / n
    kept = (corrupted[sel] == ids[sel]).sum().item() / n
    assert abs(masked - 0.8) < 0.02
    assert abs(kept - (0.1 + 0.1 / V)) < 0.02  # unchanged, plus random draws that hit the original
    assert abs(1 - masked - kept - 0.1) < 0.02  # random tokens
    assert torch.equal(corrupted[~sel], ids[~sel])


def test_whole_word_masks_whole_words():
    ids = _batch()
    words = _word_ids(ids)
    sel = masking.whole_word_select(words, 0.15, torch.Generator().manual_seed(2))
    assert not (sel & (words < 0)).any()
    for b in range(4):  # every word all-in or all-out
        for w in words[b].unique().tolist():
            if w >= 0:
                s = sel[b][words[b] == w]
                assert s.all() or not s.any()
    n_words = sum(len(words[b][words[b] >= 0].unique()) for b in range(ids.shape[0]))
    picked = sum(len(words[b][sel[b]].unique()) for b in range(ids.shape[0]))
    assert abs(picked / n_words - 0.15) < 0.015


def test_span_select_rate_and_geometric_lengths():
    ids = _batch(B=16, L=1024)  # long rows: few spans are cut short by the budget
    words = _word_ids(ids)
    sel, spans = masking.span_select(words, seed=3)
    assert not (sel & (words < 0)).any()
    rate = sel.sum().item() / (words >= 0).sum().item()
    assert abs(rate - 0.15) < 0.01
    # span lengths in words: the clipped geometric distribution (mean 3.8); the last span of a row may be cut
    lengths = torch.tensor([len(words[b, s:e].unique()) for b, s, e in spans.tolist()], dtype=torch.float)
    dist = masking.geometric_span_lengths()
    mean = sum((n + 1) * p for n, p in enumerate(dist))
    assert lengths.max() <= 10
    assert abs(lengths.mean().item() - mean) < 0.4, (lengths.mean().item(), mean)
    assert abs((lengths == 1).float().mean().item() - dist[0]) < 0.06
    for b, s, e in spans.tolist():  # spans start and end on word boundaries
        assert s == 0 or words[b, s - 1] != words[b, s]
        assert e == ids.shape[1] or words[b, e] != words[b, e - 1]


def test_span_replacement_is_per_span():
    ids = _batch(B=16)
    words = _word_ids(ids)
    sel, spans = masking.span_select(words, seed=4)
    groups = masking.span_groups(spans, *ids.shape)
    corrupted, labels = masking.mask_tokens(ids, sel, MASK, V, groups=groups,
                                            generator=torch.Generator().manual_seed(5))
    masked_spans = 0
    for b, s, e in spans.tolist():
        m = corrupted[b, s:e] == MASK
        assert m.all() or not m.any()  # one decision per span
        masked_spans += bool(m.all())
    assert abs(masked_spans / len(spans) - 0.8) < 0.08


def test_ngram_select():
    ids = _batch()
    words = _word_ids(ids)
    sel, spans = masking.ngram_select(words, max_n=3, seed=6)
    assert not (sel & (words < 0)).any()
    assert abs(sel.sum().item() / (words >= 0).sum().item() - 0.15) < 0.01
    n = torch.tensor([len(words[b, s:e].unique()) for b, s, e in spans.tolist()])
    assert n.max() <= 3
    freq = torch.bincount(n, minlength=4)[1:].float() / len(n)  # p(n) ~ 1/n: 6/11, 3/11, 2/11
    assert (freq - torch.tensor([6 / 11, 3 / 11, 2 / 11])).abs().max() < 0.08, freq


def test_nsp_and_sop_pairs():
    docs = [[[d * 100 + s] * 3 for s in range(40)] for d in range(100)]  # 3900 pairs: std of the rate 0.008
    pairs = masking.nsp_pairs(docs, seed=7)
    labels = torch.tensor([p[2] for p in pairs], dtype=torch.float)
    assert abs(labels.mean().item() - 0.5) < 0.04
    for a, b, y in pairs:
        same_doc, next_ = a[0] // 100 == b[0] // 100, b[0] == a[0] + 1
        assert (y == 0) == next_ and (y == 1) == (not same_doc)
    sop = masking.sop_pairs(docs, seed=8)
    labels = torch.tensor([p[2] for p in sop], dtype=torch.float)
    assert abs(labels.mean().item() - 0.5) < 0.04
    for a, b, y in sop:
        assert a[0] // 100 == b[0] // 100 and (b[0] - a[0]) == (1 if y == 0 else -1)


def test_electra_replacement():
    g = torch.Generator().manual_seed(9)
    ids = _batch(B=32, L=128)
    sel = masking.mlm_select(ids, masking.special_tokens_mask(ids, SPECIAL), generator=g)
    # a generator sure of the original token never replaces it
    sure = torch.full((*ids.shape, V), -1e4)
    sure.scatter_(-1, ids.unsqueeze(-1), 1e4)
    disc, replaced = masking.electra_replace(sure, ids, sel, generator=g)
    assert torch.equal(disc, ids) and replaced.sum() == 0
    # a generator split between the original and one other token replaces about half, only where selected
    two = torch.full((*ids.shape, V), -1e4)
    two.scatter_(-1, ids.unsqueeze(-1), 0.0)
    two[..., 5] = 0.0
    disc, replaced = masking.electra_replace(two, ids, sel, generator=g)
    assert not replaced[~sel].any() and torch.equal(disc[~sel], ids[~sel])
    assert abs(replaced[sel].float().mean().item() - 0.5) < 0.05
    assert (disc[replaced.bool()] == 5).all()
