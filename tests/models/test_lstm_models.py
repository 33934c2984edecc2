"""CoVe and ULMFiT (AWD-LSTM) against the step-by-step transcriptions in tests/models/lstm_references.py, on
state dicts in the releases' layouts (MTLSTM.pth; fastai's AWD_LSTM / text classifier)."""

import pytest
import torch

from . import lstm_references as ref
from ._import import model_module

cove = model_module("cove")
ulmfit = model_module("ulmfit")
TOL = 1e-5


def _rand_state(shapes, seed, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * scale for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------------ CoVe


def mtlstm_state(E=10, H=8, seed=0):
    shapes = {}
    for l, n_in in ((0, E), (1, 2 * H)):
        for sfx in ("", "_reverse"):
            shapes.update({f"weight_ih_l{l}{sfx}": (4 * H, n_in), f"weight_hh_l{l}{sfx}": (4 * H, H),
                           f"bias_ih_l{l}{sfx}": (4 * H,), f"bias_hh_l{l}{sfx}": (4 * H,)})
    return _rand_state(shapes, seed)


@pytest.mark.parametrize("layer0", [False, True])
def test_cove_matches_transcription(layer0):
    sd = mtlstm_state()
    model = cove.CoVe.from_original(sd, layer0=layer0).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([6, 3, 1])
    vectors = torch.randn(3, 6, 10, generator=g) * (torch.arange(6) < lengths[:, None]).unsqueeze(-1)
    with torch.no_grad():
        got = model(vectors, lengths)
    want = ref.cove(sd, vectors, lengths, layer0=layer0)
    assert got.shape == want.shape == (3, 6, 10 + 16 * (2 if layer0 else 1))
    assert (got - want).abs().max().item() < TOL
    back = model.original_state()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_cove_ids_and_mask():
    sd = mtlstm_state()
    model = cove.CoVe.from_original(sd, vocab_size=20).eval()
    ids = torch.tensor([[3, 4, 5, 0], [7, 8, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        vec = model.vectors(ids) * mask.unsqueeze(-1)
    assert not model.vectors.weight.requires_grad
    assert (got - ref.cove(sd, vec, mask.sum(1))).abs().max().item() < TOL


# ---------------------------------------------------------------------------------------------- ULMFiT

V, E, H, NL = 30, 8, 12, 3


def fastai_lm_state(seed=0):
    shapes = {"0.encoder.weight": (V, E), "0.encoder_dp.emb.weight": (V, E)}
    for l in range(NL):
        n_in, n_out = (E if l == 0 else H), (H if l != NL - 1 else E)
        shapes.update({f"0.rnns.{l}.weight_hh_l0_raw": (4 * n_out, n_out),
                       f"0.rnns.{l}.module.weight_ih_l0": (4 * n_out, n_in),
                       f"0.rnns.{l}.module.weight_hh_l0": (4 * n_out, n_out),
                       f"0.rnns.{l}.module.bias_ih_l0": (4 * n_out,), f"0.rnns.{l}.module.bias_hh_l0": (4 * n_out,)})
    sd = _rand_state(shapes, seed)
    sd["0.encoder_dp.emb.weight"] = sd["0.encoder.weight"]
    sd["1.decoder.weight"], sd["1.decoder.bias"] = sd["0.encoder.weight"], torch.randn(V) * 0.1
    return sd


P = dict(embed=0.3, input=0.3, hidden=0.3, weight=0.5)


def _config(**kw):
    return ulmfit.AWDLSTMConfig(vocab_size=V, emb_sz=E, n_hid=H, n_layers=NL, embed_p=P["embed"],
                                input_p=P["input"], hidden_p=P["hidden"], weight_p=P["weight"], output_p=0.0, **kw)


@pytest.mark.parametrize("training", [False, True])
def test_awd_lstm_lm_matches_fastai_transcription(training):
    sd = fastai_lm_state()
    lm = ulmfit.ULMFiTLanguageModel.from_original(sd, _config())
    assert lm.decoder.weight is lm.encoder.encoder.weight
    lm.train(training)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    out = lm(ids)
    torch.manual_seed(5)  # the same masks, drawn in fastai's order
    outs, last = ref.awd_lstm(sd, ids, NL, P, training)
    want = last @ sd["1.decoder.weight"].t() + sd["1.decoder.bias"]
    assert (out.logits - want).abs().max().item() < TOL
    for a, b in zip(out.hidden_states, outs):
        assert (a - b).abs().max().item() < TOL
    if training:  # the dropouts are there: train differs from eval
        lm.eval()
        with torch.no_grad():
            assert (lm(ids).logits - out.logits).abs().max().item() > 1e-2


def test_awd_lstm_state_carries_over():
    lm = ulmfit.ULMFiTLanguageModel.from_original(fastai_lm_state(), _config()).eval()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = lm(ids).logits
        a = lm(ids[:, :4])
        b = lm(ids[:, 4:], state=a.state)
    assert (torch.cat([a.logits, b.logits], 1) - whole).abs().max().item() < TOL


def test_classifier_concat_pooling():
    sd = fastai_lm_state()
    clf = ulmfit.ULMFiTClassifier(_config(num_labels=3, lin_ftrs=(6,), lin_ps=(0.1,)))
    clf.encoder.load_state_dict(ulmfit.ULMFiTLanguageModel.from_original(sd, _config()).encoder.state_dict())
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in clf.layers.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2.0), m.weight.normal_(1, 0.2)
    clf.eval()
    ids = torch.randint(2, V, (3, 6), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([6, 4, 2])
    ids = ids.masked_fill(torch.arange(6) >= lengths[:, None], 1)
    with torch.no_grad():
        got = clf(ids, lengths=lengths).logits
        _, last = ref.awd_lstm(sd, ids, NL, P, False)
        x = ref.concat_pool(last, lengths)
        for block in clf.layers:  # BatchNorm1d (eval), Linear, ReLU between, dropout off
            bn, lin = block[0], [m for m in block if isinstance(m, torch.nn.Linear)][0]
            x = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
            x = x @ lin.weight.t() + lin.bias
            if block is not clf.layers[-1]:
                x = torch.relu(x)
    assert (got - x).abs().max().item() < TOL
    # fastai's classifier layout loads
    state = {"0.module." + k: v for k, v in clf.encoder.state_dict().items()}
    state.update({"1." + k: v for k, v in clf.state_dict().items() if k.startswith("layers.")})
    clf2 = ulmfit.ULMFiTClassifier(clf.config).load_original(state).eval()
    with torch.no_grad():
        assert torch.equal(clf2(ids, lengths=lengths).logits, got)
