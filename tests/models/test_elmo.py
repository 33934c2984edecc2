"""ELMo against the bilm-tf transcription (tests/models/lstm_references.py), on weights built in the release's
layout (hdf5 paths, TF shapes and gate order) and loaded with the release's options JSON."""

import json

import pytest
import torch

from . import lstm_references as ref
from ._import import model_module

elmo = model_module("elmo")
TOL = 1e-5

OPTIONS = {"bidirectional": True,
           "char_cnn": {"activation": "relu", "embedding": {"dim": 4}, "filters": [[1, 4], [2, 4], [3, 8]],
                        "max_characters_per_token": 8, "n_characters": 30, "n_highway": 2},
           "lstm": {"cell_clip": 0.5, "dim": 12, "n_layers": 2, "proj_clip": 0.3, "projection_dim": 6,
                    "use_skip_connections": True},
           "n_tokens_vocab": 20}


def release_weights(options, seed=0, scale=0.5):
    """Random weights under the release's hdf5 names and TF shapes."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * scale

    cnn, lstm = options["char_cnn"], options["lstm"]
    E, P, C = cnn["embedding"]["dim"], lstm["projection_dim"], lstm["dim"]
    n = sum(f[1] for f in cnn["filters"])
    w = {"char_embed": r(cnn["n_characters"] - 1, E), "CNN_proj/W_proj": r(n, P), "CNN_proj/b_proj": r(P)}
    for i, (width, num) in enumerate(cnn["filters"]):
        w[f"CNN/W_cnn_{i}"], w[f"CNN/b_cnn_{i}"] = r(1, width, E, num), r(num)
    for k in range(cnn["n_highway"]):
        for a in ("carry", "transform"):
            w[f"CNN_high_{k}/W_{a}"], w[f"CNN_high_{k}/b_{a}"] = r(n, n), r(n)
    for d in range(2):
        for i in range(lstm["n_layers"]):
            g_ = f"RNN_{d}/RNN/MultiRNNCell/Cell{i}/LSTMCell/"
            w[g_ + "W_0"], w[g_ + "B"], w[g_ + "W_P_0"] = r(2 * P, 4 * C), r(4 * C), r(C, P)
    w["softmax/W"], w["softmax/b"] = r(options["n_tokens_vocab"], P), r(options["n_tokens_vocab"])
    return {k: v.numpy() for k, v in w.items()}  # as h5py gives them


def char_ids(B=3, L=7, lengths=(7, 5, 2), W=8, n_chars=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, L, W, dtype=torch.long)
    for b in range(B):
        for t in range(lengths[b]):
            n = int(torch.randint(1, W + 1, (1,), generator=g))
            ids[b, t] = n_chars - 1  # the padding character (within a real token)
            ids[b, t, :n] = torch.randint(1, n_chars - 1, (n,), generator=g)
    return ids


@pytest.fixture(scope="module")
def setup():
    options = json.loads(json.dumps(OPTIONS))  # what json.load of the release file gives
    weights = release_weights(options)
    tw = {k: torch.as_tensor(v) for k, v in weights.items()}
    ids = char_ids()
    return options, weights, tw, ids, ref.elmo_layers(tw, options, ids)


def test_layers_match_bilm_tf(setup):
    options, weights, tw, ids, want = setup
    model = elmo.Elmo.from_original(options, weights, dropout=0.0).eval()
    with torch.no_grad():
        out = model(ids)
    assert len(out.layers) == 3
    for k, (a, b) in enumerate(zip(out.layers, want)):
        d = (a - b).abs().max().item()
        assert d < TOL, f"layer {k} differs by {d}"
    # the clips must have been active for this test to mean anything
    assert want[1].abs().max().item() == pytest.approx(0.3, abs=1e-6)
    # scalar mix with non-uniform weights and gamma
    mix = model.scalar_mixes[0]
    with torch.no_grad():
        for p, v in zip(mix.scalar_parameters, (0.3, -0.2, 0.5)):
            p.fill_(v)
        mix.gamma.fill_(1.7)
        got = model(ids).elmo_representations[0]
    exp = ref.scalar_mix(want, [0.3, -0.2, 0.5], 1.7)
    assert (got - exp).abs().max().item() < TOL


def test_unclipped_runs_fused_lstm(setup):
    """Without clipping, torch's fused (packed) LSTM runs on the same weights."""
    options, weights, tw, ids, _ = setup
    opts = json.loads(json.dumps(options))
    opts["lstm"]["cell_clip"] = opts["lstm"]["proj_clip"] = None
    want = ref.elmo_layers(tw, opts, ids)
    model = elmo.Elmo.from_original(opts, weights).eval()
    with torch.no_grad():
        got = model(ids).layers
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) < TOL


def test_lm_losses_and_gradients(setup):
    options, weights, tw, ids, want = setup
    model = elmo.ElmoLM.from_original(options, weights)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, options["n_tokens_vocab"], ids.shape[:2], generator=g)
    out = model(ids, tokens)
    lengths = (ids > 0).any(-1).sum(1)
    f, b, total = ref.elmo_lm_losses(want, tw["softmax/W"], tw["softmax/b"], tokens, lengths)
    assert abs(out.forward_loss.item() - f.item()) < TOL
    assert abs(out.backward_loss.item() - b.item()) < TOL
    # gradients against autograd through the transcription, for a few of the release's tensors
    out.loss.backward()
    leaves = {k: tw[k].clone().requires_grad_(True) for k in tw}
    total = ref.elmo_lm_losses(ref.elmo_layers(leaves, options, ids), leaves["softmax/W"], leaves["softmax/b"],
                               tokens, lengths)[2]
    total.backward()
    C = options["lstm"]["dim"]
    P = options["lstm"]["projection_dim"]
    bilm = model.bilm
    pairs = [(model.softmax.weight.grad, leaves["softmax/W"].grad),
             (bilm.char_cnn.projection.weight.grad, leaves["CNN_proj/W_proj"].grad.t()),
             (bilm.char_cnn.convs[2].weight.grad, leaves["CNN/W_cnn_2"].grad[0].permute(2, 1, 0)),
             (bilm.forward_layers[1].weight_hr_l0.grad, leaves["RNN_0/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0"].grad.t()),
             (elmo._tf_gates(bilm.backward_layers[0].weight_hh_l0.grad, C),
              leaves["RNN_1/RNN/MultiRNNCell/Cell0/LSTMCell/W_0"].grad.t()[:, P:])]
    for a, b in pairs:
        assert (a - b).abs().max().item() < TOL


def test_release_layout_round_trip(setup):
    options, weights, *_ = setup
    model = elmo.Elmo.from_original(options, weights)
    back = model.bilm.original_state()
    assert set(back) == {k for k in weights if not k.startswith("softmax")}
    for k, v in back.items():
        assert torch.allclose(v, torch.as_tensor(weights[k]), atol=1e-6), k
    assert elmo.ElmoConfig.from_options(model.config.to_options()).lstm_dim == 12


def test_batch_to_ids():
    ids = elmo.batch_to_ids([["hi", "there"], ["é"]], max_chars=8, add_boundaries=True)
    assert ids.shape == (2, 4, 8)
    assert ids[0, 0, :3].tolist() == [259, 257, 260]  # <bow> <S> <eow>, + 1
    assert ids[0, 1, :4].tolist() == [259, ord("h") + 1, ord("i") + 1, 260]
    assert ids[1, 3].sum() == 0  # padding token
