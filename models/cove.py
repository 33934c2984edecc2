"""CoVe (McCann et al., 2017): context vectors from the encoder of an English-German translation model, a
two-layer bidirectional LSTM over GloVe vectors (the MT-LSTM), concatenated with the vectors: [GloVe(w); CoVe(w)].

    model = CoVe.from_original(torch.load("MTLSTM.pth"))    # the release's state dict (weight_ih_l0, ..._l1)
    out = model(glove_vectors, lengths)                     # [B, L, 300 + 600]

The two layers are two nn.LSTM modules (rnn1: 300 -> 2 x 300, rnn2: 600 -> 2 x 300), as in the release's code,
each run packed so that the backward direction starts at every sentence's last word; zeros at padding.
`layer0=True` also returns the first layer's states ([GloVe; layer 0; CoVe]); `residual_embeddings=False` drops
the GloVe part. An optional frozen embedding table (`vocab_size`) maps ids to the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .recurrent import lengths_from, run_bilstm, time_mask


@dataclass
class CoVeConfig:
    input_size: int = 300
    hidden_size: int = 300
    residual_embeddings: bool = True  # concatenate the input vectors (the paper's [GloVe; CoVe])
    layer0: bool = False
    layer1: bool = True
    vocab_size: int = 0  # > 0: a frozen embedding table maps token ids to the word vectors


class CoVe(nn.Module):
    def __init__(self, config: CoVeConfig):
        super().__init__()
        self.config = c = config
        self.vectors = nn.Embedding(c.vocab_size, c.input_size) if c.vocab_size else None
        if self.vectors is not None:
            self.vectors.weight.requires_grad_(False)
        self.rnn1 = nn.LSTM(c.input_size, c.hidden_size, batch_first=True, bidirectional=True)
        self.rnn2 = nn.LSTM(2 * c.hidden_size, c.hidden_size, batch_first=True, bidirectional=True)

    @classmethod
    def from_original(cls, state: Dict[str, Tensor], **overrides) -> "CoVe":
        """From the release's MTLSTM.pth state dict: one 2-layer bidirectional nn.LSTM's keys."""
        H, In = state["weight_hh_l0"].shape[1], state["weight_ih_l0"].shape[1]
        model = cls(CoVeConfig(input_size=In, hidden_size=H, **overrides))
        model.load_original(state)
        return model

    def load_original(self, state: Dict[str, Tensor]) -> "CoVe":
        layer0 = {k: v for k, v in state.items() if "_l0" in k}
        layer1 = {k.replace("_l1", "_l0"): v for k, v in state.items() if "_l1" in k}
        self.rnn1.load_state_dict(layer0)
        self.rnn2.load_state_dict(layer1)
        return self

    def original_state(self) -> Dict[str, Tensor]:
        out = {k: v.clone() for k, v in self.rnn1.state_dict().items()}
        out.update({k.replace("_l0", "_l1"): v.clone() for k, v in self.rnn2.state_dict().items()})
        return out

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None
                ) -> Tensor:
        """inputs: word vectors [B, L, input_size] (or ids [B, L] with vocab_size); right padded."""
        c = self.config
        x = self.vectors(inputs) if self.vectors is not None else inputs
        B, L = x.shape[:2]
        lengths = lengths_from(attention_mask, lengths, B, L, x.device)
        h0 = run_bilstm(self.rnn1, x, lengths)
        h1 = run_bilstm(self.rnn2, h0, lengths)
        parts = ([x * time_mask(lengths, L).unsqueeze(-1).to(x.dtype)] if c.residual_embeddings else [])
        parts += ([h0] if c.layer0 else []) + ([h1] if c.layer1 else [])
        return torch.cat(parts, -1)
