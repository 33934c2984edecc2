"""ELMo (Peters et al., 2018): a character CNN with highway layers under a two-layer biLSTM language model with
projections, and the task-specific scalar mix of its layers.

    model = Elmo.from_original(options, weights)      # the release's options JSON (a dict) and hdf5 weights
    out = model(char_ids)                            # char_ids [B, L, 50], 0 = padding token
    out.elmo_representations[0]                      # [B, L, 2 * projection_dim]

- Characters: `batch_to_ids` maps words to the release's character ids (UTF-8 bytes, begin/end of word marks,
  padding; + 1 so that 0 is a padding token), with <S> and </S> sentence boundary tokens when asked.
- Token embedding: character embeddings, one Conv1d per filter width, max over the characters, activation,
  highway layers (out = g * x + (1 - g) * relu(.)), a projection to projection_dim.
- biLM: per direction, `n_layers` LSTMs of cell size `dim` with a projection to `projection_dim`, the cell
  clipped to [-cell_clip, cell_clip] and the output to [-proj_clip, proj_clip] (TF LSTMCell's options), and a
  residual connection from layer 2 on (use_skip_connections). The backward direction reads each sentence from
  its last token. Weights live in nn.LSTM modules (weight_ih/hh/hr); with clipping they run step by step
  (models/recurrent.py), without it on torch's fused LSTM.
- Layers: [token embedding duplicated for both directions, layer 1 (fwd || bwd), layer 2 (fwd || bwd)].
- Scalar mix: gamma * sum_k softmax(s)_k * layer_k, optionally with layer normalisation over the real tokens
  (one set of weights per output representation), then dropout.
- LM: `ElmoLM` adds the softmax (shared by both directions) and the forward (predict the next token) and backward
  (predict the previous one) losses, averaged as in bilm-tf.

Loading the release: `weights` is the hdf5 file flattened to {"char_embed": ..., "CNN/W_cnn_0": ...,
"CNN_high_0/W_carry": ..., "CNN_proj/W_proj": ..., "RNN_0/RNN/MultiRNNCell/Cell0/LSTMCell/W_0": ...} (numpy
arrays or tensors; `read_hdf5` builds it with h5py). TF's layouts are converted as allennlp does: x @ W
matrices transposed, the LSTM gate order (i, j, f, o) -> (i, f, g, o), TF's forget bias of 1 folded into the
bias, a zero padding row put before the character embeddings. The statefulness of allennlp's ELMo (carrying
the LSTM state between batches) is not reproduced: every call starts from zero states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recurrent import lengths_from, run_direction, time_mask

# ------------------------------------------------------------------------------------------ characters

BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260


def word_to_char_ids(word: str, max_chars: int = 50) -> List[int]:
    """The release's character ids of one word (+ 1: 0 is reserved for padding tokens); <S> and </S> get the
    begin/end-of-sentence characters."""
    ids = [PAD_CHAR] * max_chars
    if word in ("<S>", "</S>"):
        body = [BOS_CHAR if word == "<S>" else EOS_CHAR]
    else:
        body = list(word.encode("utf-8", "ignore")[: max_chars - 2])
    chars = [BOW_CHAR] + body + [EOW_CHAR]
    ids[: len(chars)] = chars
    return [c + 1 for c in ids]


def batch_to_ids(sentences: Sequence[Sequence[str]], max_chars: int = 50, add_boundaries: bool = False) -> Tensor:
    """[B, L, max_chars] character ids of tokenised sentences, right-padded with zero tokens."""
    if add_boundaries:
        sentences = [["<S>", *s, "</S>"] for s in sentences]
    L = max(len(s) for s in sentences)
    out = torch.zeros(len(sentences), L, max_chars, dtype=torch.long)
    for b, s in enumerate(sentences):
        for t, w in enumerate(s):
            out[b, t] = torch.tensor(word_to_char_ids(w, max_chars))
    return out


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ElmoConfig:
    n_characters: int = 262  # rows of the character embedding, padding row included
    max_characters_per_token: int = 50
    char_embedding_dim: int = 16
    filters: Sequence = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))
    n_highway: int = 2
    activation: str = "relu"
    lstm_dim: int = 4096
    projection_dim: int = 512
    n_layers: int = 2
    cell_clip: Optional[float] = 3.0
    proj_clip: Optional[float] = 3.0
    use_skip_connections: bool = True
    vocab_size: int = 0  # the LM softmax (ElmoLM)
    num_output_representations: int = 1
    do_layer_norm: bool = False
    dropout: float = 0.5  # on each ELMo representation

    @classmethod
    def from_options(cls, options: dict, **overrides) -> "ElmoConfig":
        """The release's options JSON (bilm-tf's), parsed."""
        cnn, lstm = options["char_cnn"], options["lstm"]
        kw = dict(n_characters=cnn.get("n_characters", 261) if cnn.get("n_characters", 261) != 261 else 262,
                  max_characters_per_token=cnn["max_characters_per_token"], char_embedding_dim=cnn["embedding"]["dim"],
                  filters=tuple(tuple(f) for f in cnn["filters"]), n_highway=cnn["n_highway"],
                  activation=cnn["activation"], lstm_dim=lstm["dim"], projection_dim=lstm["projection_dim"],
                  n_layers=lstm["n_layers"], cell_clip=lstm.get("cell_clip"), proj_clip=lstm.get("proj_clip"),
                  use_skip_connections=lstm.get("use_skip_connections", False),
                  vocab_size=options.get("n_tokens_vocab", 0) or 0)
        kw.update(overrides)
        return cls(**kw)

    def to_options(self) -> dict:
        return {"bidirectional": True,
                "char_cnn": {"activation": self.activation, "embedding": {"dim": self.char_embedding_dim},
                             "filters": [list(f) for f in self.filters], "max_characters_per_token":
                                 self.max_characters_per_token, "n_characters": self.n_characters,
                             "n_highway": self.n_highway},
                "lstm": {"cell_clip": self.cell_clip, "dim": self.lstm_dim, "n_layers": self.n_layers,
                         "proj_clip": self.proj_clip, "projection_dim": self.projection_dim,
                         "use_skip_connections": self.use_skip_connections},
                "n_tokens_vocab": self.vocab_size}


@dataclass
class ElmoOutput:
    elmo_representations: List[Tensor] = field(default_factory=list)
    layers: Optional[List[Tensor]] = None  # the biLM's layers, [B, L, 2P] each
    mask: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    forward_loss: Optional[Tensor] = None
    backward_loss: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------- modules


class Highway(nn.Module):
    """x -> g * x + (1 - g) * relu(W_t x + b_t), g = sigmoid(W_g x + b_g); one Linear holds [W_t; W_g]."""

    def __init__(self, dim: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(n_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            h, gate = layer(x).chunk(2, -1)
            g = torch.sigmoid(gate)
            x = g * x + (1 - g) * torch.relu(h)
        return x


class CharCNN(nn.Module):
    """Character ids [B, L, W] -> token embeddings [B, L, projection_dim]."""

    def __init__(self, c: ElmoConfig):
        super().__init__()
        self.char_embedding = nn.Embedding(c.n_characters, c.char_embedding_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(c.char_embedding_dim, n, w) for w, n in c.filters)
        n_filters = sum(n for _, n in c.filters)
        self.highway = Highway(n_filters, c.n_highway)
        self.projection = nn.Linear(n_filters, c.projection_dim)
        if c.activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be 'relu' or 'tanh', got {c.activation!r}")
        self.activation = torch.relu if c.activation == "relu" else torch.tanh

    def forward(self, char_ids: Tensor) -> Tensor:
        B, L, W = char_ids.shape
        x = self.char_embedding(char_ids.reshape(B * L, W)).transpose(1, 2)  # [BL, E, W]
        feats = [self.activation(conv(x).amax(-1)) for conv in self.convs]
        h = self.highway(torch.cat(feats, -1))
        return self.projection(h).view(B, L, -1)


class ScalarMix(nn.Module):
    """gamma * sum_k softmax(s)_k * layer_k (allennlp's ScalarMix; parameter names as there). With
    do_layer_norm, each layer is first normalised over all real positions and features (mask required)."""

    def __init__(self, n_layers: int, do_layer_norm: bool = False, initial: Optional[Sequence[float]] = None):
        super().__init__()
        initial = [0.0] * n_layers if initial is None else list(initial)
        self.scalar_parameters = nn.ParameterList(nn.Parameter(torch.tensor([v])) for v in initial)
        self.gamma = nn.Parameter(torch.tensor([1.0]))
        self.do_layer_norm = do_layer_norm

    def forward(self, layers: Sequence[Tensor], mask: Optional[Tensor] = None) -> Tensor:
        w = torch.softmax(torch.cat(list(self.scalar_parameters)), 0)
        out = 0
        for k, t in enumerate(layers):
            if self.do_layer_norm:
                m = mask.unsqueeze(-1).to(t.dtype)
                n = m.sum() * t.shape[-1]
                mean = (t * m).sum() / n
                var = (((t - mean) * m) ** 2).sum() / n
                t = (t - mean) / torch.sqrt(var + 1e-12)
            out = out + w[k] * t
        return self.gamma * out


class ElmoBiLM(nn.Module):
    """The character CNN and the biLSTM; `forward(char_ids)` -> (layers, mask)."""

    def __init__(self, c: ElmoConfig):
        super().__init__()
        self.config = c
        self.char_cnn = CharCNN(c)
        P, C = c.projection_dim, c.lstm_dim
        if not 0 < P < C:
            raise ValueError(f"projection_dim ({P}) must be in (0, lstm_dim = {C})")

        def lstm():
            m = nn.LSTM(P, C, batch_first=True, proj_size=P)
            with torch.no_grad():
                m.bias_hh_l0.zero_()  # one bias, as in TF (kept in bias_ih)
            return m

        self.forward_layers = nn.ModuleList(lstm() for _ in range(c.n_layers))
        self.backward_layers = nn.ModuleList(lstm() for _ in range(c.n_layers))

    def forward(self, char_ids: Tensor):
        B, L, _ = char_ids.shape
        mask = (char_ids > 0).any(-1)
        lengths = lengths_from(mask, None, B, L, char_ids.device)
        c = self.config
        tokens = self.char_cnn(char_ids) * mask.unsqueeze(-1).to(torch.get_default_dtype())
        layers = [torch.cat([tokens, tokens], -1)]
        fwd = bwd = tokens
        for i in range(c.n_layers):
            f = run_direction(self.forward_layers[i], fwd, lengths, False, c.cell_clip, c.proj_clip)
            b = run_direction(self.backward_layers[i], bwd, lengths, True, c.cell_clip, c.proj_clip)
            if i > 0 and c.use_skip_connections:
                f, b = f + fwd, b + bwd
            layers.append(torch.cat([f, b], -1))
            fwd, bwd = f, b
        return layers, mask

    # -- the release's layout
    def load_original(self, weights: Dict[str, object]) -> "ElmoBiLM":
        """Copy the release's weights (the hdf5 file flattened to 'group/name' keys) into this model."""
        t = {k: torch.as_tensor(v).float() for k, v in weights.items()}
        c = self.config
        cnn = self.char_cnn
        with torch.no_grad():
            emb = t["char_embed"]
            if emb.shape[0] + 1 != cnn.char_embedding.weight.shape[0]:
                raise ValueError(f"char_embed has {emb.shape[0]} rows; n_characters must be {emb.shape[0] + 1}")
            cnn.char_embedding.weight.zero_()
            cnn.char_embedding.weight[1:] = emb
            for i, conv in enumerate(cnn.convs):
                conv.weight.copy_(t[f"CNN/W_cnn_{i}"].squeeze(0).permute(2, 1, 0))  # [1, w, E, n] -> [n, E, w]
                conv.bias.copy_(t[f"CNN/b_cnn_{i}"])
            for k, layer in enumerate(cnn.highway.layers):
                g = f"CNN_high_{k}/"
                # TF: carry * relu(x W_t + b_t) + (1 - carry) * x; ours gates x with g = 1 - carry = sigmoid(-.)
                layer.weight.copy_(torch.cat([t[g + "W_transform"].t(), -t[g + "W_carry"].t()]))
                layer.bias.copy_(torch.cat([t[g + "b_transform"], -t[g + "b_carry"]]))
            cnn.projection.weight.copy_(t["CNN_proj/W_proj"].t())
            cnn.projection.bias.copy_(t["CNN_proj/b_proj"])
            P, C = c.projection_dim, c.lstm_dim
            for d, layers in enumerate((self.forward_layers, self.backward_layers)):
                for i, lstm in enumerate(layers):
                    g = f"RNN_{d}/RNN/MultiRNNCell/Cell{i}/LSTMCell/"
                    w = _tf_gates(t[g + "W_0"].t(), C)  # [4C, P + P]: input then recurrent columns
                    b = _tf_gates(t[g + "B"].clone(), C)
                    b[C:2 * C] += 1.0  # TF's forget_bias
                    lstm.weight_ih_l0.copy_(w[:, :P])
                    lstm.weight_hh_l0.copy_(w[:, P:])
                    lstm.bias_ih_l0.copy_(b)
                    lstm.bias_hh_l0.zero_()
                    lstm.weight_hr_l0.copy_(t[g + "W_P_0"].t())
        return self

    def original_state(self) -> Dict[str, Tensor]:
        """This model's weights in the release's layout (the inverse of load_original)."""
        c, cnn = self.config, self.char_cnn
        out = {"char_embed": cnn.char_embedding.weight[1:].detach().clone()}
        for i, conv in enumerate(cnn.convs):
            out[f"CNN/W_cnn_{i}"] = conv.weight.detach().permute(2, 1, 0).unsqueeze(0).clone()
            out[f"CNN/b_cnn_{i}"] = conv.bias.detach().clone()
        n = cnn.projection.weight.shape[1]
        for k, layer in enumerate(cnn.highway.layers):
            w, b = layer.weight.detach(), layer.bias.detach()
            out[f"CNN_high_{k}/W_transform"], out[f"CNN_high_{k}/W_carry"] = w[:n].t().clone(), -w[n:].t()
            out[f"CNN_high_{k}/b_transform"], out[f"CNN_high_{k}/b_carry"] = b[:n].clone(), -b[n:]
        out["CNN_proj/W_proj"] = cnn.projection.weight.detach().t().clone()
        out["CNN_proj/b_proj"] = cnn.projection.bias.detach().clone()
        C = c.lstm_dim
        for d, layers in enumerate((self.forward_layers, self.backward_layers)):
            for i, lstm in enumerate(layers):
                g = f"RNN_{d}/RNN/MultiRNNCell/Cell{i}/LSTMCell/"
                w = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], 1).detach()
                b = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().clone()
                b[C:2 * C] -= 1.0
                out[g + "W_0"] = _tf_gates(w, C).t().contiguous()
                out[g + "B"] = _tf_gates(b, C)
                out[g + "W_P_0"] = lstm.weight_hr_l0.detach().t().contiguous()
        return out


def _tf_gates(t: Tensor, C: int) -> Tensor:
    """Swap gate blocks 1 and 2 along dim 0: TF's (i, j, f, o) <-> torch's (i, f, g, o) (an involution)."""
    i, a, b, o = t.split(C, 0)
    return torch.cat([i, b, a, o], 0)


def read_hdf5(path: str) -> Dict[str, object]:
    """The release's weight file flattened to {'group/name': array} (needs h5py)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


class Elmo(nn.Module):
    """The biLM and `num_output_representations` scalar mixes of its layers."""

    def __init__(self, config: ElmoConfig):
        super().__init__()
        self.config = c = config
        self.bilm = ElmoBiLM(c)
        self.scalar_mixes = nn.ModuleList(ScalarMix(c.n_layers + 1, c.do_layer_norm)
                                          for _ in range(c.num_output_representations))

    @classmethod
    def from_original(cls, options: dict, weights: Dict[str, object], **overrides) -> "Elmo":
        model = cls(ElmoConfig.from_options(options, **overrides))
        model.bilm.load_original(weights)
        return model

    def forward(self, char_ids: Tensor) -> ElmoOutput:
        layers, mask = self.bilm(char_ids)
        m = mask.unsqueeze(-1).to(layers[0].dtype)
        reps = [F.dropout(mix(layers, mask), self.config.dropout, self.training) * m for mix in self.scalar_mixes]
        return ElmoOutput(elmo_representations=reps, layers=layers, mask=mask)


class ElmoLM(nn.Module):
    """The biLM with its softmax (shared by the directions) and the forward / backward LM losses."""

    def __init__(self, config: ElmoConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ElmoLM needs vocab_size > 0 (the softmax)")
        self.config = config
        self.bilm = ElmoBiLM(config)
        self.softmax = nn.Linear(config.projection_dim, config.vocab_size)

    @classmethod
    def from_original(cls, options: dict, weights: Dict[str, object], **overrides) -> "ElmoLM":
        """Also reads the softmax ('softmax/W' [V, P], 'softmax/b') when the weights carry it."""
        model = cls(ElmoConfig.from_options(options, **overrides))
        model.bilm.load_original(weights)
        if "softmax/W" in weights:
            with torch.no_grad():
                model.softmax.weight.copy_(torch.as_tensor(weights["softmax/W"]))
                model.softmax.bias.copy_(torch.as_tensor(weights["softmax/b"]))
        return model

    def forward(self, char_ids: Tensor, token_ids: Optional[Tensor] = None) -> ElmoOutput:
        """token_ids [B, L] (the words' vocabulary ids): the forward LM predicts token t + 1 from position t,
        the backward LM token t - 1; padding positions are ignored; loss = their mean."""
        layers, mask = self.bilm(char_ids)
        out = ElmoOutput(layers=layers, mask=mask)
        if token_ids is None:
            return out
        P = self.config.projection_dim
        top = layers[-1]
        fwd_logits = self.softmax(top[:, :-1, :P])
        bwd_logits = self.softmax(top[:, 1:, P:])
        fwd_t = token_ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        bwd_t = token_ids[:, :-1].masked_fill(~mask[:, 1:], -100)
        out.forward_loss = F.cross_entropy(fwd_logits.flatten(0, 1), fwd_t.flatten(), ignore_index=-100)
        out.backward_loss = F.cross_entropy(bwd_logits.flatten(0, 1), bwd_t.flatten(), ignore_index=-100)
        out.loss = 0.5 * (out.forward_loss + out.backward_loss)
        return out
