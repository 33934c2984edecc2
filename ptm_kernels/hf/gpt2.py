"""`hf.apply` for GPT-2 and GPT-Neo (pre-LayerNorm blocks, learned positions, bias + GELU MLP).

What a patched model does differently (the same math, fewer and fused passes):

- **norms**: `ln_1` and `ln_f` run `ptm_kernels.layer_norm`; the residual add after attention is fused into
  `ln_2` (and into `ln_cross_attn` when a GPT-2 block has cross-attention). The add after the MLP is the
  block's output and stays a plain add.
- **mlp**: `c_proj(bias_gelu(x @ W_fc, b_fc))`: the first projection's bias is added inside the GELU kernel.
  `activation_function` must be a GELU the kernel computes exactly: "gelu" (erf), "gelu_new" or
  "gelu_pytorch_tanh" (tanh form); any other is refused (ValueError naming the field; pass mlp=False).
- **attention**: GPT-2 uses transformers' attention interface, so its implementation becomes "ptm"
  (`scale_attn_weights` and `scale_attn_by_inverse_layer_idx` arrive as the scaling, `attn_pdrop` as the
  kernel's dropout; `reorder_and_upcast_attn` only changes transformers' eager path, and the kernel computes
  the scores in float32 anyway). GPT-Neo does not use the interface: its self-attention forward is replaced
  by one `ptm_kernels.attention` call with scale 1.0 (GPT-Neo does not scale), the model's causal/padding mask
  from the "ptm" mask function, and `sliding_window(window_size - 1, 0)` on its "local" layers.
  `output_attentions=True` raises (the kernel does not form the weights).
- **loss** (`GPT2LMHeadModel`, `GPTNeoForCausalLM`): with `labels`, fused linear cross-entropy and
  **`logits=None`**, exactly as for Llama (see `llama.py`).

There is no rotary embedding in these families: `rope` has nothing to patch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import ptm_kernels as pk

from . import attention as hf_attention
from .activations import GELU_APPROXIMATE, gelu_approximate
from .llama import patch_causal_lm_loss, use_ptm_attention
from .patching import Patcher, PatchOptions, checkpointable, family, refuse


@family("gpt2", "gpt_neo")
def patch_gpt2(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    config = model.config
    base = model.base_model
    if not hasattr(base, "h") or not hasattr(base, "ln_f"):
        refuse(config, "model_type", f"a {type(model).__name__} without .h/.ln_f: not the structure of "
                                     f"transformers' {config.model_type} models")
    approximate = gelu_approximate(config.activation_function)
    if opts.mlp and approximate is None:
        refuse(config, "activation_function", f"{config.activation_function!r}: the fused bias+GELU does "
                                              f"{sorted(GELU_APPROXIMATE)}; pass mlp=False to keep transformers' MLP")
    neo = config.model_type == "gpt_neo"
    for block in base.h:
        if opts.norms:
            patcher.set_method(block, "forward", checkpointable(neo_block_forward if neo else gpt2_block_forward))
            patcher.set_method(block.ln_1, "forward", layer_norm_forward)
        if opts.mlp:
            patcher.set_method(block.mlp, "forward", bias_gelu_mlp_forward, conv1d=not neo,
                               approximate=approximate, linear=opts.linear)
        if opts.attention and neo:
            attn = block.attn.attention
            window = config.window_size - 1 if attn.attention_type == "local" else None
            patcher.set_method(attn, "forward", neo_attention_forward, window=window)
    if opts.norms:
        patcher.set_method(base.ln_f, "forward", layer_norm_forward)
    if opts.attention:
        if neo:  # GPT-Neo ignores set_attn_implementation; the name only selects our mask function
            hf_attention.register()
            old = config._attn_implementation
            config._attn_implementation = hf_attention.NAME
            patcher.on_undo(lambda: setattr(config, "_attn_implementation", old))
        else:
            use_ptm_attention(model, patcher)
    if opts.loss and hasattr(model, "lm_head") and type(model).__name__ in ("GPT2LMHeadModel", "GPTNeoForCausalLM"):
        patch_causal_lm_loss(model, patcher, hidden=lambda outputs: outputs[0])


def layer_norm_forward(self, x: Tensor) -> Tensor:
    return pk.layer_norm(x, self.weight, self.bias, self.eps)


def _add_norm(x: Tensor, residual: Tensor, norm: nn.LayerNorm):
    """(norm(x + residual), x + residual) in one kernel."""
    return pk.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)


def gpt2_block_forward(self, hidden_states: Tensor, cache=None, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, use_cache=False, **kwargs) -> Tensor:
    """transformers' GPT2Block with the residual adds fused into the following LayerNorm."""
    residual = hidden_states
    out, _ = self.attn(self.ln_1(hidden_states), cache=cache, attention_mask=attention_mask, use_cache=use_cache,
                       **kwargs)
    if encoder_hidden_states is not None:
        if not hasattr(self, "crossattention"):
            raise ValueError(f"If `encoder_hidden_states` are passed, {self} has to be instantiated with "
                             "cross-attention layers by setting `config.add_cross_attention=True`")
        hidden_states, residual = _add_norm(out, residual, self.ln_cross_attn)
        out, _ = self.crossattention(hidden_states, cache=cache, attention_mask=attention_mask,
                                     encoder_hidden_states=encoder_hidden_states,
                                     encoder_attention_mask=encoder_attention_mask)
    hidden_states, residual = _add_norm(out, residual, self.ln_2)
    return residual + self.mlp(hidden_states)


def neo_block_forward(self, hidden_states: Tensor, layer_past=None, attention_mask=None, use_cache=False,
                      output_attentions=False, **kwargs):
    """transformers' GPTNeoBlock (returns (hidden, attention weights)) with the residual add fused into ln_2."""
    residual = hidden_states
    out, weights = self.attn(self.ln_1(hidden_states), layer_past=layer_past, attention_mask=attention_mask,
                             use_cache=use_cache, output_attentions=output_attentions)
    hidden_states, residual = _add_norm(out, residual, self.ln_2)
    return residual + self.mlp(hidden_states), weights


def bias_gelu_mlp_forward(self, x: Tensor, conv1d: bool = True, approximate: str = "none",
                          linear: bool = False) -> Tensor:
    """c_proj(gelu(c_fc(x))) with c_fc's bias inside the GELU. GPT-2's Conv1D keeps its weight as [in, out].
    linear: c_fc's product through pk.linear (apply's linear=True: hf/linear.py), else torch's."""
    fc = self.c_fc
    w = fc.weight.t() if conv1d else fc.weight
    h = pk.linear(x, w) if linear else nn.functional.linear(x, w)
    h = pk.bias_gelu(h, fc.bias, approximate) if fc.bias is not None else pk.gelu(h, approximate)
    return self.dropout(self.c_proj(h))


def neo_attention_forward(self, hidden_states: Tensor, attention_mask=None, layer_past=None, use_cache=False,
                          output_attentions=False, window=None, **kwargs):
    """GPTNeoSelfAttention on ptm_kernels.attention: unscaled scores, causal (+ local window) and padding."""
    if output_attentions:
        raise ValueError("hf.apply(attention=True) on GPT-Neo does not return attention weights "
                         "(output_attentions=True); pass attention=False")
    q = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
    k = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
    v = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_id)
    mask = attention_mask if isinstance(attention_mask, pk.AttentionMask) else _neo_mask(attention_mask)
    mask = mask & pk.AttentionMask.causal()  # GPT-Neo's own tril buffer, bottom-right aligned like ours
    if window is not None:
        mask = mask & pk.AttentionMask.sliding_window(window, 0)
    p = self.attn_dropout.p if self.training else 0.0
    out = pk.attention(q, k, v, mask, scale=1.0, dropout_p=p)
    out = self._merge_heads(out, self.num_heads, self.head_dim)
    return self.resid_dropout(self.out_proj(out)), None


def _neo_mask(attention_mask) -> pk.AttentionMask:
    """A mask not made by our mask function (none, or a 4-D one the user passed), taken as eager takes it."""
    if attention_mask is None:
        return pk.AttentionMask()
    if attention_mask.dtype == torch.bool:
        return pk.AttentionMask.dense(attention_mask)
    return pk.AttentionMask.bias(attention_mask)  # eager adds it to the scores
