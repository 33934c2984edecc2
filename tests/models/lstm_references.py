"""Plain-PyTorch transcriptions of the recurrent models, written from the papers and the original code, one
sentence at a time, one time step at a time, reading the original releases' weight layouts directly:

- ELMo: bilm-tf (TF LSTMCell with num_proj, cell_clip, proj_clip, forget_bias = 1, gates i, j, f, o; x @ W
  matrices), the character CNN (TF conv2d 'VALID' over [1, width, E, n] filters, max, activation), the highway
  of bilm-tf (carry * relu(.) + (1 - carry) * x), the scalar mix and the two LM losses;
- CoVe: the MT-LSTM (two bidirectional LSTM layers, torch's gate order i, f, g, o) from MTLSTM.pth's keys;
- ULMFiT: fastai's AWD_LSTM from its state dict (0.encoder..., 0.rnns.N.weight_hh_l0_raw, 0.rnns.N.module...),
  its dropouts drawn from the global RNG in fastai's order, and the concat-pooling classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


# ------------------------------------------------------------------------------------------------ ELMo


def elmo_token_embedding(w, options, char_ids):
    """char_ids [B, L, W] (release ids + 1, 0 = padding token) -> [B, L, P]."""
    cnn = options["char_cnn"]
    B, L, W = char_ids.shape
    out = torch.zeros(B, L, options["lstm"]["projection_dim"])
    emb = w["char_embed"]
    for b in range(B):
        for t in range(L):
            ids = char_ids[b, t]
            if int(ids.max()) == 0:
                continue
            x = emb[ids - 1]  # [W, E]
            feats = []
            for i, (width, num) in enumerate(cnn["filters"]):
                k = w[f"CNN/W_cnn_{i}"][0]  # [width, E, num]
                conv = torch.stack([torch.einsum("we,wen->n", x[p:p + width], k) for p in range(W - width + 1)])
                conv = conv + w[f"CNN/b_cnn_{i}"]
                m = conv.max(0).values
                feats.append(torch.relu(m) if cnn["activation"] == "relu" else torch.tanh(m))
            h = torch.cat(feats)
            for k in range(cnn["n_highway"]):
                g = f"CNN_high_{k}/"
                carry = _sig(h @ w[g + "W_carry"] + w[g + "b_carry"])
                transform = torch.relu(h @ w[g + "W_transform"] + w[g + "b_transform"])
                h = carry * transform + (1.0 - carry) * h
            out[b, t] = h @ w["CNN_proj/W_proj"] + w["CNN_proj/b_proj"]
    return out


def tf_lstm_projected(w, prefix, xs, cell_clip, proj_clip):
    """TF's LSTMCell(num_units, num_proj, cell_clip, proj_clip, forget_bias=1.0) over xs [T, In]."""
    W, bias, Wp = w[prefix + "W_0"], w[prefix + "B"], w[prefix + "W_P_0"]
    C = bias.shape[0] // 4
    c = torch.zeros(C)
    m = torch.zeros(Wp.shape[1])
    outs = []
    for x in xs:
        z = torch.cat([x, m]) @ W + bias
        i, j, f, o = z[:C], z[C:2 * C], z[2 * C:3 * C], z[3 * C:]
        c = _sig(f + 1.0) * c + _sig(i) * torch.tanh(j)
        if cell_clip:
            c = torch.clamp(c, -cell_clip, cell_clip)
        m = (_sig(o) * torch.tanh(c)) @ Wp
        if proj_clip:
            m = torch.clamp(m, -proj_clip, proj_clip)
        outs.append(m)
    return torch.stack(outs)


def elmo_layers(w, options, char_ids):
    """The biLM's layers [token, token] then each LSTM layer [fwd, bwd], each [B, L, 2P] (zeros at padding)."""
    lstm = options["lstm"]
    tok = elmo_token_embedding(w, options, char_ids)
    B, L, P = tok.shape
    lengths = (char_ids > 0).any(-1).sum(1)
    layers = [torch.cat([tok, tok], -1)] + [torch.zeros(B, L, 2 * P) for _ in range(lstm["n_layers"])]
    for b in range(B):
        n = int(lengths[b])
        for d in range(2):
            x = tok[b, :n] if d == 0 else tok[b, :n].flip(0)
            for i in range(lstm["n_layers"]):
                h = tf_lstm_projected(w, f"RNN_{d}/RNN/MultiRNNCell/Cell{i}/LSTMCell/", x, lstm.get("cell_clip"),
                                      lstm.get("proj_clip"))
                if i > 0 and lstm.get("use_skip_connections"):
                    h = h + x
                layers[i + 1][b, :n, d * P:(d + 1) * P] = h if d == 0 else h.flip(0)
                x = h
    return layers


def scalar_mix(layers, s, gamma):
    w = torch.softmax(torch.as_tensor(s, dtype=torch.float32), 0)
    return gamma * sum(w[k] * layers[k] for k in range(len(layers)))


def elmo_lm_losses(layers, softmax_w, softmax_b, token_ids, lengths):
    """bilm-tf's losses: mean cross-entropy of next-token (forward) and previous-token (backward) predictions."""
    P = layers[-1].shape[-1] // 2
    fwd, bwd = [], []
    for b in range(token_ids.shape[0]):
        for t in range(int(lengths[b]) - 1):
            fwd.append(F.cross_entropy((layers[-1][b, t, :P] @ softmax_w.t() + softmax_b)[None], token_ids[b, t + 1][None]))
            bwd.append(F.cross_entropy((layers[-1][b, t + 1, P:] @ softmax_w.t() + softmax_b)[None],
                                       token_ids[b, t][None]))
    f, bk = torch.stack(fwd).mean(), torch.stack(bwd).mean()
    return f, bk, 0.5 * (f + bk)


# ------------------------------------------------------------------------------------------------ CoVe


def torch_lstm(w_ih, w_hh, b_ih, b_hh, xs):
    """torch's LSTM equations (gates i, f, g, o) over xs [T, In]."""
    H = w_hh.shape[1]
    h, c = torch.zeros(H), torch.zeros(H)
    outs = []
    for x in xs:
        z = w_ih @ x + b_ih + w_hh @ h + b_hh
        i, f, g, o = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
        c = _sig(f) * c + _sig(i) * torch.tanh(g)
        h = _sig(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


def bilstm_layer(sd, layer, x):
    """One bidirectional layer of an nn.LSTM state dict (keys weight_ih_l{layer}[_reverse], ...) over x [T, In]."""
    def run(sfx, xs):
        return torch_lstm(sd[f"weight_ih_l{layer}{sfx}"], sd[f"weight_hh_l{layer}{sfx}"],
                          sd[f"bias_ih_l{layer}{sfx}"], sd[f"bias_hh_l{layer}{sfx}"], xs)
    return torch.cat([run("", x), run("_reverse", x.flip(0)).flip(0)], -1)


def cove(sd, vectors, lengths, layer0=False):
    """[GloVe; (layer 0;) CoVe] per token (zeros at padding), from MTLSTM.pth's keys."""
    B, L, E = vectors.shape
    H = sd["weight_hh_l0"].shape[1]
    out = torch.zeros(B, L, E + 2 * H * (2 if layer0 else 1))
    for b in range(B):
        n = int(lengths[b])
        h0 = bilstm_layer(sd, 0, vectors[b, :n])
        h1 = bilstm_layer(sd, 1, h0)
        out[b, :n] = torch.cat([vectors[b, :n]] + ([h0] if layer0 else []) + [h1], -1)
    return out


# ---------------------------------------------------------------------------------------------- ULMFiT


def awd_lstm(sd, ids, n_layers, p, training, prefix="0.", dropped=None):
    """fastai's AWD_LSTM.forward (unidirectional, zero initial state) on ids [B, L], every position real.

    p = dict(embed=, input=, hidden=, weight=). Dropout masks come from the global RNG in fastai's order:
    the embedding rows (EmbeddingDropout), the input (RNNDropout), then per layer the recurrent weights
    (WeightDropout: F.dropout of weight_hh_l0_raw) and, between layers, the hidden output (RNNDropout).
    Returns (outputs of each layer, last layer's output)."""
    emb = sd[prefix + "encoder.weight"]
    if training and p["embed"]:
        emb = emb * (emb.new_empty(emb.shape[0], 1).bernoulli_(1 - p["embed"]) / (1 - p["embed"]))
    x = F.embedding(ids, emb)
    if training and p["input"]:
        x = x * (x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p["input"]) / (1 - p["input"]))
    outs = []
    for l in range(n_layers):
        g = f"{prefix}rnns.{l}."
        w_hh = F.dropout(sd[g + "weight_hh_l0_raw"], p["weight"], training)
        y = torch.stack([torch_lstm(sd[g + "module.weight_ih_l0"], w_hh, sd[g + "module.bias_ih_l0"],
                                    sd[g + "module.bias_hh_l0"], x[b]) for b in range(x.shape[0])])
        outs.append(y)
        if l != n_layers - 1 and training and p["hidden"]:
            y = y * (y.new_empty(y.shape[0], 1, y.shape[2]).bernoulli_(1 - p["hidden"]) / (1 - p["hidden"]))
        x = y
    return outs, x


def concat_pool(h, lengths):
    """[last real state, max over real states, mean over real states] per sequence."""
    rows = []
    for b in range(h.shape[0]):
        n = int(lengths[b])
        rows.append(torch.cat([h[b, n - 1], h[b, :n].max(0).values, h[b, :n].mean(0)]))
    return torch.stack(rows)
