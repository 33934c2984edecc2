"""`hf.apply` for Llama, Mistral and Qwen2 (one decoder structure: pre-RMSNorm, RoPE, SwiGLU MLP, GQA).

What a patched model does differently (the same math, fewer and fused passes):

- **norms**: every RMSNorm runs `ptm_kernels.rms_norm`; in each decoder layer the residual add after attention
  is fused into `post_attention_layernorm` (`h, residual = rms_norm(attn_out, w, residual=residual)`). The add
  after the MLP is the layer's output, so it stays a plain add (the next layer's input norm cannot see it
  without changing what a layer returns).
- **rope**: q and k are rotated by `ptm_kernels.rope` in one call, from the cos/sin that the model's own rotary
  module computed. Every `rope_scaling` type transformers implements (linear, dynamic, yarn, llama3, longrope)
  therefore carries over unchanged, attention scaling included.
- **mlp**: `down_proj(swiglu(gate_proj(x), up_proj(x)))`, or `geglu` for a GELU `hidden_act`. Any other
  `hidden_act` is refused (ValueError naming `config.hidden_act`); use `mlp=False` to keep transformers' MLP.
- **attention**: the model's attention implementation becomes "ptm" (see `ptm_kernels/hf/attention.py`):
  causal, padding, Mistral/Qwen2 sliding windows and packed sequences as analytic mask parts.
- **loss** (`*ForCausalLM` only): given `labels`, the lm_head and the cross-entropy run as one
  `ptm_kernels.linear_cross_entropy`: the [tokens, vocab] logits never exist and **`logits` is None** in the
  output (as in Liger-Kernel). Without labels, logits are computed as before. Label shift, `ignore_index=-100`,
  `shift_labels` and `num_items_in_batch` (sum, then divided: gradient accumulation) follow transformers'
  `ForCausalLMLoss`; `logits_to_keep` slices the hidden states first, as there. A model whose `loss_function`
  was replaced is refused.

Honoured for free because the patched code calls the model's own modules: `attention_bias` and `mlp_bias`
(Linear biases, Qwen2's q/k/v biases), `head_dim`, GQA, `attention_dropout` (the kernel's dropout),
`tie_word_embeddings`, `rms_norm_eps`; the sliding windows of Mistral and Qwen2 (`sliding_window`,
`layer_types`) come through the mask transformers builds. `pretraining_tp` changes nothing in transformers 5's
Llama forward (only the config keeps it), so there is nothing to refuse.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor, nn

import ptm_kernels as pk

from ..ops.rope import rope_at_positions
from . import attention as hf_attention
from .activations import gated, gated_names
from .patching import Patcher, PatchOptions, checkpointable, family, refuse



@family("llama", "mistral", "qwen2")
def patch_llama(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    config = model.config
    base = model.base_model
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "norm"):
        refuse(config, "model_type", f"a {type(model).__name__} without .layers/.norm: not the structure of "
                                     f"transformers' {config.model_type} models")
    if opts.mlp and gated(config.hidden_act) is None:
        refuse(config, "hidden_act", f"{config.hidden_act!r}: the fused gated MLP does {gated_names()}; "
                                     f"pass mlp=False to keep transformers' MLP")
    for layer in layers:
        if opts.norms:
            patcher.set_method(layer, "forward", checkpointable(decoder_layer_forward))
            patcher.set_method(layer.input_layernorm, "forward", rms_norm_forward)
        if opts.rope:
            patcher.set_method(layer.self_attn, "forward", attention_forward,
                               window_kwargs=_window_kwargs(config, layer.self_attn))
        if opts.mlp:
            patcher.set_method(layer.mlp, "forward", gated_mlp_forward, act=gated(config.hidden_act))
    if opts.norms:
        patcher.set_method(base.norm, "forward", rms_norm_forward)
    if opts.attention:
        use_ptm_attention(model, patcher)
    if opts.loss and hasattr(model, "lm_head") and type(model).__name__.endswith("ForCausalLM"):
        patch_causal_lm_loss(model, patcher, hidden=lambda outputs: outputs.last_hidden_state)


# ------------------------------------------------------------------------------------- shared patches


def use_ptm_attention(model: nn.Module, patcher: Patcher) -> None:
    """attn_implementation "ptm" for the model; revert restores the one it had."""
    hf_attention.register()
    old = model.config._attn_implementation
    model.set_attn_implementation(hf_attention.NAME)
    patcher.on_undo(lambda: model.set_attn_implementation(old))


def patch_causal_lm_loss(model: nn.Module, patcher: Patcher, hidden) -> None:
    """Replace `model.forward`: with labels, hidden states -> fused linear cross-entropy, logits None.
    `hidden(outputs)` picks the final hidden states from the base model's output."""
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        raise ValueError(f"hf.apply(loss=True): {type(model).__name__} has a custom loss_function / loss_type "
                         f"{getattr(model, 'loss_type', None)!r}; the fused loss reproduces ForCausalLMLoss only. "
                         f"Pass loss=False")
    head = model.lm_head
    if not isinstance(head, nn.Linear):
        raise ValueError(f"hf.apply(loss=True): lm_head is a {type(head).__name__}, not nn.Linear; pass loss=False")
    if "forward" in model.__dict__:
        raise ValueError(f"hf.apply(loss=True): {type(model).__name__}.forward is already replaced on this "
                         f"instance (by another patch); pass loss=False")
    # wraps: inspect.signature(model.forward) stays the class's; generate and Trainer read it to pick the
    # inputs they pass (position_ids for left padding, num_items_in_batch)
    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return causal_lm_forward(self, *args, hidden=hidden, **kwargs)

    patcher.set_method(model, "forward", forward)


def causal_lm_forward(self, *args, labels: Optional[Tensor] = None, hidden=None, **kwargs):
    """transformers' *ForCausalLM forward; with labels the loss is fused and logits is None."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    if labels is None:  # the class's own forward (not a bound method: copy.deepcopy(model) stays correct)
        return type(self).forward(self, *args, **kwargs)
    if args:  # positional inputs, named as the class's forward names them
        named = inspect.signature(type(self).forward).bind_partial(self, *args).arguments
        named.pop("self")
        kwargs = {**named, **kwargs}
    return_dict = kwargs.pop("return_dict", None)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    # the loss kwargs transformers passes next to the model's (Trainer: num_items_in_batch)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.base_model(**kwargs)
    h = slice_logits_to_keep(hidden(outputs), logits_to_keep)
    loss = causal_lm_loss(h, self.lm_head, labels, num_items_in_batch=num_items_in_batch,
                          shift_labels=shift_labels, ignore_index=ignore_index)
    out = CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                 hidden_states=getattr(outputs, "hidden_states", None),
                                 attentions=getattr(outputs, "attentions", None))
    if return_dict is False:
        return out.to_tuple()
    return out


def causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, *, num_items_in_batch=None,
                   shift_labels: Optional[Tensor] = None, ignore_index: int = -100) -> Tensor:
    """transformers' ForCausalLMLoss(lm_head(hidden), labels) without the logits: predict token t + 1 from t."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = pk.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels, head.bias,
                                   ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ----------------------------------------------------------------------------------- the new forwards


def rms_norm_forward(self, hidden_states: Tensor) -> Tensor:
    return pk.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def decoder_layer_forward(self, hidden_states: Tensor, attention_mask=None, position_ids=None, cache=None,
                          use_cache=False, position_embeddings=None, **kwargs) -> Tensor:
    """The HF decoder layer with the residual add fused into post_attention_layernorm."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    attn_out, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                 position_ids=position_ids, cache=cache, use_cache=use_cache,
                                 position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    hidden_states, residual = pk.rms_norm(attn_out, norm.weight, norm.variance_epsilon, residual=residual)
    return residual + self.mlp(hidden_states)


def gated_mlp_forward(self, x: Tensor, act=None) -> Tensor:
    return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


def _window_kwargs(config, attn: nn.Module) -> dict:
    """What the model's own attention forward passes to the attention interface besides the mask."""
    if hasattr(attn, "sliding_window"):  # Qwen2: per layer
        return {"sliding_window": attn.sliding_window}
    if config.model_type == "mistral":
        return {"sliding_window": getattr(config, "sliding_window", None)}
    return {}


def attention_forward(self, hidden_states: Tensor, position_embeddings=None, attention_mask=None, cache=None,
                      window_kwargs=None, **kwargs):
    """The HF Llama/Mistral/Qwen2 attention forward with q and k rotated by ptm_kernels.rope."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    q, k = rope(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager(self))
    out, weights = interface(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **window_kwargs, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _eager(attn: nn.Module):
    import sys
    return sys.modules[type(attn).__module__].eager_attention_forward


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor):
    """Rotate q, k [B, H, L, D] by the model's cos/sin [B|1, L, D] (rotate-half: cos = cat(c, c))."""
    D = q.shape[-1]
    if cos.shape[-1] != D:
        raise ValueError(f"hf.apply(rope=True): cos/sin of width {cos.shape[-1]} for head dim {D}: partial "
                         f"rotary is not this family's layout; pass rope=False")
    half = D // 2
    return rope_at_positions(q, k, cos[..., :half], sin[..., :half])
