"""ULMFiT (Howard & Ruder, 2018) on AWD-LSTM (Merity et al., 2017): the language model and the classifier.

    lm = ULMFiTLanguageModel.from_original(torch.load("lstm_wt103.pth"))   # fastai's state dict layout
    clf = ULMFiTClassifier(config); clf.encoder.load_state_dict(lm.encoder.state_dict())

AWD-LSTM (`AWDLSTM`, parameter names as fastai's AWD_LSTM so its state dicts load unchanged):
- embedding dropout: whole rows of the embedding matrix dropped (`embed_p`), then variational ("locked")
  dropout of the embeddings (`input_p`, one mask per sequence for all time steps);
- `n_layers` single-layer LSTMs (the last one back to emb_sz) whose recurrent matrix is DropConnect-ed on every
  forward (weight dropout, `weight_p`: `rnns.N.weight_hh_l0_raw` is the parameter, dropped into the LSTM call);
  variational dropout between layers (`hidden_p`). The LSTM runs as torch's fused LSTM (torch.lstm).
- the hidden state can be carried between calls (BPTT over a stream): pass `state`, get the new one (detached).
Language model: output variational dropout then a decoder tied to the embedding. Classifier: concat pooling of
the last layer's states ([last real state; max; mean] over the real tokens of each right-padded sequence), then
fastai's LinBnDrop blocks (BatchNorm1d, dropout, Linear, ReLU between). The BPTT-chunked reading of long
documents (fastai's SentenceEncoder) is not reproduced: the encoder reads the whole sequence at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .recurrent import embedding_dropout, lengths_from, locked_dropout, time_mask


@dataclass
class AWDLSTMConfig:
    vocab_size: int = 60000
    emb_sz: int = 400
    n_hid: int = 1152
    n_layers: int = 3
    pad_token: int = 1
    hidden_p: float = 0.15
    input_p: float = 0.25
    embed_p: float = 0.02
    weight_p: float = 0.2
    output_p: float = 0.1  # LM decoder (fastai's awd_lstm_lm_config) / first classifier block
    tie_weights: bool = True
    out_bias: bool = True
    # classifier
    num_labels: int = 2
    lin_ftrs: Sequence[int] = (50,)
    lin_ps: Sequence[float] = (0.1,)


class WeightDropLSTM(nn.Module):
    """A one-layer LSTM whose recurrent matrix is dropped out (DropConnect) anew on each training forward.
    Keys as fastai's WeightDropout(nn.LSTM): weight_hh_l0_raw, module.weight_ih_l0, module.bias_*_l0."""

    def __init__(self, n_in: int, n_out: int, weight_p: float):
        super().__init__()
        lstm = nn.LSTM(n_in, n_out, batch_first=True)
        self.module = nn.Module()
        for name in ("weight_ih_l0", "bias_ih_l0", "bias_hh_l0"):
            self.module.register_parameter(name, getattr(lstm, name))
        self.weight_hh_l0_raw = lstm.weight_hh_l0
        self.weight_p = weight_p
        self.hidden_size = n_out

    def forward(self, x: Tensor, state: Optional[Tuple[Tensor, Tensor]] = None):
        w_hh = F.dropout(self.weight_hh_l0_raw, self.weight_p, self.training)
        m = self.module
        if state is None:
            z = x.new_zeros(1, x.shape[0], self.hidden_size)
            state = (z, z)
        out, h, c = torch.lstm(x, state, [m.weight_ih_l0, w_hh, m.bias_ih_l0, m.bias_hh_l0], True, 1, 0.0,
                               self.training, False, True)
        return out, (h, c)


class AWDLSTM(nn.Module):
    def __init__(self, c: AWDLSTMConfig):
        super().__init__()
        self.config = c
        self.encoder = nn.Embedding(c.vocab_size, c.emb_sz, padding_idx=c.pad_token)
        self.rnns = nn.ModuleList(
            WeightDropLSTM(c.emb_sz if l == 0 else c.n_hid, c.n_hid if l != c.n_layers - 1 else c.emb_sz, c.weight_p)
            for l in range(c.n_layers))
        with torch.no_grad():
            self.encoder.weight.uniform_(-0.1, 0.1)

    def forward(self, input_ids: Tensor, state: Optional[List] = None):
        """-> (last layer's states [B, L, emb_sz], every layer's states, new state (detached))."""
        c = self.config
        emb = embedding_dropout(self.encoder.weight, c.embed_p, self.training)
        x = locked_dropout(F.embedding(input_ids, emb, c.pad_token), c.input_p, self.training)
        outs, new_state = [], []
        for l, rnn in enumerate(self.rnns):
            x, s = rnn(x, None if state is None else state[l])
            outs.append(x)
            new_state.append(tuple(t.detach() for t in s))
            if l != c.n_layers - 1:
                x = locked_dropout(x, c.hidden_p, self.training)
        return x, outs, new_state


def _load(model: nn.Module, state: Dict[str, Tensor], renames: Sequence[Tuple[str, str]]) -> nn.Module:
    """Load a fastai state dict, renaming key prefixes; the duplicates fastai keeps (encoder_dp.emb.weight,
    the LSTM's dropped weight_hh_l0) are skipped."""
    out = {}
    for k, v in state.items():
        if k.endswith("encoder_dp.emb.weight") or k.endswith("module.weight_hh_l0"):
            continue
        for a, b in renames:
            if k.startswith(a):
                k = b + k[len(a):]
                break
        out[k] = v
    model.load_state_dict(out, strict=True)
    return model


@dataclass
class ULMFiTOutput:
    logits: Tensor
    loss: Optional[Tensor] = None
    hidden_states: Optional[List[Tensor]] = None
    state: Optional[List] = None


class ULMFiTLanguageModel(nn.Module):
    """AWD-LSTM + output dropout + decoder tied to the embedding (fastai's SequentialRNN(AWD_LSTM,
    LinearDecoder)); `from_original` reads its state dict (0.encoder..., 1.decoder...)."""

    def __init__(self, config: AWDLSTMConfig):
        super().__init__()
        self.config = c = config
        self.encoder = AWDLSTM(c)
        self.decoder = nn.Linear(c.emb_sz, c.vocab_size, bias=c.out_bias)
        with torch.no_grad():
            self.decoder.weight.uniform_(-0.1, 0.1)
            if self.decoder.bias is not None:
                self.decoder.bias.zero_()
        if c.tie_weights:
            self.decoder.weight = self.encoder.encoder.weight

    @classmethod
    def from_original(cls, state: Dict[str, Tensor], config: Optional[AWDLSTMConfig] = None) -> "ULMFiTLanguageModel":
        if config is None:
            V, E = state["0.encoder.weight"].shape
            n_layers = len({k.split(".")[2] for k in state if k.startswith("0.rnns.")})
            H = state["0.rnns.0.weight_hh_l0_raw"].shape[1]
            config = AWDLSTMConfig(vocab_size=V, emb_sz=E, n_hid=H, n_layers=n_layers,
                                   out_bias="1.decoder.bias" in state)
        return _load(cls(config), state, (("0.", "encoder."), ("1.", "")))

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, state=None) -> ULMFiTOutput:
        """labels [B, L]: the next tokens (logits at t against labels at t), -100 ignored."""
        h, outs, new_state = self.encoder(input_ids, state)
        logits = self.decoder(locked_dropout(h, self.config.output_p, self.training))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ULMFiTOutput(logits, loss, outs, new_state)


def concat_pool(h: Tensor, lengths: Tensor) -> Tensor:
    """[last real state; max; mean over the real states] of h [B, L, C] (right padded) -> [B, 3C]."""
    B, L, C = h.shape
    real = time_mask(lengths, L).unsqueeze(-1)
    last = h[torch.arange(B, device=h.device), lengths - 1]
    mx = h.masked_fill(~real, float("-inf")).amax(1)
    mean = h.masked_fill(~real, 0.0).sum(1) / lengths.unsqueeze(-1).to(h.dtype)
    return torch.cat([last, mx, mean], -1)


class ULMFiTClassifier(nn.Module):
    """AWD-LSTM encoder, concat pooling, LinBnDrop blocks (fastai's PoolingLinearClassifier)."""

    def __init__(self, config: AWDLSTMConfig):
        super().__init__()
        self.config = c = config
        self.encoder = AWDLSTM(c)
        sizes = [3 * c.emb_sz, *c.lin_ftrs, c.num_labels]
        ps = [c.output_p, *c.lin_ps]
        blocks = []
        for i in range(len(sizes) - 1):
            block = [nn.BatchNorm1d(sizes[i])] + ([nn.Dropout(ps[i])] if ps[i] else [])
            block += [nn.Linear(sizes[i], sizes[i + 1])] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
            blocks.append(nn.Sequential(*block))
        self.layers = nn.Sequential(*blocks)

    def load_original(self, state: Dict[str, Tensor]) -> "ULMFiTClassifier":
        """fastai's text_classifier_learner state dict (0.module.<AWD_LSTM>..., 1.layers...)."""
        return _load(self, state, (("0.module.", "encoder."), ("1.", "")))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> ULMFiTOutput:
        B, L = input_ids.shape
        lengths = lengths_from(attention_mask, lengths, B, L, input_ids.device)
        h, outs, _ = self.encoder(input_ids)
        logits = self.layers(concat_pool(h, lengths))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return ULMFiTOutput(logits, loss, outs)
