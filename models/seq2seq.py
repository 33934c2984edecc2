"""The pieces every encoder-decoder model here shares: the encoder-decoder LM (masks, positions, the decoding
cache, loss and generate), the inputs of one decoder pass, the old block constructors; generation is
models.generation's.

A model file (t5.py, bart.py, pegasus.py, mass.py) composes its layers from models.blocks (Block with an
Attention, a cross-attention Attention and an MLP) and writes its two stacks and its head explicitly, top to
bottom, as the encoders write `run` (no other hooks):

    run_encoder(input_ids, mask) -> [B, L, d]   embed, extra mask parts (T5's relative bias), blocks.run_blocks
    run_decoder(inputs: DecoderInputs) -> [B, L, d]   the same on the target side: `inputs.run(layers, x, ...)`
    project(h) -> logits [B, L, V]

What EncoderDecoderLM builds for them:
    self-attention   encoder: key padding; decoder: causal (& key padding), with a preallocated KVCache
                     (bottom-right causal lines Lq new queries up with the end of the cache)
    cross-attention  q from the decoder; k, v from the encoder states, projected once per forward (or once per
                     generate, kept in the Seq2SeqCache); the encoder padding is a key-padding part
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask

from .blocks import MLP, Attention, finish
from .convert import HFTwin
from .encoder import padding_mask
from .kv_cache import KVCache

# the blocks live in models.blocks; the old constructors stay (their layers are now Blocks: forward(x,
# residual, mask, ...) -> (x, residual), so the old EncoderLayer / DecoderLayer are gone rather than aliased)


def SelfAttention(d_model: int, heads: int, head_dim: int, bias: bool = True, scale: Optional[float] = None,
                  dropout: float = 0.0) -> Attention:
    return Attention(d_model, heads, head_dim=head_dim, qkv_bias=bias, out_bias=bias, scale=scale, dropout=dropout)


def CrossAttention(d_model: int, heads: int, head_dim: int, bias: bool = True, scale: Optional[float] = None,
                   dropout: float = 0.0) -> Attention:
    return Attention(d_model, heads, head_dim=head_dim, cross=True, qkv_bias=bias, out_bias=bias, scale=scale,
                     dropout=dropout)


def FeedForward(d_model: int, d_ff: int, act: str, bias: bool = True, gated: bool = False,
                dropout: float = 0.0) -> MLP:
    """The one MLP: fc, fc_bias (fused into the activation), gate, proj."""
    return MLP(d_model, d_ff, act, gated=gated, bias=bias, dropout=dropout)


# ------------------------------------------------------------------------------------------------- cache


class Seq2SeqCache:
    """What incremental decoding keeps: the decoder's self-attention KVCache, and per layer the encoder keys
    and values of its cross-attention (projected once) with the encoder's key-padding mask, as an AttentionMask
    and as the additive bias [B, 1, 1, S] (0 / -inf) of the static decode step."""

    def __init__(self, self_attn: KVCache, cross_kv: List[Tuple[Tensor, Tensor]], cross_mask: AttentionMask,
                 cross_bias: Optional[Tensor] = None):
        self.self_attn, self.cross_kv, self.cross_mask, self.cross_bias = self_attn, cross_kv, cross_mask, cross_bias

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reorder(self, index: Tensor) -> None:
        """Beam search: row r of the self-attention cache becomes row index[r]. The cross-attention keys and
        values are not moved: beams only move within their own source's group of rows, whose encoder rows are
        identical."""
        self.self_attn.reorder(index)


@dataclass
class DecoderInputs:
    """One decoder pass, ready to run (built by EncoderDecoderLM.decode): ids [B, L] after `past` cached tokens,
    their positions [1 or B, L], the self-attention mask over the past + L keys (causal & key padding), per
    decoder layer the cross-attention keys and values with the encoder's key-padding mask, and the
    self-attention cache (None without one).

    In a static decode step (`step`: the cache column [1] this token is written to, a tensor) the masks are
    additive biases instead: self_mask [1, 1, 1, max_len] hides the columns after `step`, cross_mask
    [B, 1, 1, S] the encoder padding (no mask objects, no Python ints that change between steps)."""

    input_ids: Tensor
    position_ids: Tensor
    self_mask: Union[AttentionMask, Tensor]
    cross_kv: List[Tuple[Tensor, Tensor]]
    cross_mask: Union[AttentionMask, Tensor]
    cache: Optional[KVCache] = None
    past: int = 0
    step: Optional[Tensor] = None

    def relative_self_mask(self, table: Callable[[int, int], Tensor]) -> Union[AttentionMask, Tensor]:
        """self_mask with a relative-position bias, given as its Toeplitz table: table(Lq, Lk) -> [H, Lq + Lk - 1]
        (bias[h, i, j] = table[h, i - j + Lk - 1], the Lq queries the last of the Lk positions). In a static
        step the step's row of the full [max_len, max_len] bias is gathered from the table: [1, H, 1, max_len]."""
        L = self.input_ids.shape[1]
        if self.step is None:
            return self.self_mask & AttentionMask.toeplitz(table(L, self.past + L))
        n = self.self_mask.shape[-1]
        t = self.step + (n - 1) - torch.arange(n, device=self.step.device)  # query `step`, key j: i - j + n - 1
        return self.self_mask + table(n, n)[:, t][None, :, None, :]

    def run(self, layers: Sequence[nn.Module], x: Tensor, self_mask: Optional[AttentionMask] = None,
            final_norm: Optional[nn.Module] = None) -> Tensor:
        """The decoder Blocks over x [B, L, d], finished (blocks.finish with final_norm) -> [B, L, d].
        self_mask: the self-attention mask with a model's extra parts (default: self.self_mask)."""
        mask = self.self_mask if self_mask is None else self_mask
        residual = None
        for i, layer in enumerate(layers):
            x, residual = layer(x, residual, mask, None, self.cache, i, cross_kv=self.cross_kv[i],
                                cross_mask=self.cross_mask)
        return finish(x, residual, final_norm)


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class Seq2SeqLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None
    encoder_last_hidden_state: Optional[Tensor] = None
    decoder_last_hidden_state: Optional[Tensor] = None


def shift_right(labels: Tensor, pad_token_id: int, decoder_start_token_id: int) -> Tensor:
    """Decoder inputs from labels: the start token, then labels[:-1]; -100 (ignored labels) become padding."""
    out = labels.new_full(labels.shape, decoder_start_token_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad_token_id)


class EncoderDecoderLM(HFTwin, nn.Module):
    """An encoder-decoder LM: `encode`, `decode` (with an optional Seq2SeqCache), `forward` (logits, loss),
    `new_cache` and `generate`; from_hf / to_hf where a model file states its transformers twin (convert.HFTwin).

    A model file builds `encoder_layers`, `decoder_layers` and `lm_head`, sets `config` (with pad_token_id,
    decoder_start_token_id, eos_token_id) and writes `run_encoder`, `run_decoder` and `project` (see the
    module docstring).
    """

    encoder_layers: nn.ModuleList
    decoder_layers: nn.ModuleList
    lm_head: nn.Linear

    def run_encoder(self, input_ids: Tensor, mask: AttentionMask) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must write run_encoder")

    def run_decoder(self, inputs: DecoderInputs) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must write run_decoder")

    def project(self, h: Tensor) -> Tensor:
        """Hidden states -> logits (a model with more than its lm_head writes its own)."""
        return self.lm_head(h)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Encoder states [B, L, d] (attention_mask [B, L]: 1 = token, 0 = padding)."""
        return self.run_encoder(input_ids, padding_mask(_if_padded(attention_mask), None))

    def cross_kv(self, encoder_states: Tensor) -> List[Tuple[Tensor, Tensor]]:
        return [layer.cross_attn.project_kv(encoder_states) for layer in self.decoder_layers]

    def decode(self, input_ids: Tensor, encoder_states: Optional[Tensor] = None,
               attention_mask: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
               position_ids: Optional[Tensor] = None, cache: Optional[Seq2SeqCache] = None) -> Tensor:
        """Decoder states [B, L, d] of `input_ids` after the `cache.length` tokens already in the cache.

        Without a cache, the encoder states and their attention_mask give the cross-attention keys; with one,
        they come from the cache. decoder_attention_mask [B, past + L] hides padded decoder keys; position_ids
        default to past + arange(L)."""
        L = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(L, device=input_ids.device) + past).unsqueeze(0)
        self_mask = AttentionMask.causal()
        if _if_padded(decoder_attention_mask) is not None:
            self_mask = self_mask & AttentionMask.key_padding(mask=decoder_attention_mask[:, :past + L].bool())
        if cache is not None:
            kv, cross_mask = cache.cross_kv, cache.cross_mask
        else:
            kv, cross_mask = self.cross_kv(encoder_states), padding_mask(_if_padded(attention_mask), None)
        h = self.run_decoder(DecoderInputs(input_ids, position_ids, self_mask, kv, cross_mask,
                                           cache.self_attn if cache is not None else None, past))
        if cache is not None:
            cache.self_attn.advance(L)
        return h

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                decoder_input_ids: Optional[Tensor] = None, decoder_attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, encoder_outputs: Optional[Tensor] = None,
                decoder_position_ids: Optional[Tensor] = None) -> Seq2SeqLMOutput:
        """Logits [B, Lt, V] (and the cross-entropy loss over labels != -100). Without decoder_input_ids, they
        are the labels shifted right behind the decoder start token, as in transformers."""
        c = self.config
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("give decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, c.pad_token_id, c.decoder_start_token_id)
        enc = self.encode(input_ids, attention_mask) if encoder_outputs is None else encoder_outputs
        h = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask, decoder_position_ids)
        logits = self.project(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return Seq2SeqLMOutput(logits, loss, enc, h)

    def new_cache(self, encoder_states: Tensor, attention_mask: Optional[Tensor], max_len: int) -> Seq2SeqCache:
        """A cache for decoding up to max_len tokens against these encoder states (keys/values projected now)."""
        attn = self.decoder_layers[0].attn
        B, S = encoder_states.shape[:2]
        kv = KVCache(len(self.decoder_layers), B, attn.num_kv_heads, max_len, attn.head_dim, encoder_states.dtype,
                     encoder_states.device)
        keep = attention_mask.bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool,
                                                                                     device=encoder_states.device)
        cross_bias = torch.zeros(B, 1, 1, S, device=encoder_states.device).masked_fill(~keep[:, None, None], -math.inf)
        return Seq2SeqCache(kv, self.cross_kv(encoder_states), padding_mask(_if_padded(attention_mask), None),
                            cross_bias)

    def decode_step(self, input_ids: Tensor, cache: Seq2SeqCache) -> Tensor:
        """One static-shape decode step: next-token logits [B, V] after input_ids [B, 1].

        The token sits at position `cache.self_attn.index` ([1] long, set and moved on in place by the caller),
        where its keys and values are written. Decoder rows all start at the start token (no padding), so the
        columns after the index are the only ones hidden; the masks are additive biases built from tensors, so
        torch.compile(fullgraph=True) captures the step once (see DecoderLM.decode_step)."""
        kv = cache.self_attn
        if cache.cross_bias is None or kv.index is None:
            raise ValueError("decode_step needs a cache from new_cache with cache.self_attn.index set (a [1] tensor)")
        cols = torch.arange(kv.max_len, device=input_ids.device)
        self_bias = torch.zeros(kv.max_len, device=input_ids.device).masked_fill(cols > kv.index, -math.inf)
        inputs = DecoderInputs(input_ids, kv.index.view(1, 1), self_bias[None, None, None, :], cache.cross_kv,
                               cache.cross_bias, kv, step=kv.index)
        return self.project(self.run_decoder(inputs))[:, -1]

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See models.generation.generate: returns the decoder tokens [B, 1 + n], from the start token."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)


def _if_padded(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The 0/1 mask, or None when it hides nothing (then no mask part is built)."""
    return None if mask is None or bool(mask.bool().all()) else mask
