"""The pieces every encoder-decoder model here shares: attention with precomputed encoder keys/values, FFNs,
pre- and post-norm layers, the encoder-decoder LM with a decoding cache, and generation (greedy, beam search).

A model file (t5.py, bart.py, pegasus.py, mass.py) builds the layers from its config and says how tokens are
embedded, which extra mask parts its attention has (T5's relative bias as a Toeplitz part) and how the output
is projected; everything that runs is here, on ptm_kernels ops:

    self-attention   one fused qkv projection; encoder: key padding; decoder: causal (& key padding), with a
                     preallocated KVCache (bottom-right causal lines Lq new queries up with the end of the cache)
    cross-attention  q from the decoder; k, v from the encoder states, projected once per forward (or once per
                     generate, kept in the Seq2SeqCache); the encoder padding is a key-padding part
    norms            layer_norm / rms_norm with residual= : the residual add is fused into the norm after it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels import AttentionMask

from . import activations
from .convert import HFTwin
from .encoder import BiasAct, padding_mask
from .kv_cache import KVCache

# ----------------------------------------------------------------------------------------------- attention


def _split_heads(t: Tensor, n: int, heads: int, head_dim: int) -> Tuple[Tensor, ...]:
    """[B, L, n * heads * head_dim] -> n views [B, heads, L, head_dim] (unit last stride: read in place)."""
    B, L, _ = t.shape
    return t.view(B, L, n, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


class SelfAttention(nn.Module):
    """Fused qkv projection, the fused attention (mask given by the caller), output projection."""

    def __init__(self, d_model: int, heads: int, head_dim: int, bias: bool = True, scale: Optional[float] = None,
                 dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.scale, self.dropout = heads, head_dim, scale, dropout
        self.qkv = nn.Linear(d_model, 3 * heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, d_model, bias=bias)

    def forward(self, x: Tensor, mask: AttentionMask, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        B, L, _ = x.shape
        q, k, v = _split_heads(self.qkv(x), 3, self.heads, self.head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = pk.attention(q, k, v, mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder states (`project_kv`, computed once)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, bias: bool = True, scale: Optional[float] = None,
                 dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.scale, self.dropout = heads, head_dim, scale, dropout
        self.q = nn.Linear(d_model, heads * head_dim, bias=bias)
        self.kv = nn.Linear(d_model, 2 * heads * head_dim, bias=bias)
        self.out = nn.Linear(heads * head_dim, d_model, bias=bias)

    def project_kv(self, encoder_states: Tensor) -> Tuple[Tensor, Tensor]:
        """Keys and values [B, H, Ls, D] of the encoder states."""
        return _split_heads(self.kv(encoder_states), 2, self.heads, self.head_dim)

    def forward(self, x: Tensor, kv: Tuple[Tensor, Tensor], mask: AttentionMask) -> Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        y = pk.attention(q, kv[0], kv[1], mask, scale=self.scale, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, L, -1))


# ---------------------------------------------------------------------------------------------------- FFN


class FeedForward(nn.Module):
    """fc2(dropout(act(fc1(x)))) or, gated (T5 v1.1), fc2(dropout(act(gate(x)) * fc1(x))).

    act by transformers' name (models.activations). With biases, fc1 is a BiasAct (its bias fused into the
    activation); gated GELU/SiLU run as geglu/swiglu.
    """

    def __init__(self, d_model: int, d_ff: int, act: str, bias: bool = True, gated: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        activations.get(act)  # an unknown name raises here, not at the first forward
        self.act, self.dropout = act, dropout
        self.gate = nn.Linear(d_model, d_ff, bias=False) if gated else None
        if gated and bias:
            raise ValueError("gated FFN with biases is not supported")
        self.fc1 = BiasAct(d_model, d_ff, act) if bias else nn.Linear(d_model, d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            h = activations.gated_apply(self.gate(x), self.fc1(x), self.act)
        elif isinstance(self.fc1, BiasAct):
            h = self.fc1(x)
        else:
            h = activations.apply(self.fc1(x), self.act)
        return self.fc2(F.dropout(h, self.dropout, self.training))


# ------------------------------------------------------------------------------------------------- layers


class EncoderLayer(nn.Module):
    """Self-attention + FFN. Pre-norm (T5, Pegasus): x + Attn(norm1(x)), then + FFN(norm2(.));
    post-norm (BART, MASS): norm1(x + Attn(x)), then norm2(. + FFN(.)). Residual adds are fused into the norms
    where a norm follows them."""

    def __init__(self, self_attn: SelfAttention, ffn: FeedForward, norm1: nn.Module, norm2: nn.Module,
                 pre_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.self_attn, self.ffn, self.norm1, self.norm2 = self_attn, ffn, norm1, norm2
        self.pre_norm, self.dropout = pre_norm, dropout

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        if self.pre_norm:
            h, x = self.norm2(self.drop(self.self_attn(self.norm1(x), mask)), residual=x)
            return x + self.drop(self.ffn(h))
        x = self.norm1(self.drop(self.self_attn(x, mask)), residual=x)[0]
        return self.norm2(self.drop(self.ffn(x)), residual=x)[0]


class DecoderLayer(nn.Module):
    """Causal self-attention + cross-attention + FFN, pre- or post-norm like EncoderLayer."""

    def __init__(self, self_attn: SelfAttention, cross_attn: CrossAttention, ffn: FeedForward, norm1: nn.Module,
                 norm2: nn.Module, norm3: nn.Module, pre_norm: bool, dropout: float = 0.0):
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.norm1, self.norm2, self.norm3 = norm1, norm2, norm3
        self.pre_norm, self.dropout = pre_norm, dropout

    def drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training)

    def forward(self, x: Tensor, self_mask: AttentionMask, cross_kv: Tuple[Tensor, Tensor],
                cross_mask: AttentionMask, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        if self.pre_norm:
            h, x = self.norm2(self.drop(self.self_attn(self.norm1(x), self_mask, cache, layer)), residual=x)
            h, x = self.norm3(self.drop(self.cross_attn(h, cross_kv, cross_mask)), residual=x)
            return x + self.drop(self.ffn(h))
        x = self.norm1(self.drop(self.self_attn(x, self_mask, cache, layer)), residual=x)[0]
        x = self.norm2(self.drop(self.cross_attn(x, cross_kv, cross_mask)), residual=x)[0]
        return self.norm3(self.drop(self.ffn(x)), residual=x)[0]


# ------------------------------------------------------------------------------------------------- cache


class Seq2SeqCache:
    """What incremental decoding keeps: the decoder's self-attention KVCache, and per layer the encoder keys
    and values of its cross-attention (projected once) with the encoder's key-padding mask."""

    def __init__(self, self_attn: KVCache, cross_kv: List[Tuple[Tensor, Tensor]], cross_mask: AttentionMask):
        self.self_attn, self.cross_kv, self.cross_mask = self_attn, cross_kv, cross_mask

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reorder(self, index: Tensor) -> None:
        """Beam search: row r of the self-attention cache becomes row index[r]. The cross-attention keys and
        values are not moved: beams only move within their own source's group of rows, whose encoder rows are
        identical."""
        n = self.self_attn.length
        for t in (self.self_attn.k, self.self_attn.v):
            t[:, :, :, :n] = t[:, index, :, :n]


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

    Subclasses build `encoder_layers`, `decoder_layers` and `lm_head`, set `config` (with pad_token_id,
    decoder_start_token_id, eos_token_id) and define `embed_source`, `embed_target`, and where they need them
    `source_mask`, `target_mask` (extra mask parts, e.g. T5's relative bias), `finish_source`,
    `finish_target` (final norms) and `project` (hidden states -> logits).
    """

    encoder_layers: nn.ModuleList
    decoder_layers: nn.ModuleList
    lm_head: nn.Linear

    # ------------------------------------------------------------------------ hooks for the model files

    def embed_source(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def embed_target(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def source_mask(self, mask: AttentionMask, L: int) -> AttentionMask:
        return mask

    def target_mask(self, mask: AttentionMask, Lq: int, Lk: int) -> AttentionMask:
        return mask

    def finish_source(self, x: Tensor) -> Tensor:
        return x

    def finish_target(self, x: Tensor) -> Tensor:
        return x

    def project(self, h: Tensor) -> Tensor:
        return self.lm_head(h)

    # ---------------------------------------------------------------------------------------- running

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """Encoder states [B, L, d] (attention_mask [B, L]: 1 = token, 0 = padding)."""
        mask = self.source_mask(padding_mask(_if_padded(attention_mask), None), input_ids.shape[1])
        x = self.embed_source(input_ids)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.finish_source(x)

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
        x = self.embed_target(input_ids, position_ids)
        self_mask = AttentionMask.causal()
        if _if_padded(decoder_attention_mask) is not None:
            self_mask = self_mask & AttentionMask.key_padding(mask=decoder_attention_mask[:, :past + L].bool())
        self_mask = self.target_mask(self_mask, L, past + L)
        if cache is not None:
            kv, cross_mask = cache.cross_kv, cache.cross_mask
        else:
            kv, cross_mask = self.cross_kv(encoder_states), padding_mask(_if_padded(attention_mask), None)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, self_mask, kv[i], cross_mask, cache.self_attn if cache is not None else None, i)
        if cache is not None:
            cache.self_attn.advance(L)
        return self.finish_target(x)

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
        attn = self.decoder_layers[0].self_attn
        B = encoder_states.shape[0]
        kv = KVCache(len(self.decoder_layers), B, attn.heads, max_len, attn.head_dim, encoder_states.dtype,
                     encoder_states.device)
        return Seq2SeqCache(kv, self.cross_kv(encoder_states), padding_mask(_if_padded(attention_mask), None))

    def generate(self, input_ids: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """See models.seq2seq.generate."""
        return generate(self, input_ids, max_new_tokens, **kwargs)


def _if_padded(mask: Optional[Tensor]) -> Optional[Tensor]:
    """The 0/1 mask, or None when it hides nothing (then no mask part is built)."""
    return None if mask is None or bool(mask.bool().all()) else mask


# ---------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(model: EncoderDecoderLM, input_ids: Tensor, max_new_tokens: int,
             attention_mask: Optional[Tensor] = None, *, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping=False, min_new_tokens: int = 0, eos_token_id: Optional[int] = -1,
             pad_token_id: Optional[int] = None, decoder_start_token_id: Optional[int] = None,
             use_cache: bool = True) -> Tensor:
    """Decode each source: greedy (num_beams=1) or beam search; returns [B, 1 + n] decoder tokens, starting
    with the decoder start token, as transformers' generate does for encoder-decoders.

    Greedy: rows that emitted eos continue with pad; stops when every row has. Beam search follows
    transformers' (vectorized) algorithm: 2 * num_beams candidates per step, a finished hypothesis scores
    sum(log p) / length ** length_penalty (length = generated tokens, eos included), `early_stopping` True /
    False / "never" as there. eos_token_id=-1 means the model's config value, None disables it.
    `use_cache=False` recomputes the decoder over the whole prefix at each step (the check for the cache).
    """
    c = model.config
    eos = c.eos_token_id if eos_token_id == -1 else eos_token_id
    pad = c.pad_token_id if pad_token_id is None else pad_token_id
    start = c.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    B = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)
    if num_beams > 1:  # each source once per beam, beams of a source adjacent
        enc = enc.repeat_interleave(num_beams, 0)
        attention_mask = attention_mask.repeat_interleave(num_beams, 0) if attention_mask is not None else None
    max_length = 1 + max_new_tokens
    cache = model.new_cache(enc, attention_mask, max_length) if use_cache else None

    def step(tokens: Tensor) -> Tensor:
        """Next-token logits (float32 [rows, V]) after the decoder tokens [rows, t]."""
        if cache is not None:
            h = model.decode(tokens[:, cache.length:], cache=cache)
        else:
            h = model.decode(tokens, enc, attention_mask)
        return model.project(h[:, -1]).float()

    def suppress_eos(logits: Tensor, generated: int) -> Tensor:
        if eos is not None and generated < min_new_tokens:
            logits[:, eos] = float("-inf")
        return logits

    if num_beams == 1:
        tokens = torch.full((B, max_length), pad, dtype=torch.long, device=input_ids.device)
        tokens[:, 0] = start
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for t in range(1, max_length):
            nxt = suppress_eos(step(tokens[:, :t]), t - 1).argmax(-1)
            if eos is not None:
                nxt = nxt.masked_fill(finished, pad)
                finished |= nxt == eos
            tokens[:, t] = nxt
            if eos is not None and bool(finished.all()):
                return tokens[:, :t + 1]
        return tokens
    return _beam_search(step, suppress_eos, B, num_beams, max_length, start, eos, pad, length_penalty,
                        early_stopping, cache, input_ids.device)


def _beam_search(step: Callable, suppress_eos: Callable, B: int, K: int, max_length: int, start: int,
                 eos: Optional[int], pad: int, length_penalty: float, early_stopping, cache, device) -> Tensor:
    """transformers' beam search (generation/utils.py `_beam_search`), re-stated for one decoder start token.

    Per step: the top 2K continuations of all K beams of a source; the best K that did not just finish keep
    running; those among the top K that finished (eos, or the length limit) enter the K finished hypotheses
    if their length-penalised score is better. Stops when no running beam can beat the worst finished one
    (the heuristic `early_stopping` selects), when all continuations hit the length limit, or, with
    early_stopping=True, when every source has K finished hypotheses.
    """
    NEG = -1.0e9
    keep = 2 * K
    top_k_mask = torch.arange(keep, device=device) < K
    batch_offset = torch.arange(B, device=device).view(B, 1) * K

    def gather(t: Tensor, idx: Tensor) -> Tensor:  # t [B, n, ...], idx [B, m] -> [B, m, ...]
        return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

    running = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)
    running[:, :, 0] = start
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG
    scores = torch.full((B, K), NEG, device=device)
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_origin = torch.full((B, K, max_length - 1), -1, dtype=torch.long, device=device)
    origin = running_origin.clone()  # per generated position, the beam row it came from (-1: not generated)

    cur = 1
    while True:
        log_probs = suppress_eos(F.log_softmax(step(running[:, :, :cur].reshape(B * K, cur)), -1), cur - 1)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = log_probs.topk(keep, dim=1)
        beam, token = top_idx // V, top_idx % V
        top_seqs = gather(running, beam)
        top_seqs[:, :, cur] = token
        top_origin = gather(running_origin, beam)
        top_origin[:, :, cur - 1] = beam + batch_offset
        done = torch.full_like(token, cur + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            done = done | (token == eos)

        # the best K continuations that did not finish keep running
        live_lp = top_lp + done.float() * NEG
        nxt = live_lp.topk(K, dim=1).indices
        running, running_scores, running_origin = gather(top_seqs, nxt), gather(live_lp, nxt), gather(top_origin, nxt)

        # finished continuations among the top K enter the finished hypotheses if they score better
        just_finished = done & top_k_mask
        fin = top_lp / (cur + 1 - 1) ** length_penalty
        fin = fin + (finished.all(-1, keepdim=True) & (early_stopping is True)).float() * NEG
        fin = fin + (~improvable).float() * NEG
        fin = fin + (~just_finished).float() * NEG
        merged = torch.cat([scores, fin], 1).topk(K, dim=1).indices
        sequences = gather(torch.cat([sequences, top_seqs], 1), merged)
        scores = gather(torch.cat([scores, fin], 1), merged)
        origin = gather(torch.cat([origin, top_origin], 1), merged)
        finished = gather(torch.cat([finished, just_finished], 1), merged)

        if cache is not None:
            cache.reorder(running_origin[:, :, cur - 1].reshape(-1))
        cur += 1

        # can a running beam still beat the worst finished hypothesis?
        best_len = (max_length - 1) if early_stopping == "never" and length_penalty > 0.0 else (cur - 1)
        best_running = running_scores[:, :1] / best_len ** length_penalty
        worst_finished = torch.where(finished, scores.min(1, keepdim=True).values, torch.full_like(scores, NEG))
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beam = not (bool(finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(done.all())):
            break

    best, origin = sequences[:, 0], origin[:, 0]
    length = 1 + int((origin >= 0).sum(1).max())
    return best[:, :length]
