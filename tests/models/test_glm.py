"""GLM against the paper's transcription (tests/models/glm_reference.py); its prefix-LM mask against the
dense mask of Figure 2(d); the blank-infilling corruption."""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask

from ._import import model_module
from .glm_reference import dense_glm_mask, glm_forward

glm = model_module("glm")
MASK, SOP, EOP, V = 97, 98, 99, 100
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = glm.GLMConfig(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, max_sequence_length=64,
                        hidden_dropout=0.0, attention_dropout=0.0)
    m = glm.GLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases; sub-layers strong enough that decoding moves
        for name, p in m.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.startswith("blocks") or name.startswith("wpe") or name.startswith("wbpe"):
                p.mul_(10.0)
            elif name == "wte.weight":
                p.mul_(0.1)
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = [torch.randint(1, 90, (n,), generator=g) for n in (40, 27, 33)]
    return glm.collate([glm.blank_infilling(t, MASK, SOP, EOP, generator=g) for t in texts])


def test_matches_transcription(model):
    model.eval()
    b = _batch()
    real = b["labels"] != -100
    real |= torch.arange(b["input_ids"].shape[1]) < b["prefix_lengths"][:, None]
    with torch.no_grad():
        got = model(b["input_ids"], b["position_ids"], b["prefix_lengths"]).logits
        want = glm_forward(model.state_dict(), model.config, b["input_ids"], b["position_ids"], b["prefix_lengths"])
    assert (got - want)[real].abs().max().item() <= TOL


def test_gradients_match_transcription(model):
    model.train()
    model.zero_grad()
    b = _batch(1)
    loss = model(b["input_ids"], b["position_ids"], b["prefix_lengths"], labels=b["labels"]).loss
    loss.backward()
    params = dict(model.named_parameters())
    ref = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    logits = glm_forward(ref, model.config, b["input_ids"], b["position_ids"], b["prefix_lengths"])
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= TOL
    for k, p in params.items():
        assert (p.grad - ref[k].grad).abs().max().item() <= TOL, k
    model.zero_grad()


def test_prefix_lm_mask_equals_dense_mask():
    torch.manual_seed(0)
    B, H, L, D = 3, 2, 37, 16
    prefix = torch.tensor([20, 5, 37])
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    dense = dense_glm_mask(prefix, L)[:, None]
    ours = pk.attention(q, k, v, AttentionMask.prefix_lm(prefix))
    with_dense = pk.attention(q, k, v, AttentionMask.dense(dense))
    plain = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~dense, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(ours, with_dense, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    # entry by entry: Figure 2(d) is exactly the prefix-LM rule "j < |A| or j <= i"
    i, j, a = torch.arange(L)[:, None], torch.arange(L)[None], prefix.view(B, 1, 1)
    assert torch.equal(dense[:, 0], (j < a) | (j <= i))


def test_blank_infilling_corruption():
    g = torch.Generator().manual_seed(0)
    covered, n_spans, total = 0, 0, 0
    for _ in range(200):
        n = int(torch.randint(20, 200, (1,), generator=g))
        text = torch.randint(1, 90, (n,), generator=g).tolist()
        spans = glm.sample_spans(n, generator=g)
        ex = glm.blank_infilling(text, MASK, SOP, EOP, generator=g, spans=spans)
        ids, pos, labels, a = ex["input_ids"], ex["position_ids"], ex["labels"], ex["prefix_length"]
        # spans: sorted, disjoint, within the text, covering ~15%
        assert all(s < e for s, e in spans) and all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:]))
        assert spans[0][0] >= 0 and spans[-1][1] <= n
        covered += sum(e - s for s, e in spans)
        total += n
        n_spans += len(spans)
        # part A: the text with one [MASK] per span; positions 0..|A|-1, block positions 0
        assert a == n - sum(e - s for s, e in spans) + len(spans)
        assert (ids[:a] == MASK).sum() == len(spans)
        assert torch.equal(pos[0, :a], torch.arange(a)) and (pos[1, :a] == 0).all() and (labels[:a] == -100).all()
        # part B: each span opens with [S]; targets are the span then [E]; 2D positions point at its [MASK]
        starts = (ids[a:] == SOP).nonzero().flatten().tolist() + [len(ids) - a]
        assert starts[0] == 0 and len(starts) - 1 == len(spans)
        filled = {}
        for s, e in zip(starts, starts[1:]):
            seg = slice(a + s, a + e)
            assert ids[a + s] == SOP and labels[a + e - 1] == EOP
            assert torch.equal(labels[a + s:a + e - 1], ids[a + s + 1:a + e])
            p = pos[0, seg]
            assert (p == p[0]).all() and ids[p[0]] == MASK
            assert torch.equal(pos[1, seg], torch.arange(1, e - s + 1))
            filled[int(p[0])] = labels[a + s:a + e - 1].tolist()
        # filling every blank gives back the text
        rebuilt = []
        for t, tok in enumerate(ids[:a].tolist()):
            rebuilt += filled[t] if t in filled else [tok]
        assert rebuilt == text
    assert abs(covered / total - 0.15) < 0.01
    assert 2.5 < covered / n_spans < 3.5  # Poisson(3) lengths (a little less: the last span is cut at 15%)


def test_fill_blank_matches_transcription(model):
    """Cached decoding of part B (prompts of different lengths, left padded) = greedy decoding by the
    transcription recomputing everything, row by row."""
    model.eval()
    g = torch.Generator().manual_seed(3)
    texts = [torch.randint(1, 90, (n,), generator=g) for n in (12, 7)]
    blanks = [5, 2]
    for t, p in zip(texts, blanks):
        t[p] = MASK
    P, new = 12, 10
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, t in enumerate(texts):
        ids[b, P - len(t):], mask[b, P - len(t):] = t, 1
    got = model.fill_blank(ids, torch.tensor(blanks), new, SOP, attention_mask=mask)
    assert len(set(got.flatten().tolist())) > 5  # greedy decoding that moves tests something
    assert torch.equal(got, model.fill_blank(ids, torch.tensor(blanks), new, SOP, attention_mask=mask,
                                             use_cache=False))
    sd = model.state_dict()
    for b, (t, p) in enumerate(zip(texts, blanks)):
        seq, a = t.tolist() + [SOP], len(t)
        for _ in range(new):
            n = len(seq)
            pos = torch.tensor([list(range(a)) + [p] * (n - a), [0] * a + list(range(1, n - a + 1))])
            with torch.no_grad():
                logits = glm_forward(sd, model.config, torch.tensor([seq]), pos[None], torch.tensor([a]))
            seq.append(int(logits[0, -1].argmax()))
        assert got[b].tolist() == seq[a + 1:]
