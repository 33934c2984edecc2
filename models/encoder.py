"""The encoder side every BERT-family model composes: the one encoder layer, embeddings, and the inputs object.

    inputs = EncoderInputs.build(input_ids, attention_mask=mask, unpad=True)   # ids, positions, mask, packing
    h = backbone.run(inputs)              # [B, L, C], or [1, T, C] with unpad=True (the real tokens only)
    h = inputs.unpack(h)                  # [B, L, C], zeros at padding

Padding never costs: the attention mask comes from the input lengths (a key-padding part, one object shared by
every layer), and with `unpad=True` the padded positions are dropped before the first linear layer. The real
tokens of the batch are packed into one sequence [1, T, ...] that attends with segment ids (token t sees only
tokens of its own sequence), and outputs are scattered back to [B, L, ...] (zeros at padding) when asked.

A backbone (bert.BertModel, albert.AlbertModel, ...) is an `Encoder`: it states how its inputs are prepared
(`InputRules`: data, not overridable hooks) and writes its body once, `run(inputs) -> hidden`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from . import activations
from .blocks import MLP, Attention, Block

# ------------------------------------------------------------------------------------- padding, packing


def padding_mask(attention_mask: Optional[Tensor], lengths: Optional[Tensor]) -> AttentionMask:
    """The key-padding part from lengths [B] or an HF-style 0/1 attention_mask [B, L] (no [B, 1, L, L])."""
    if lengths is not None:
        return AttentionMask.key_padding(lengths=lengths)
    if attention_mask is not None:
        return AttentionMask.key_padding(mask=attention_mask)
    return AttentionMask()


def real_tokens(B: int, L: int, attention_mask: Optional[Tensor], lengths: Optional[Tensor], device) -> Tensor:
    """[B, L] bool: True at the real (non-padding) tokens."""
    if lengths is not None:
        return torch.arange(L, device=device) < lengths.to(device).view(-1, 1)
    if attention_mask is not None:
        return attention_mask.bool()
    return torch.ones(B, L, dtype=torch.bool, device=device)


@dataclass
class Packing:
    """Where the real tokens of a padded [B, L] batch sit: `index` [T] into the flattened B * L positions."""

    index: Tensor
    batch: int
    length: int

    @classmethod
    def from_inputs(cls, B: int, L: int, attention_mask: Optional[Tensor], lengths: Optional[Tensor],
                    device) -> "Packing":
        return cls(real_tokens(B, L, attention_mask, lengths, device).reshape(-1).nonzero().squeeze(1), B, L)

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


# ------------------------------------------------------------------------------------------------ inputs


def roberta_positions(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """RoBERTa's position ids: real tokens count from pad_token_id + 1, padding keeps pad_token_id."""
    real = input_ids.ne(pad_token_id).long()
    return torch.cumsum(real, 1) * real + pad_token_id


@dataclass(frozen=True)
class InputRules:
    """How a backbone turns the raw arguments into `EncoderInputs` (what differs between the families)."""

    positions_after_pad: Optional[int] = None  # RoBERTa: positions count real tokens from this pad id + 1
    lengths_from_pad: Optional[int] = None  # XLM: without attention_mask / lengths, lengths = the non-pad count
    causal: bool = False  # XLM's CLM: a causal part on top of the padding (or packing) mask
    per_token: Optional[Callable[[Tensor], Dict[str, Tensor]]] = None  # padded ids -> more per-token inputs


@dataclass
class EncoderInputs:
    """The inputs of a BERT-family backbone, ready to run: ids [B, L] (or [1, T] packed), their positions and
    token types, further per-token inputs of a variant's embeddings (`extra`: ERNIE's task_type_ids, XLM's langs,
    MobileBERT's trigram neighbours), the attention mask, the Packing when unpad=True, and `real` [B, L] bool
    (the real tokens of the padded batch; None when every token is real or the caller gave the mask)."""

    input_ids: Tensor
    position_ids: Tensor
    token_type_ids: Optional[Tensor]
    mask: AttentionMask
    packing: Optional[Packing] = None
    extra: Dict[str, Optional[Tensor]] = field(default_factory=dict)
    real: Optional[Tensor] = None

    @classmethod
    def build(cls, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
              token_type_ids: Optional[Tensor] = None, position_ids: Optional[Tensor] = None, *,
              lengths: Optional[Tensor] = None, unpad: bool = False, mask: Optional[AttentionMask] = None,
              rules: InputRules = InputRules(), **extra: Optional[Tensor]) -> "EncoderInputs":
        """`mask` replaces the padding mask (UniLM's modes); it cannot be combined with unpad. `extra`: further
        per-token inputs [B, L, ...], packed like the ids with unpad=True."""
        B, L = input_ids.shape
        if rules.lengths_from_pad is not None and attention_mask is None and lengths is None:
            lengths = input_ids.ne(rules.lengths_from_pad).sum(1)
        if position_ids is None:
            position_ids = (torch.arange(L, device=input_ids.device).expand_as(input_ids)
                            if rules.positions_after_pad is None else
                            roberta_positions(input_ids, rules.positions_after_pad))
        if rules.per_token is not None:
            extra = {**extra, **rules.per_token(input_ids)}
        if mask is not None:
            if unpad:
                raise ValueError("unpad=True builds its own (segment) mask; pass mask= without unpad")
            return cls(input_ids, position_ids, token_type_ids, mask, None, extra)  # the caller's mask, as given
        real = None if attention_mask is None and lengths is None else \
            real_tokens(B, L, attention_mask, lengths, input_ids.device)
        packing = None
        if unpad:
            flat = real.reshape(-1) if real is not None else torch.ones(B * L, dtype=torch.bool,
                                                                          device=input_ids.device)
            packing = Packing(flat.nonzero().squeeze(1), B, L)
            input_ids, position_ids = packing.pack(input_ids), packing.pack(position_ids.expand(B, L))
            token_type_ids = None if token_type_ids is None else packing.pack(token_type_ids)
            extra = {k: None if t is None else packing.pack(t) for k, t in extra.items()}
            mask = packing.mask()
        else:
            mask = padding_mask(attention_mask, lengths)  # one object, shared by the layers
        if rules.causal:
            mask = mask & AttentionMask.causal()
        return cls(input_ids, position_ids, token_type_ids, mask, packing, extra, real)

    def unpack(self, t: Tensor) -> Tensor:
        """A per-token output [1, T, ...] of the packed path back to [B, L, ...] (zeros at padding); as it is
        otherwise."""
        return unpack(t, self.packing)

    def pack(self, t: Tensor) -> Tensor:
        """A per-token tensor [B, L, ...] (e.g. labels) in the layout of the hidden states ([1, T, ...] packed)."""
        return t if self.packing is None else self.packing.pack(t)


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

    def sum(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        """word + position + token type, before the norm: [B, L] ids -> [B, L, dim]."""
        x = self.word(input_ids) + self.position(position_ids)
        if self.token_type is not None:
            x = x + self.token_type(token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids))
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token type embeddings")
        return x

    def finish(self, x: Tensor) -> Tensor:
        return F.dropout(self.norm(x), self.dropout, self.training)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        return self.finish(self.sum(input_ids, position_ids, token_type_ids))


def embeddings_mapping(hf_prefix: str = "embeddings.", norm: str = "LayerNorm") -> list:
    return [("word.weight", hf_prefix + "word_embeddings.weight"),
            ("position.weight", hf_prefix + "position_embeddings.weight"),
            ("token_type.weight", hf_prefix + "token_type_embeddings.weight"),
            ("norm.weight", f"{hf_prefix}{norm}.weight"), ("norm.bias", f"{hf_prefix}{norm}.bias")]


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


# ------------------------------------------------------------------------------------------------ blocks


class BiasAct(nn.Module):  # the heads' dense + activation
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


# The one encoder layer is blocks.Block (post-norm here: x = norm1(x + Attn(x)); x = norm2(x + MLP(x)), each add
# fused into its norm), composed of blocks.Attention and blocks.MLP; `EncoderLayer` is its old name.
EncoderLayer = Block


def bert_layer(hidden: int, heads: int, intermediate: int, eps: float, dropout: float, attn_dropout: float,
               act: str = "gelu") -> Block:
    """BERT's post-norm layer: attention with biases (scale 1/sqrt(head dim)), MLP act(fc) -> proj, LayerNorms.
    Call as `x = layer(x, None, mask)[0]` ([B, L, C] -> [B, L, C])."""
    return Block(Attention(hidden, heads, dropout=attn_dropout), MLP(hidden, intermediate, act),
                 LayerNorm(hidden, eps=eps), LayerNorm(hidden, eps=eps), pre_norm=False, resid_dropout=dropout)


def layer_mapping(hf: dict) -> list:
    """(our key, HF key) pairs of one BERT-style EncoderLayer, given the HF names of its parts:
    hf = dict(q=, k=, v=, o=, attn_norm=, fc1=, fc2=, ffn_norm=) (module paths without .weight/.bias)."""
    m = [("attn.qkv.weight", (hf["q"] + ".weight", hf["k"] + ".weight", hf["v"] + ".weight")),
         ("attn.qkv.bias", (hf["q"] + ".bias", hf["k"] + ".bias", hf["v"] + ".bias")),
         ("mlp.fc.weight", hf["fc1"] + ".weight"), ("mlp.fc_bias", hf["fc1"] + ".bias")]
    for ours, name in (("attn.out", "o"), ("norm1", "attn_norm"), ("mlp.proj", "fc2"), ("norm2", "ffn_norm")):
        m += [(f"{ours}.weight", hf[name] + ".weight"), (f"{ours}.bias", hf[name] + ".bias")]
    return m


BERT_LAYER_NAMES = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                        o="attention.output.dense", attn_norm="attention.output.LayerNorm",
                        fc1="intermediate.dense", fc2="output.dense", ffn_norm="output.LayerNorm")


# ------------------------------------------------------------------------------------------------ backbone


@dataclass
class Output:
    """What the models return; the fields a model does not produce stay None (names as in transformers).
    The SQuAD heads' beam: the top start probabilities and indices [B, start_n_top], the top end ones
    [B, end_n_top * start_n_top] (end-major; transformers calls these probabilities `*_log_probs`) and the
    answerability logit [B]; `mems`: XLNet's memory."""
    last_hidden_state: Optional[Tensor] = None
    pooler_output: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    prediction_logits: Optional[Tensor] = None
    seq_relationship_logits: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    start_top_log_probs: Optional[Tensor] = None
    start_top_index: Optional[Tensor] = None
    end_top_log_probs: Optional[Tensor] = None
    end_top_index: Optional[Tensor] = None
    cls_logits: Optional[Tensor] = None
    mems: Optional[list] = None


class Encoder(nn.Module):
    """A BERT-family backbone. A model sets `self.rules` (InputRules) and `self.pooler` (None or a Linear) and
    writes `run(inputs) -> hidden` (embeddings, layers); `encode` and `forward` are the same for all."""

    rules = InputRules()

    def run(self, inputs: EncoderInputs) -> Tensor:
        raise NotImplementedError

    def inputs(self, input_ids: Tensor, *args, **kwargs) -> EncoderInputs:
        """EncoderInputs.build under this model's rules (the arguments of `forward`)."""
        return EncoderInputs.build(input_ids, *args, rules=self.rules, **kwargs)

    def encode(self, input_ids: Tensor, *args, **kwargs):
        """(hidden, inputs): [B, L, C] or, with unpad=True, the real tokens only, [1, T, C] (`inputs.unpack`
        restores [B, L, C])."""
        inputs = self.inputs(input_ids, *args, **kwargs)
        return self.run(inputs), inputs

    def pool(self, h: Tensor) -> Tensor:
        """[B, L, C] -> [B, C]: dense + tanh on the first token."""
        return torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids: Tensor, *args, **kwargs) -> Output:
        """input_ids [B, L], then attention_mask, token_type_ids, position_ids (positional or by name); keywords
        lengths, unpad, mask and a variant's per-token inputs."""
        h, inputs = self.encode(input_ids, *args, **kwargs)
        h = inputs.unpack(h)
        return Output(last_hidden_state=h, pooler_output=self.pool(h) if getattr(self, "pooler", None) is not None
                      else None)
