"""`hf.apply` for T5 (T5Model, T5ForConditionalGeneration, T5EncoderModel, ... any module holding T5 stacks).

What a patched model does differently (the same math, fewer and fused passes):

- **Attention** (`attention=True`) on `ptm_kernels.attention` with `scale=1.0`. The bucketed relative position
  bias becomes a Toeplitz part: the first layer of each stack turns its `relative_attention_bias` embedding
  into a table [H, Lq + Lk - 1] (`t5_relative_table`, differentiable, so the embedding gets its gradient
  through the kernel's table gradient) instead of a [1, H, Lq, Lk] tensor. transformers' 4-D masks are read
  back into analytic parts once per stack (the first layer): a mask whose query rows are all equal is key
  padding, a causal mask AND key padding is `causal() & key_padding`; anything else stays a dense part. The
  resulting mask travels down the stack where transformers passes `position_bias`. Caches: DynamicCache (the
  default in `generate`) runs patched; other caches (e.g. StaticCache, whose keys are not bottom-right
  aligned with the queries) run transformers' attention. Attention weights are not returned.
- **RMSNorm** (`norms=True`): `T5LayerNorm` on `ptm_kernels.rms_norm(cast="t5")` (T5's rounding: normalise in
  float32, round to a half-precision weight's dtype, then scale).
- **FFN** (`mlp=True`): the gated forms (`feed_forward_proj="gated-gelu"` / `"gated-silu"`) on
  `ptm_kernels.geglu` / `swiglu`, an ungated GELU on `ptm_kernels.gelu`; other activations (T5 v1.0's relu)
  run as before.
- **Loss** (`loss=True`): `T5ForConditionalGeneration.forward` given `labels` computes the loss with
  `ptm_kernels.linear_cross_entropy` on the decoder output (scaled by d_model**-0.5 where transformers scales
  it: `config.scale_decoder_outputs`, the old tied-embeddings rule) and returns **`logits=None`**.

Not fused: the residual add into the following RMSNorm (T5's block passes the sum between sub-layer modules).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask, t5_relative_table
from ptm_kernels.ops.attention import _sdpa_mask

from .activations import gelu_approximate
from .bert import IGNORE_INDEX, IGNORED_BY_THE_LOSS, original_forward, set_forward
from .patching import Patcher, PatchOptions, family

# ------------------------------------------------------------------------------------------ attention


def analytic_mask(mask: Optional[Tensor], causal: bool, q: Tensor) -> AttentionMask:
    """transformers' 4-D attention mask (bool: True = visible, or additive float) as AttentionMask parts.

    None means no mask, or causal for a decoder's self-attention (transformers leaves the causal mask to SDPA's
    is_causal when there is no padding). Checked once per stack and forward, so the O(B Lq Lk) comparisons
    are paid once, not per layer.
    """
    if mask is None:
        return AttentionMask.causal() if causal else AttentionMask()
    if mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1] == 1:
        Lq, Lk = mask.shape[2], mask.shape[3]
        last = mask[:, :, -1:, :]  # the last query row sees every real key under both patterns
        if torch.equal(mask, last.expand_as(mask)):
            return AttentionMask.key_padding(mask=last[:, 0, 0, :])
        tril = torch.ones(Lq, Lk, dtype=torch.bool, device=mask.device).tril(Lk - Lq)
        if Lq <= Lk and torch.equal(mask, last & tril):
            return AttentionMask.causal() & AttentionMask.key_padding(mask=last[:, 0, 0, :])
    return _sdpa_mask(mask, 4, q)


def _cache_is_aligned(cache) -> bool:
    """Whether keys from this cache end at the current query (DynamicCache): the Toeplitz part's alignment."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    if cache is None:
        return True
    if isinstance(cache, EncoderDecoderCache):
        return isinstance(cache.self_attention_cache, DynamicCache) and \
            isinstance(cache.cross_attention_cache, DynamicCache)
    return isinstance(cache, DynamicCache)


def attention_forward(self, hidden_states: Tensor, mask=None, key_value_states=None, position_bias=None,
                      cache=None, **kwargs):
    """T5Attention.forward on ptm_kernels.attention. `position_bias` in and out is an AttentionMask: the
    stack's visibility and relative bias, built by the stack's first layer (see the module docstring)."""
    from transformers.cache_utils import EncoderDecoderCache

    if (position_bias is not None and not isinstance(position_bias, AttentionMask)) or \
            not _cache_is_aligned(cache) or kwargs.get("output_attentions"):
        return original_forward(self, hidden_states, mask=mask, key_value_states=key_value_states,
                                position_bias=position_bias, cache=cache, **kwargs)
    input_shape = hidden_states.shape[:-1]
    is_cross = key_value_states is not None
    q = self.q(hidden_states).view(*input_shape, -1, self.key_value_proj_dim).transpose(1, 2)

    # keys and values, through the cache as transformers' T5Attention does
    layer_cache, is_updated = cache, False
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
    source = key_value_states if is_cross else hidden_states
    if is_cross and cache is not None and is_updated:
        k, v = layer_cache.layers[self.layer_idx].keys, layer_cache.layers[self.layer_idx].values
    else:
        kv_shape = (*source.shape[:-1], -1, self.key_value_proj_dim)
        k = self.k(source).view(kv_shape).transpose(1, 2)
        v = self.v(source).view(kv_shape).transpose(1, 2)
        if cache is not None:
            k, v = layer_cache.update(k, v, self.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True

    if position_bias is None:  # the stack's first layer: visibility and relative bias for every layer
        causal = getattr(self, "is_causal", self.is_decoder) and not is_cross  # decoder self-attention
        position_bias = analytic_mask(mask, causal, q)
        if self.has_relative_attention_bias:
            table = t5_relative_table(self.relative_attention_bias.weight, q.shape[2], k.shape[2],
                                      bidirectional=not self.is_decoder,
                                      num_buckets=self.relative_attention_num_buckets,
                                      max_distance=self.relative_attention_max_distance)
            position_bias = position_bias & AttentionMask.toeplitz(table)
    out = pk.attention(q, k, v, position_bias, scale=self.scaling, dropout_p=self.dropout if self.training else 0.0)
    out = self.o(out.transpose(1, 2).reshape(*input_shape, -1))
    return out, position_bias, None


# ------------------------------------------------------------------------------------ norms and FFN


def layer_norm_forward(self, hidden_states: Tensor) -> Tensor:
    """T5LayerNorm: RMSNorm with T5's cast, one kernel."""
    return pk.rms_norm(hidden_states, self.weight, self.variance_epsilon, cast="t5")


def _to_wo_dtype(ffn, h: Tensor) -> Tensor:
    """transformers keeps `wo` in float32 for some checkpoints and casts the activations to it."""
    w = ffn.wo.weight
    return h.to(w.dtype) if isinstance(w, Tensor) and h.dtype != w.dtype and w.dtype != torch.int8 else h


def gated_ffn_forward(self, hidden_states: Tensor, *, activation: str, approximate: str) -> Tensor:
    """T5DenseGatedActDense: act(wi_0 x) * (wi_1 x) in one kernel, then wo."""
    gate, up = self.wi_0(hidden_states), self.wi_1(hidden_states)
    h = pk.swiglu(gate, up) if activation == "silu" else pk.geglu(gate, up, approximate)
    return self.wo(_to_wo_dtype(self, self.dropout(h)))


def gelu_ffn_forward(self, hidden_states: Tensor, *, approximate: str) -> Tensor:
    """T5DenseActDense with a GELU activation."""
    h = pk.gelu(self.wi(hidden_states), approximate)
    return self.wo(_to_wo_dtype(self, self.dropout(h)))


# ------------------------------------------------------------------------------------------- the loss


def conditional_generation_forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                                   decoder_attention_mask=None, encoder_outputs=None, cache=None,
                                   inputs_embeds=None, decoder_inputs_embeds=None, labels=None, use_cache=None,
                                   **kwargs):
    """T5ForConditionalGeneration.forward: with labels, the loss by the fused linear cross-entropy and
    logits=None; without (generate, evaluation of logits) transformers' forward."""
    from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

    if labels is None or any(v is not None and v is not False for k, v in kwargs.items()
                                 if k not in ("return_dict", *IGNORED_BY_THE_LOSS)):
        return original_forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                encoder_outputs=encoder_outputs, cache=cache, inputs_embeds=inputs_embeds,
                                decoder_inputs_embeds=decoder_inputs_embeds, labels=labels, use_cache=use_cache,
                                **kwargs)
    if encoder_outputs is None:
        encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
    elif not isinstance(encoder_outputs, BaseModelOutput):
        encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
    if decoder_input_ids is None and decoder_inputs_embeds is None:
        decoder_input_ids = self._shift_right(labels)
    decoder_outputs = self.decoder(input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
                                   inputs_embeds=decoder_inputs_embeds, cache=cache,
                                   encoder_hidden_states=encoder_outputs.last_hidden_state,
                                   encoder_attention_mask=attention_mask, use_cache=use_cache)
    hidden = decoder_outputs.last_hidden_state
    if _scales_decoder_outputs(self.config):
        hidden = hidden * (self.model_dim ** -0.5)
    weight = self.lm_head.weight
    loss = pk.linear_cross_entropy(hidden, weight, labels.to(hidden.device), self.lm_head.bias,
                                   ignore_index=IGNORE_INDEX)
    return Seq2SeqLMOutput(loss=loss, logits=None, cache=decoder_outputs.cache,
                           encoder_last_hidden_state=encoder_outputs.last_hidden_state)


def _scales_decoder_outputs(config) -> bool:
    """transformers >= 5 names it scale_decoder_outputs; before, tie_word_embeddings decided it."""
    return bool(getattr(config, "scale_decoder_outputs", getattr(config, "tie_word_embeddings", True)))


# ------------------------------------------------------------------------------------------- family


@family("t5")
def patch_t5(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    """Every T5 stack inside `model` (encoder and decoder), and the ConditionalGeneration loss."""
    from transformers.models.t5 import modeling_t5 as t5

    config = model.config
    activation = config.dense_act_fn
    approximate = gelu_approximate(activation)
    for module in model.modules():
        if opts.attention and isinstance(module, t5.T5Attention):
            set_forward(patcher, module, attention_forward)
        elif opts.norms and isinstance(module, t5.T5LayerNorm):
            set_forward(patcher, module, layer_norm_forward)
        elif opts.mlp and isinstance(module, t5.T5DenseGatedActDense) and (approximate or activation == "silu"):
            set_forward(patcher, module, gated_ffn_forward, activation=activation, approximate=approximate)
        elif opts.mlp and isinstance(module, t5.T5DenseActDense) and approximate:
            set_forward(patcher, module, gelu_ffn_forward, approximate=approximate)
    if opts.loss and isinstance(model, t5.T5ForConditionalGeneration):
        set_forward(patcher, model, conditional_generation_forward)
