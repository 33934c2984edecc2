"""Pieces shared by the recurrent models (ELMo, CoVe, ULMFiT): running an nn.LSTM over padded batches in either
direction, the projected LSTM with cell / projection clipping, and the dropouts of AWD-LSTM.

Parameters always live in an `nn.LSTM` (cuDNN on GPU, oneDNN/ATen's fused cell on CPU), so state dicts use torch's
names (weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, weight_hr_l0). When clipping is asked for, torch's
fused LSTM cannot apply it, and `projected_lstm` runs the same weights step by step: the input projection of all
time steps is one GEMM, and each step does one [B, P] x [P, 4C] GEMM, the gates, and the projection.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_from(mask: Optional[Tensor], lengths: Optional[Tensor], B: int, L: int, device) -> Tensor:
    """Lengths [B] (int64) from lengths or a right-padded 0/1 mask [B, L]; all L when neither is given."""
    if lengths is not None:
        return lengths.to(device=device, dtype=torch.long)
    if mask is not None:
        return mask.to(device).long().sum(1)
    return torch.full((B,), L, dtype=torch.long, device=device)


def reverse_padded(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row of x [B, L, ...] within its length (padding stays at the end, in place order)."""
    B, L = x.shape[:2]
    t = torch.arange(L, device=x.device).expand(B, L)
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx.view(B, L, *([1] * (x.dim() - 2))).expand_as(x))


def time_mask(lengths: Tensor, L: int) -> Tensor:
    """[B, L] bool, True at real positions."""
    return torch.arange(L, device=lengths.device) < lengths[:, None]


def projected_lstm(lstm: nn.LSTM, x: Tensor, cell_clip: Optional[float] = None,
                   proj_clip: Optional[float] = None, state: Optional[Tuple[Tensor, Tensor]] = None):
    """A one-layer unidirectional batch-first nn.LSTM over x [B, L, In], with the cell clipped to
    [-cell_clip, cell_clip] and the (projected) output to [-proj_clip, proj_clip] (TF's LSTMCell options,
    used by ELMo). Without clipping, torch's fused LSTM runs. Returns (outputs [B, L, P], (h, c))."""
    if cell_clip is None and proj_clip is None:
        return lstm(x, state)
    w_ih, w_hh, b_ih, b_hh = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0
    w_hr = getattr(lstm, "weight_hr_l0", None) if lstm.proj_size > 0 else None
    B, L, _ = x.shape
    C = lstm.hidden_size
    xw = F.linear(x, w_ih, b_ih + b_hh)  # every time step's input projection in one GEMM
    if state is None:
        h = x.new_zeros(B, w_hh.shape[1])
        c = x.new_zeros(B, C)
    else:
        h, c = state[0][0], state[1][0]
    outs = []
    for t in range(L):
        gates = torch.addmm(xw[:, t], h, w_hh.t())
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if cell_clip is not None:
            c = c.clamp(-cell_clip, cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = h @ w_hr.t()
        if proj_clip is not None:
            h = h.clamp(-proj_clip, proj_clip)
        outs.append(h)
    return torch.stack(outs, 1), (h.unsqueeze(0), c.unsqueeze(0))


def run_direction(lstm: nn.LSTM, x: Tensor, lengths: Tensor, backward: bool, cell_clip=None, proj_clip=None
                  ) -> Tensor:
    """One direction over a right-padded batch: the backward direction reads each sequence from its last real
    token (reversed within its length); outputs at padded positions are zero."""
    if backward:
        x = reverse_padded(x, lengths)
    if cell_clip is None and proj_clip is None and not bool((lengths == x.shape[1]).all()):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out = nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]
    else:
        out = projected_lstm(lstm, x, cell_clip, proj_clip)[0]
    out = out * time_mask(lengths, x.shape[1]).unsqueeze(-1).to(out.dtype)
    return reverse_padded(out, lengths) if backward else out


def run_bilstm(lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
    """A (multi-layer, bidirectional) batch-first nn.LSTM over a right-padded batch: packed, so each backward
    direction starts at the sequence's last real token; zeros at padding."""
    if bool((lengths == x.shape[1]).all()):
        return lstm(x)[0]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return nn.utils.rnn.pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.shape[1])[0]


# ------------------------------------------------------------------------------- AWD-LSTM's dropouts


def embedding_dropout(weight: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole rows of an embedding matrix (a word is dropped everywhere it occurs), scaling the kept ones
    by 1 / (1 - p) (Merity et al.; fastai's EmbeddingDropout)."""
    if not training or p == 0:
        return weight
    mask = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)
    return weight * mask


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout for x [B, L, C]: one mask per sequence, the same at every time step (RNNDropout)."""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.shape[0], 1, *x.shape[2:]).bernoulli_(1 - p) / (1 - p)
    return x * mask
