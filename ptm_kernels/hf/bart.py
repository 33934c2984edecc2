"""`hf.apply` for BART and Pegasus (BartModel, BartForConditionalGeneration, ..., the Pegasus copies).

The two share one encoder/decoder layer design and differ in where the LayerNorm sits: BART normalises after
each sub-layer (`norm(residual + sublayer(x))`, post-norm), Pegasus before it (`residual + sublayer(norm(x))`,
pre-norm, plus a final `layer_norm` per stack). What a patched model does differently (the same math, fewer
and fused passes):

- **attention** (`attention=True`): the model's attention implementation becomes "ptm" (`hf/attention.py`);
  BART and Pegasus call transformers' attention interface, so every attention runs on `ptm_kernels.attention`
  with `scale=head_dim**-0.5` and the masks as analytic parts: causal (+ key padding of
  `decoder_attention_mask`) for the decoder's self-attention, key padding of `attention_mask` for the encoder
  and for the cross-attention. `attention_dropout` is the kernel's dropout.
- **norms** (`norms=True`): each residual add is fused into the LayerNorm that follows it. BART:
  `layer_norm(dropout(sublayer) , residual=...)` after every sub-layer. Pegasus: the add after self-attention
  (and cross-attention) is fused into the next sub-layer's input norm; the add after the MLP is the layer's
  output and stays a plain add (fusing it into the next layer's norm would change what a layer returns).
  `layernorm_embedding` (BART) and the stacks' final `layer_norm` (Pegasus) run `ptm_kernels.layer_norm`.
- **mlp** (`mlp=True`): `fc2(gelu(x fc1^T + b1))` with fc1's bias added inside the GELU kernel, when
  `activation_function` is a GELU the kernels compute (`hf/activations.py`); any other activation runs as
  before.
- **loss** (`loss=True`, `*ForConditionalGeneration`): given `labels`, the lm_head, `final_logits_bias` and
  the cross-entropy run as one `ptm_kernels.linear_cross_entropy`: the [tokens, vocab] logits never exist and
  **`logits` is None** in the output (as in Liger-Kernel). `decoder_input_ids` default to the labels shifted
  right, as in transformers; `ignore_index=-100`, mean over the labelled tokens. Without labels (generate,
  evaluation of logits) transformers' forward runs. `*ForCausalLM` keeps transformers' loss.

The float16 clamp of transformers' encoder layers (BART: when the output is not finite; Pegasus: always) is
kept. Attention weights are not returned (`output_attentions=True` raises).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import ptm_kernels as pk

from .activations import gelu_approximate
from .bert import IGNORE_INDEX, IGNORED_BY_THE_LOSS, original_forward, set_forward
from .llama import use_ptm_attention
from .patching import Patcher, PatchOptions, checkpointable, family

# how transformers' encoder layer clamps a float16 output: BART when it is not finite, Pegasus always
FP16_CLAMP = {"bart": "nonfinite", "pegasus": "always"}


def _add_norm(x: Tensor, residual: Tensor, norm: nn.LayerNorm, fused: bool):
    """(norm(x + residual), x + residual): one kernel when fused, else transformers' add and norm module."""
    if fused:
        return pk.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)
    h = residual + x
    return norm(h), h


def layer_norm_forward(self, x: Tensor) -> Tensor:
    return pk.layer_norm(x, self.weight, self.bias, self.eps)


def _mlp(self, x: Tensor, approximate: Optional[str]) -> Tensor:
    """dropout(fc2(dropout(act(fc1(x))))), the fc1 bias inside the GELU kernel when `approximate` is set."""
    if approximate is None:
        h = self.activation_fn(self.fc1(x))
    elif self.fc1.bias is None:
        h = pk.gelu(F.linear(x, self.fc1.weight), approximate)
    else:
        h = pk.bias_gelu(F.linear(x, self.fc1.weight), self.fc1.bias, approximate)
    h = F.dropout(h, p=self.activation_dropout, training=self.training)
    return F.dropout(self.fc2(h), p=self.dropout, training=self.training)


def layer_forward(self, hidden_states: Tensor, attention_mask=None, encoder_hidden_states=None,
                  encoder_attention_mask=None, cache=None, use_cache=None, *, pre_norm: bool, fused: bool,
                  approximate: Optional[str], fp16_clamp: str, **kwargs) -> Tensor:
    """An encoder layer (no `encoder_attn`) or decoder layer of BART (post-norm) or Pegasus (pre-norm), with
    the residual adds fused into the following LayerNorm (`fused`) and bias+GELU (`approximate`)."""
    drop = lambda x: F.dropout(x, p=self.dropout, training=self.training)  # noqa: E731
    is_decoder = hasattr(self, "encoder_attn")
    attn_kwargs = dict(kwargs, cache=cache) if is_decoder else kwargs
    residual = hidden_states
    if pre_norm:
        x = self.self_attn_layer_norm(hidden_states)
        out = drop(self.self_attn(x, attention_mask=attention_mask, **attn_kwargs)[0])
        if is_decoder and encoder_hidden_states is not None:
            x, residual = _add_norm(out, residual, self.encoder_attn_layer_norm, fused)
            out = drop(self.encoder_attn(x, key_value_states=encoder_hidden_states,
                                         attention_mask=encoder_attention_mask, **attn_kwargs)[0])
        x, residual = _add_norm(out, residual, self.final_layer_norm, fused)
        hidden_states = residual + _mlp(self, x, approximate)
    else:
        out = drop(self.self_attn(hidden_states, attention_mask=attention_mask, **attn_kwargs)[0])
        hidden_states = _add_norm(out, residual, self.self_attn_layer_norm, fused)[0]
        if is_decoder and encoder_hidden_states is not None:
            out = drop(self.encoder_attn(hidden_states, key_value_states=encoder_hidden_states,
                                         attention_mask=encoder_attention_mask, **attn_kwargs)[0])
            hidden_states = _add_norm(out, hidden_states, self.encoder_attn_layer_norm, fused)[0]
        hidden_states = _add_norm(_mlp(self, hidden_states, approximate), hidden_states, self.final_layer_norm,
                                  fused)[0]
    if not is_decoder and hidden_states.dtype == torch.float16 and \
            (fp16_clamp == "always" or not torch.isfinite(hidden_states).all()):
        clamp_value = torch.finfo(hidden_states.dtype).max - 1000
        hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
    return hidden_states


# ------------------------------------------------------------------------------------------- the loss


# the *ForConditionalGeneration arguments the fused path hands to the base model as they are (or ignores)
MODEL_INPUTS = ("attention_mask", "decoder_attention_mask", "encoder_outputs", "cache", "inputs_embeds", "use_cache",
                "return_dict", *IGNORED_BY_THE_LOSS)


def conditional_generation_forward(self, input_ids=None, *args, labels=None, decoder_input_ids=None,
                                   decoder_inputs_embeds=None, **kwargs):
    """*ForConditionalGeneration.forward: with labels, the loss by the fused linear cross-entropy (lm_head and
    final_logits_bias) and logits=None; without (or with positional or other arguments), transformers' forward."""
    from transformers.modeling_outputs import Seq2SeqLMOutput

    if labels is None or args or any(v is not None and v is not False for k, v in kwargs.items()
                                     if k not in MODEL_INPUTS):
        return original_forward(self, input_ids, *args, labels=labels, decoder_input_ids=decoder_input_ids,
                                decoder_inputs_embeds=decoder_inputs_embeds, **kwargs)
    if decoder_input_ids is None and decoder_inputs_embeds is None:  # the family's own shift_tokens_right
        shift_tokens_right = sys.modules[type(self).__module__].shift_tokens_right
        decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
    model_inputs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "return_dict", *IGNORED_BY_THE_LOSS)}
    outputs = self.model(input_ids, decoder_input_ids=decoder_input_ids, decoder_inputs_embeds=decoder_inputs_embeds,
                         use_cache=False, **model_inputs)  # transformers also turns the cache off with labels
    hidden = outputs.last_hidden_state
    bias = self.final_logits_bias.reshape(-1).to(hidden.device)
    loss = pk.linear_cross_entropy(hidden, self.lm_head.weight, labels.to(hidden.device), bias,
                                   ignore_index=IGNORE_INDEX)
    return Seq2SeqLMOutput(loss=loss, logits=None, cache=outputs.cache,
                           encoder_last_hidden_state=outputs.encoder_last_hidden_state)


# ------------------------------------------------------------------------------------------- family


@family("bart", "pegasus")
def patch_bart(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    """Every encoder/decoder stack of the model (BartModel, *ForConditionalGeneration, *ForCausalLM's decoder,
    the classification and QA heads' base), and the ConditionalGeneration loss."""
    config = model.config
    pre_norm = config.model_type == "pegasus"
    approximate = gelu_approximate(config.activation_function) if opts.mlp else None
    base = model.base_model
    stacks = [getattr(base, name) for name in ("encoder", "decoder") if hasattr(base, name)]
    for stack in stacks:
        if opts.norms or approximate is not None:
            for layer in stack.layers:
                patcher.set_method(layer, "forward", checkpointable(layer_forward), pre_norm=pre_norm,
                                   fused=opts.norms, approximate=approximate,
                                   fp16_clamp=FP16_CLAMP[config.model_type])
        if opts.norms:
            if pre_norm:  # the first norm of each layer (the others are fused into _add_norm)
                for layer in stack.layers:
                    patcher.set_method(layer.self_attn_layer_norm, "forward", layer_norm_forward)
            for name in ("layernorm_embedding", "layer_norm"):
                if isinstance(getattr(stack, name, None), nn.LayerNorm):
                    patcher.set_method(getattr(stack, name), "forward", layer_norm_forward)
    if opts.attention:
        use_ptm_attention(model, patcher)
    if opts.loss and type(model).__name__.endswith("ForConditionalGeneration"):
        set_forward(patcher, model, conditional_generation_forward)
