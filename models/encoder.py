"""Pieces shared by the BERT family: embeddings, the post-norm encoder layer, padding masks and packing.

Padding never costs: the attention mask comes from the input lengths (a key-padding part, one object shared by
every layer), and with `unpad=True` the padded positions are dropped before the first linear layer. The real
tokens of the batch are packed into one sequence [1, T, ...] that attends with segment ids (token t sees only
tokens of its own sequence), and outputs are scattered back to [B, L, ...] (zeros at padding) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from . import activations

class BiasAct(nn.Module):
    """Linear (no bias) followed by act(. + bias), with the bias kept as a parameter of its own; act by
    transformers' name (models.activations), its bias fused into the GELU family's op."""

    def __init__(self, n_in: int, n_out: int, act: str):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out))
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act = act
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return activations.bias_apply(F.linear(x, self.weight), self.bias, self.act)


# ------------------------------------------------------------------------------------- padding, packing


def padding_mask(attention_mask: Optional[Tensor], lengths: Optional[Tensor]) -> AttentionMask:
    """The key-padding part from lengths [B] or an HF-style 0/1 attention_mask [B, L] (no [B, 1, L, L])."""
    if lengths is not None:
        return AttentionMask.key_padding(lengths=lengths)
    if attention_mask is not None:
        return AttentionMask.key_padding(mask=attention_mask)
    return AttentionMask()


@dataclass
class Packing:
    """Where the real tokens of a padded [B, L] batch sit: `index` [T] into the flattened B * L positions."""

    index: Tensor
    batch: int
    length: int

    @classmethod
    def from_inputs(cls, B: int, L: int, attention_mask: Optional[Tensor], lengths: Optional[Tensor],
                    device) -> "Packing":
        if lengths is not None:
            real = torch.arange(L, device=device) < lengths.to(device).view(-1, 1)
        elif attention_mask is not None:
            real = attention_mask.bool()
        else:
            real = torch.ones(B, L, dtype=torch.bool, device=device)
        return cls(real.reshape(-1).nonzero().squeeze(1), B, L)

    def pack(self, t: Tensor) -> Tensor:
        """[B, L, ...] -> [1, T, ...]"""
        return t.reshape(self.batch * self.length, *t.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, t: Tensor) -> Tensor:
        """[1, T, ...] -> [B, L, ...], zeros at padding (differentiable)."""
        flat = t.new_zeros(self.batch * self.length, *t.shape[2:]).index_copy(0, self.index, t[0])
        return flat.view(self.batch, self.length, *t.shape[2:])

    def mask(self) -> AttentionMask:
        """Tokens of one sequence see each other only: segment id = the sequence's batch index."""
        return AttentionMask.segments((self.index // self.length).unsqueeze(0))


def unpack(t: Tensor, packing: Optional[Packing]) -> Tensor:
    return t if packing is None else packing.unpack(t)


# ------------------------------------------------------------------------------------------- embeddings


class Embeddings(nn.Module):
    """word + position (+ token type) embeddings, LayerNorm, dropout (BERT, RoBERTa, ALBERT, ELECTRA, ...)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, type_vocab_size: int, eps: float,
                 dropout: float, pad_token_id: Optional[int] = None, position_padding_idx: Optional[int] = None):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_positions, dim, padding_idx=position_padding_idx)
        self.token_type = nn.Embedding(type_vocab_size, dim) if type_vocab_size > 0 else None
        self.norm = LayerNorm(dim, eps=eps)
        self.dropout = dropout

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        return F.dropout(self.norm(x), self.dropout, self.training)


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """[n_pos, dim]: sin at the even features, cos at the odd ones, wavelengths 10000^(2i/dim) (float64 math)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    angle = pos * freq
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])
    return out.float()


def use_sinusoidal_positions(position: nn.Embedding) -> None:
    """Fill a position table with the sinusoids and freeze it (XLM's and DistilBERT's option)."""
    with torch.no_grad():
        position.weight.copy_(sinusoidal_table(*position.weight.shape))
    position.weight.requires_grad_(False)


# ---------------------------------------------------------------------------------------- encoder layer


class EncoderLayer(nn.Module):
    """Post-norm transformer layer (BERT): x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    q, k and v come from one fused projection; each residual add is fused into its LayerNorm; the FFN's
    first bias is fused into its GELU.
    """

    def __init__(self, hidden: int, heads: int, intermediate: int, eps: float, dropout: float,
                 attn_dropout: float, act: str = "gelu"):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.dropout, self.attn_dropout = dropout, attn_dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = LayerNorm(hidden, eps=eps)
        self.fc1 = BiasAct(hidden, intermediate, act)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.ffn_norm = LayerNorm(hidden, eps=eps)

    def attention(self, x: Tensor, mask: AttentionMask) -> Tensor:
        B, L, C = x.shape
        # [B, L, 3, H, D] -> three [B, H, L, D] views; the op reads the strides in place (no copies)
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = pk.attention(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.attn_out(y.transpose(1, 2).reshape(B, L, C))

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        a = F.dropout(self.attention(x, mask), self.dropout, self.training)
        x = self.attn_norm(a, residual=x)[0]
        h = F.dropout(self.fc2(self.fc1(x)), self.dropout, self.training)
        return self.ffn_norm(h, residual=x)[0]


def layer_mapping(hf: dict) -> list:
    """(our key, HF key) pairs of one EncoderLayer, given the HF names of its parts:
    hf = dict(q=, k=, v=, o=, attn_norm=, fc1=, fc2=, ffn_norm=) (module paths without .weight/.bias)."""
    m = [("qkv.weight", (hf["q"] + ".weight", hf["k"] + ".weight", hf["v"] + ".weight")),
         ("qkv.bias", (hf["q"] + ".bias", hf["k"] + ".bias", hf["v"] + ".bias"))]
    for ours, name in (("attn_out", "o"), ("attn_norm", "attn_norm"), ("fc1", "fc1"), ("fc2", "fc2"),
                       ("ffn_norm", "ffn_norm")):
        m += [(f"{ours}.weight", hf[name] + ".weight"), (f"{ours}.bias", hf[name] + ".bias")]
    return m


BERT_LAYER_NAMES = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                        o="attention.output.dense", attn_norm="attention.output.LayerNorm",
                        fc1="intermediate.dense", fc2="output.dense", ffn_norm="output.LayerNorm")


def embeddings_mapping(hf_prefix: str = "embeddings.", norm: str = "LayerNorm") -> list:
    return [("word.weight", hf_prefix + "word_embeddings.weight"),
            ("position.weight", hf_prefix + "position_embeddings.weight"),
            ("token_type.weight", hf_prefix + "token_type_embeddings.weight"),
            ("norm.weight", f"{hf_prefix}{norm}.weight"), ("norm.bias", f"{hf_prefix}{norm}.bias")]
