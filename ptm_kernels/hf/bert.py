"""`hf.apply` for the BERT family: BERT, RoBERTa and ELECTRA (one block structure), ALBERT and DistilBERT.

What a patched model does differently (the same math, fewer and fused passes):

- **MLM loss on the labelled rows** (`loss=True`): a patched `*ForMaskedLM.forward` given `labels` runs the
  prediction head and the cross-entropy on the rows whose label is not -100 only (`ptm_kernels.mlm_loss`),
  and returns **`logits=None`** (the `[B, L, vocab]` logits are never computed, as in Liger-Kernel). Without
  labels it returns the logits as before.
- **Unpadded encoder** (`attention=True`): with labels, the embeddings of the real
  tokens (attention_mask == 1) are packed into one sequence and every layer runs on those rows only; attention
  keeps the sequences apart with `AttentionMask.segments`. The padded rows are not computed at all, which is
  only allowed because no labelled row is a padded one (if one is, the padded path below runs instead).
  Elsewhere (`BertModel`, classification heads, MLM without labels) the layers run on the padded batch with
  `ptm_kernels.attention` and the attention_mask as a key-padding part: every output row is computed, as in
  transformers. Attention weights are not returned (None per layer, as with transformers' SDPA).
- **Fused residual + LayerNorm** (`norms=True`): `LayerNorm(dropout(dense(x)) + residual)` in one kernel.
- **bias + GELU** (`mlp=True`): `gelu(x W^T + b)` with the bias added inside the GELU kernel, when
  `hidden_act` is a GELU the kernel computes (exact or tanh form); any other activation runs as before.

ALBERT and DistilBERT get the same: their attention goes through transformers' attention interface, so
`attention=True` sets it to "ptm" (key padding from the mask interface, segments when unpadded); their layers
get the fused residual + LayerNorm and bias + GELU (ALBERT's shared layers are patched once for every depth).

Refused for BERT/RoBERTa/ELECTRA (ValueError naming the field): `is_decoder`, `add_cross_attention`,
`position_embedding_type` other than "absolute" (relative_key variants change the attention scores).
The no-label corner: a batch with no labelled row gives a loss of 0 with zero gradients (`mlm_loss`), where
transformers gives NaN.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, NamedTuple, Optional

from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.attention_mask import AttentionMask

from .activations import gelu_approximate
from .llama import use_ptm_attention
from .patching import Patcher, PatchOptions, checkpointable, family

IGNORE_INDEX = -100  # transformers' CrossEntropyLoss default: labels -100 take no part in the loss


def set_forward(patcher: Patcher, module: nn.Module, fn: Callable, **bound) -> None:
    """Replace `module.forward` by `fn(module, *args, **bound, **kwargs)` (recorded for revert). A partial, not
    a closure, so that copy.deepcopy of a patched model binds the copy's modules. It shows the signature of the
    forward it replaces: transformers.Trainer keeps only the dataset columns that forward's signature names."""
    forward = functools.partial(fn, module, **bound)
    forward.__signature__ = inspect.signature(module.forward)
    patcher.set(module, "forward", forward)


def original_forward(module: nn.Module, *args, **kwargs):
    """The class's forward: what transformers would run (the fallback for calls a patch does not cover)."""
    return type(module).forward(module, *args, **kwargs)


def check_config(config, **refused) -> None:
    """Raise naming each field in `refused` (field -> allowed value) whose value changes the math."""
    for field, allowed in refused.items():
        value = getattr(config, field, allowed)
        if value != allowed:
            raise ValueError(f"ptm_kernels.hf.apply: {config.model_type} with config.{field}={value!r} is not "
                             f"supported (only {allowed!r}); the patched model would compute something else")


# ------------------------------------------------------------------------------- the patched forwards


def self_attention_forward(self, hidden_states: Tensor, attention_mask=None, cache=None, **kwargs):
    """BertSelfAttention (and the RoBERTa/ELECTRA copies) on ptm_kernels.attention, for an AttentionMask."""
    if not isinstance(attention_mask, AttentionMask) or cache is not None:
        return original_forward(self, hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)  # [B, L, H, Dh]
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
    out = pk.attention(q, k, v, attention_mask, scale=self.scaling,
                       dropout_p=self.dropout.p if self.training else 0.0)
    return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None


def dense_residual_norm_forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(x)) + residual), the add fused into the norm."""
    h = self.dropout(self.dense(hidden_states))
    norm = self.LayerNorm
    return pk.layer_norm(h, norm.weight, norm.bias, norm.eps, residual=input_tensor)[0]


def dense_bias_gelu_forward(self, hidden_states: Tensor, *, approximate: str) -> Tensor:
    """BertIntermediate: gelu(x W^T + b), the bias added inside the GELU kernel."""
    h = nn.functional.linear(hidden_states, self.dense.weight)
    return pk.bias_gelu(h, self.dense.bias, approximate) if self.dense.bias is not None else pk.gelu(h, approximate)


def key_padding_masks(self, attention_mask=None, encoder_attention_mask=None, **kwargs):
    """BertModel._create_attention_masks for an encoder: the 2-D attention_mask as an analytic key-padding part
    (no [B, 1, L, L] tensor). Other masks (4-D, ...) go through transformers as before."""
    if encoder_attention_mask is None and (attention_mask is None or attention_mask.dim() == 2):
        return (AttentionMask() if attention_mask is None else AttentionMask.key_padding(mask=attention_mask)), None
    return type(self)._create_attention_masks(self, attention_mask=attention_mask,
                                              encoder_attention_mask=encoder_attention_mask, **kwargs)


# ------------------------------------------------------------------------------------------ MLM head


class MLMHead(NamedTuple):
    """Where a *ForMaskedLM keeps its parts: the encoder, the transform before the vocabulary projection, and
    that projection (whose weight and bias the fused loss reads)."""

    base: nn.Module
    transform: Optional[Callable[[Tensor], Tensor]]
    decoder: nn.Linear


def mlm_head(model: nn.Module) -> Optional[MLMHead]:
    """The MLM head of a *ForMaskedLM of the families here, else None."""
    if not type(model).__name__.endswith("ForMaskedLM"):
        return None
    kind = model.config.model_type
    if kind == "bert":
        return MLMHead(model.bert, model.cls.predictions.transform, model.cls.predictions.decoder)
    if kind == "roberta":
        head = model.lm_head  # RobertaLMHead.forward: decoder(layer_norm(gelu(dense(x))))
        return MLMHead(model.roberta, lambda x: head.layer_norm(pk.gelu(head.dense(x))), head.decoder)
    if kind == "electra":
        return MLMHead(model.electra, model.generator_predictions, model.generator_lm_head)
    if kind == "albert":
        head = model.predictions  # AlbertMLMHead.forward: decoder(layer_norm(act(dense(x))))
        return MLMHead(model.albert, lambda x: head.LayerNorm(head.activation(head.dense(x))), head.decoder)
    if kind == "distilbert":
        return MLMHead(model.distilbert,
                       lambda x: model.vocab_layer_norm(model.activation(model.vocab_transform(x))),
                       model.vocab_projector)
    return None


def packed_encoder(base: nn.Module, input_ids, attention_mask: Tensor, token_type_ids=None, position_ids=None,
                   inputs_embeds=None):
    """The last hidden states of the real tokens only, [T, D], and their flat indices into [B * L].

    The embeddings run on the padded batch (positions and token types stay where transformers puts them), then
    the rows with attention_mask == 1 are packed into one sequence of T tokens that the layers process with
    the sequences kept apart by segment ids.
    """
    if base.config.model_type == "distilbert":  # no token types; the stack is called `transformer`
        emb, encoder = base.embeddings(input_ids, inputs_embeds, position_ids), base.transformer
    else:
        emb = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                              inputs_embeds=inputs_embeds)
        if hasattr(base, "embeddings_project"):  # ELECTRA with embedding_size != hidden_size
            emb = base.embeddings_project(emb)
        encoder = base.encoder
    B, L, D = emb.shape
    rows = attention_mask.reshape(-1).nonzero().squeeze(1)  # [T] flat indices of the real tokens
    packed = emb.reshape(B * L, D).index_select(0, rows).unsqueeze(0)  # [1, T, D]
    mask = AttentionMask.segments((rows // L).unsqueeze(0))  # a token sees the tokens of its own sequence
    return encoder(packed, attention_mask=mask).last_hidden_state[0], rows


EMBEDDING_INPUTS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")
# Trainer passes num_items_in_batch (with gradient accumulation); transformers' MLM and seq2seq losses are means
# that do not read it, and neither do the patched ones.
IGNORED_BY_THE_LOSS = ("num_items_in_batch",)


def masked_lm_forward(self, input_ids=None, *args, pack: bool, **kwargs):
    """*ForMaskedLM.forward: with labels, the loss from the labelled rows only and logits=None.

    Calls with anything else than the embedding inputs, attention_mask and labels (other positional
    arguments, encoder states, output_hidden_states, ...) run transformers' forward unchanged."""
    from transformers.modeling_outputs import MaskedLMOutput

    labels, attention_mask = kwargs.get("labels"), kwargs.get("attention_mask")
    known = {"labels", "attention_mask", "return_dict", *IGNORED_BY_THE_LOSS, *EMBEDDING_INPUTS}
    if args or labels is None or any(v is not None and v is not False for k, v in kwargs.items() if k not in known):
        return original_forward(self, input_ids, *args, **kwargs)
    head = mlm_head(self)
    inputs = {k: kwargs.get(k) for k in EMBEDDING_INPUTS[1:]}
    labels = labels.reshape(-1)
    can_pack = (pack and attention_mask is not None and attention_mask.dim() == 2
                and not bool(((attention_mask.reshape(-1) == 0) & (labels != IGNORE_INDEX)).any()))
    if can_pack:
        hidden, rows = packed_encoder(head.base, input_ids, attention_mask, **inputs)
        labels = labels.index_select(0, rows.to(labels.device))
    else:
        hidden = head.base(input_ids, attention_mask=attention_mask,
                           **{k: v for k, v in inputs.items() if v is not None}).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
    loss = pk.mlm_loss(hidden, labels.to(hidden.device), head.transform, head.decoder.weight, head.decoder.bias,
                       ignore_index=IGNORE_INDEX)
    return MaskedLMOutput(loss=loss, logits=None)


# ------------------------------------------------------------------------------------------ families


@family("bert", "roberta", "electra")
def patch_bert(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    """BERT, RoBERTa, ELECTRA: the same encoder layer (attention.self / attention.output / intermediate /
    output); see the module docstring."""
    config = model.config
    check_config(config, is_decoder=False, add_cross_attention=False, position_embedding_type="absolute")
    base = model.base_model
    approximate = gelu_approximate(config.hidden_act)
    if opts.attention:
        patcher.set(base, "_create_attention_masks", functools.partial(key_padding_masks, base))
    for layer in base.encoder.layer:
        if opts.attention:
            set_forward(patcher, layer.attention.self, self_attention_forward)
        if opts.norms:
            set_forward(patcher, layer.attention.output, dense_residual_norm_forward)
            set_forward(patcher, layer.output, dense_residual_norm_forward)
        if opts.mlp and approximate is not None:
            set_forward(patcher, layer.intermediate, dense_bias_gelu_forward, approximate=approximate)
    if opts.loss and mlm_head(model) is not None:
        set_forward(patcher, model, masked_lm_forward, pack=opts.attention)


@family("albert", "distilbert")
def patch_albert_distilbert(model: nn.Module, opts: PatchOptions, patcher: Patcher) -> None:
    """ALBERT, DistilBERT: attention through the "ptm" attention interface (both call transformers' interface),
    the residual adds fused into their LayerNorms, bias+GELU, and the labelled-rows MLM loss (unpadded with
    attention=True)."""
    config = model.config
    base = model.base_model
    albert = config.model_type == "albert"
    approximate = gelu_approximate(config.hidden_act if albert else config.activation) if opts.mlp else None
    if albert:  # the layers of a group are shared by several depths: patching the instance patches them all
        for group in base.encoder.albert_layer_groups:
            for layer in group.albert_layers:
                if opts.norms:
                    set_forward(patcher, layer.attention, albert_attention_forward)
                if opts.norms or approximate is not None:
                    set_forward(patcher, layer, albert_layer_forward, fused=opts.norms, approximate=approximate)
    elif opts.norms or approximate is not None:
        for block in base.transformer.layer:
            patcher.set_method(block, "forward", checkpointable(distilbert_block_forward), fused=opts.norms,
                               approximate=approximate)
    if opts.attention:
        use_ptm_attention(model, patcher)
    if opts.loss and mlm_head(model) is not None:
        set_forward(patcher, model, masked_lm_forward, pack=opts.attention)


def _add_norm(x: Tensor, residual: Tensor, norm: nn.LayerNorm, fused: bool) -> Tensor:
    """norm(x + residual): one kernel when fused, else transformers' add and norm module."""
    if fused:
        return pk.layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)[0]
    return norm(x + residual)


def _linear_act(linear: nn.Linear, activation: Callable, x: Tensor, approximate: Optional[str]) -> Tensor:
    """activation(linear(x)), the bias added inside the GELU kernel when `approximate` is set."""
    if approximate is None:
        return activation(linear(x))
    h = nn.functional.linear(x, linear.weight)
    return pk.bias_gelu(h, linear.bias, approximate) if linear.bias is not None else pk.gelu(h, approximate)


def albert_attention_forward(self, hidden_states: Tensor, attention_mask=None, **kwargs):
    """AlbertAttention: transformers' attention interface, then LayerNorm(dropout(dense(out)) + x) fused."""
    modeling = sys.modules[type(self).__module__]
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value))
    interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                               modeling.eager_attention_forward)
    out, weights = interface(self, q, k, v, attention_mask, scaling=self.scaling,
                             dropout=self.attention_dropout.p if self.training else 0.0, **kwargs)
    out = self.output_dropout(self.dense(out.reshape(*hidden_states.shape[:-1], -1)))
    return _add_norm(out, hidden_states, self.LayerNorm, True), weights


def albert_layer_forward(self, hidden_states: Tensor, attention_mask=None, *, fused: bool,
                         approximate: Optional[str], **kwargs) -> Tensor:
    """AlbertLayer: full_layer_layer_norm(ffn_output(act(ffn(a))) + a), in one pass (transformers' feed-forward
    chunking, `chunk_size_feed_forward`, computes the same rows in pieces)."""
    attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
    h = self.ffn_output(_linear_act(self.ffn, self.activation, attention_output, approximate))
    return _add_norm(h, attention_output, self.full_layer_layer_norm, fused)


def distilbert_block_forward(self, hidden_states: Tensor, attention_mask=None, *, fused: bool,
                             approximate: Optional[str], **kwargs) -> Tensor:
    """DistilBERT's TransformerBlock with both residual adds fused into their LayerNorms and bias+GELU."""
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    attention_output = _add_norm(attention_output, hidden_states, self.sa_layer_norm, fused)
    ffn = self.ffn
    h = ffn.dropout(ffn.lin2(_linear_act(ffn.lin1, ffn.activation, attention_output, approximate)))
    return _add_norm(h, attention_output, self.output_layer_norm, fused)
