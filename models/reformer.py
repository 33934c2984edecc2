"""Reformer (Kitaev et al., 2020; transformers' reformer): reversible layers, LSH and local attention, axial positions.

The residual stream is two halves, both the embeddings at first. Layer i (LSH or local attention, by
attn_layers[i]):

    y1 = x1 + Attention(LayerNorm(x2))        y2 = x2 + FeedForward(LayerNorm(y1))

and the model ends with LayerNorm over [y1, y2] (2 * hidden_size). transformers runs the layers as a reversible
function: it keeps no layer's activations and recomputes them in the backward. Here autograd keeps them (the
gradients are the same, the step faster, the peak memory higher), or, with `model.checkpoint_layers = True`,
each layer's activations are recomputed in the backward from its inputs (torch.utils.checkpoint, the random
state restored: the same dropout masks and LSH rotations), which keeps two [B, L, hidden_size] tensors a layer. The attentions are in reformer_attention.py. Axial position embeddings split position p into
(p // w, p % w) for axial_pos_shape (h, w) and concatenate one table per axis.

Sequences longer than the smallest chunk are padded (eval only) to a multiple of the chunk lengths' least
common multiple, as transformers does, since the chunking and hence the result depend on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ptm_kernels import _checks
from ptm_kernels.nn import LayerNorm

from . import activations
from .convert import HFTwin, config_kwargs
from .decoder_blocks import LMOutput, lm_loss
from .reformer_attention import LocalAttention, LSHAttention


@dataclass
class ReformerConfig:
    vocab_size: int = 320
    hidden_size: int = 256
    num_attention_heads: int = 12
    attention_head_size: int = 64
    attn_layers: Tuple[str, ...] = ("local", "lsh", "local", "lsh", "local", "lsh")
    axial_pos_embds: bool = True
    axial_pos_shape: Tuple[int, int] = (64, 64)
    axial_pos_embds_dim: Tuple[int, int] = (64, 192)
    max_position_embeddings: int = 4096
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.05
    local_attention_probs_dropout_prob: float = 0.05
    lsh_attention_probs_dropout_prob: float = 0.0
    local_attn_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    lsh_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    num_hashes: int = 1
    num_buckets: Optional[Union[int, Tuple[int, ...]]] = None
    hash_seed: Optional[int] = None
    is_decoder: bool = False
    pad_token_id: int = 0
    eos_token_id: int = 2
    tie_word_embeddings: bool = False  # transformers ties nothing: its head reads 2 * hidden_size features
    num_hidden_layers: Optional[int] = None  # transformers: len(attn_layers) unless given

    def __post_init__(self):
        self.attn_layers = tuple(self.attn_layers)
        self.axial_pos_shape, self.axial_pos_embds_dim = tuple(self.axial_pos_shape), tuple(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, list):
            self.num_buckets = tuple(self.num_buckets)
        kinds = set(self.attn_layers)
        if not kinds <= {"lsh", "local"}:
            raise NotImplementedError(f"config field attn_layers={list(self.attn_layers)}: only 'lsh' and 'local'")
        activations.check(self.hidden_act, "hidden_act")
        if self.axial_pos_embds:
            if len(self.axial_pos_shape) != 2:
                raise NotImplementedError(f"config field axial_pos_shape={self.axial_pos_shape}: two axes only "
                                          "(as transformers' evaluation path)")
            if sum(self.axial_pos_embds_dim) != self.hidden_size:
                raise ValueError(f"axial_pos_embds_dim {self.axial_pos_embds_dim} must sum to hidden_size "
                                 f"{self.hidden_size}")
        for name in ("lsh_attn_chunk_length", "local_attn_chunk_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise NotImplementedError(f"config field {name}={getattr(self, name)!r}: a positive chunk length")
        if self.num_hidden_layers is None:
            self.num_hidden_layers = len(self.attn_layers)
        if len(kinds) == 2 and self.num_hidden_layers > len(self.attn_layers):
            raise ValueError(f"config field num_hidden_layers={self.num_hidden_layers}: attn_layers names only "
                             f"{len(self.attn_layers)} layers")

    @property
    def layer_kinds(self) -> Tuple[str, ...]:
        """Each layer's attention, as transformers picks it: one kind for all, or attn_layers[i] when mixed."""
        kinds = set(self.attn_layers)
        return tuple(self.attn_layers[i] if len(kinds) == 2 else self.attn_layers[0]
                     for i in range(self.num_hidden_layers))

    @property
    def chunk_lengths(self) -> Tuple[int, ...]:
        """The chunk lengths of the kinds attn_layers names (transformers pads to their least common multiple)."""
        return tuple(sorted({self.lsh_attn_chunk_length if k == "lsh" else self.local_attn_chunk_length
                             for k in self.attn_layers}))

    @classmethod
    def from_hf(cls, hf_config):
        return cls(**config_kwargs(cls, hf_config))

    def to_hf(self):
        import transformers

        kw = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        return transformers.ReformerConfig(**kw)


class AxialPositions(nn.Module):
    """Position p -> [weights[0][p // w], weights[1][p % w]] for axial_pos_shape (h, w), tables shaped as
    transformers' ([h, 1, d0] and [1, w, d1]). In training the sequence must fill the grid (h * w positions), and
    dropout drops whole columns of it (transformers' dropout2d); positions are then 0 .. h * w - 1."""

    def __init__(self, shape: Tuple[int, int], dims: Tuple[int, int], dropout: float):
        super().__init__()
        self.shape, self.dropout = shape, dropout
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(shape[0], 1, dims[0])),
                                         nn.Parameter(torch.ones(1, shape[1], dims[1]))])

    def forward(self, position_ids: Tensor) -> Tensor:
        (h, w), (B, L) = self.shape, position_ids.shape
        if self.training:
            if h * w != L:
                raise ValueError(f"in training the sequence length must be axial_pos_shape's product {h} * {w} = "
                                 f"{h * w} (transformers' condition), got {L}")
            grid = torch.cat([t.expand(B, h, w, t.shape[-1]) for t in self.weights], dim=-1)
            if self.dropout > 0:
                grid = F.dropout2d(grid.transpose(2, 1), self.dropout, training=True).transpose(2, 1)
            return grid.reshape(B, L, -1)
        _checks.values_in("position_ids", position_ids, 0, h * w, f"[0, {h * w}) (axial_pos_shape {h} x {w})")
        return torch.cat([self.weights[0][position_ids // w, 0], self.weights[1][0, position_ids % w]], dim=-1)


class LearnedPositions(nn.Module):
    """transformers' PositionEmbeddings: a table, its output dropped out in training."""

    def __init__(self, max_positions: int, hidden: int, dropout: float):
        super().__init__()
        self.embedding, self.drop = nn.Embedding(max_positions, hidden), nn.Dropout(dropout)

    def forward(self, position_ids: Tensor) -> Tensor:
        return self.drop(self.embedding(position_ids))


class ReversibleLayer(nn.Module):
    """(x1, x2) -> (y1 = x1 + attention(norm(x2)), y2 = x2 + feed_forward(norm(y1))); see the module docstring."""

    def __init__(self, c: ReformerConfig, kind: str):
        super().__init__()
        d, H, Dh = c.hidden_size, c.num_attention_heads, c.attention_head_size
        self.attn_norm = LayerNorm(d, c.layer_norm_eps)
        self.attn = LSHAttention(c) if kind == "lsh" else LocalAttention(c)
        self.attn_out = nn.Linear(H * Dh, d, bias=False)
        self.ff_norm = LayerNorm(d, c.layer_norm_eps)
        self.fc, self.proj = nn.Linear(d, c.feed_forward_size), nn.Linear(c.feed_forward_size, d)
        self.act, self.drop = c.hidden_act, nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x1: Tensor, x2: Tensor, key_ok: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        y1 = x1 + self.drop(self.attn_out(self.attn(self.attn_norm(x2), key_ok)))
        h = activations.apply(self.drop(self.fc(self.ff_norm(y1))), self.act)  # dropout before the activation
        return y1, x2 + self.drop(self.proj(h))


@dataclass
class ReformerOutput:
    last_hidden_state: Tensor  # [B, L, 2 * hidden_size]


class ReformerModel(HFTwin, nn.Module):
    """transformers' ReformerModel: embeddings, the reversible layers, LayerNorm over both halves."""

    hf_class, config_class = "ReformerModel", ReformerConfig
    hf_base = ""  # the prefix of these weights in transformers' model ("reformer." under a head)
    checkpoint_layers = False  # recompute each layer's activations in the backward (see the module docstring)

    def __init__(self, config: ReformerConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.positions = (AxialPositions(c.axial_pos_shape, c.axial_pos_embds_dim, c.hidden_dropout_prob)
                          if c.axial_pos_embds else
                          LearnedPositions(c.max_position_embeddings, c.hidden_size, c.hidden_dropout_prob))
        self.layers = nn.ModuleList([ReversibleLayer(c, kind) for kind in c.layer_kinds])
        self.norm = LayerNorm(2 * c.hidden_size, c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)

    def _padded(self, input_ids: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor]):
        """transformers pads a sequence longer than the smallest chunk to a multiple of the chunk lengths' least
        common multiple (pad_token_id, masked); the chunking, hence the result, depends on it."""
        c, (B, L) = self.config, input_ids.shape
        multiple = math.lcm(*c.chunk_lengths)
        if L % multiple == 0 or L <= min(c.chunk_lengths):
            return input_ids, attention_mask, position_ids
        if self.training:
            raise ValueError(f"in training the sequence length must be a multiple of {multiple} (the least common "
                             f"multiple of the chunk lengths {c.chunk_lengths}), got {L}")
        pad = multiple - L % multiple
        input_ids = F.pad(input_ids, (0, pad), value=c.pad_token_id)
        ones = torch.ones(B, L, dtype=torch.long, device=input_ids.device)
        attention_mask = F.pad(ones if attention_mask is None else attention_mask, (0, pad), value=0)
        if position_ids is not None:  # the padding's positions: any valid ones (it is never attended to)
            position_ids = F.pad(position_ids.expand(B, -1), (0, pad), value=0)
        return input_ids, attention_mask, position_ids

    def hidden(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               position_ids: Optional[Tensor] = None) -> Tensor:
        L = input_ids.shape[1]
        input_ids, attention_mask, position_ids = self._padded(input_ids, attention_mask, position_ids)
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} (padded to the chunks as transformers does) is "
                             f"over max_position_embeddings {self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.drop(self.embed(input_ids)) + self.positions(position_ids)
        x1 = x2 = x
        recompute = self.checkpoint_layers and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                x1, x2 = checkpoint(layer, x1, x2, attention_mask, use_reentrant=False)
            else:
                x1, x2 = layer(x1, x2, attention_mask)
        return self.drop(self.norm(torch.cat([x1, x2], dim=-1)))[:, :L]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> ReformerOutput:
        return ReformerOutput(self.hidden(input_ids, attention_mask, position_ids))

    def hf_mapping(self) -> list:
        c, p = self.config, self.hf_base
        m = [("embed.weight", f"{p}embeddings.word_embeddings.weight"),
             ("norm.weight", f"{p}encoder.layer_norm.weight"), ("norm.bias", f"{p}encoder.layer_norm.bias")]
        if c.axial_pos_embds:
            m += [(f"positions.weights.{i}", f"{p}embeddings.position_embeddings.weights.{i}") for i in range(2)]
        else:
            m += [("positions.embedding.weight", f"{p}embeddings.position_embeddings.embedding.weight")]
        for i, kind in enumerate(c.layer_kinds):
            ours, hf = f"layers.{i}.", f"{p}encoder.layers.{i}."
            projections = ("query_key", "value") if kind == "lsh" else ("query", "key", "value")
            m += [(f"{ours}attn.{n}.weight", f"{hf}attention.self_attention.{n}.weight") for n in projections]
            m += [(f"{ours}attn_norm.{n}", f"{hf}attention.layer_norm.{n}") for n in ("weight", "bias")]
            m += [(f"{ours}attn_out.weight", f"{hf}attention.output.dense.weight")]
            m += [(f"{ours}ff_norm.{n}", f"{hf}feed_forward.layer_norm.{n}") for n in ("weight", "bias")]
            m += [(f"{ours}fc.{n}", f"{hf}feed_forward.dense.dense.{n}") for n in ("weight", "bias")]
            m += [(f"{ours}proj.{n}", f"{hf}feed_forward.output.dense.{n}") for n in ("weight", "bias")]
        return m


class ReformerModelWithLMHead(ReformerModel):
    """transformers' ReformerModelWithLMHead: a Linear(2 * hidden_size, vocab) head; with labels, the next-token
    loss (logits at t predict labels at t + 1, -100 ignored)."""

    hf_class, hf_base = "ReformerModelWithLMHead", "reformer."
    # transformers (5.x) keeps an lm_head.bias beside lm_head.decoder.bias that its forward never reads (older
    # versions tied the two); it changes nothing, so it is passed over
    hf_derived = ("lm_head.bias",)

    def __init__(self, config: ReformerConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(2 * config.hidden_size, config.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> LMOutput:
        logits = self.lm_head(self.hidden(input_ids, attention_mask, position_ids))
        return LMOutput(logits, None if labels is None else lm_loss(logits, labels))

    def hf_mapping(self) -> list:
        return super().hf_mapping() + [("lm_head.weight", "lm_head.decoder.weight"),
                                       ("lm_head.bias", "lm_head.decoder.bias")]
