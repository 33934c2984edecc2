"""LLaMA (Touvron et al., 2023): pre-norm RMSNorm blocks, rotary positions, grouped-query attention, SwiGLU
MLP, no biases, untied LM head (tie_word_embeddings if a config asks for it).

The same network, with a config field or two more, is transformers' Mistral (a sliding window of
`sliding_window` keys in every layer) and Qwen2 (biases on q/k/v; sliding windows in the layers that
`layer_types` names "sliding_attention"): `Llama.from_hf` takes LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM, and `to_hf` gives back the class it came from (`model_type`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional

from ptm_kernels.nn import RMSNorm
from ptm_kernels.ops.rope import ROPE_TYPES

from . import activations
from .convert import config_kwargs
from .blocks import MLP, Attention, Block
from .decoder_blocks import DecoderLM
from .rotary import Rotary

# model_type -> (transformers config class, model class)
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None  # < num_attention_heads: grouped-query attention
    head_dim: Optional[int] = None  # hidden_size // num_attention_heads
    hidden_act: str = "silu"  # transformers' name (models.activations): silu makes the MLP a SwiGLU
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # transformers' rope scaling (rope_type linear, dynamic, llama3 or yarn, and that type's keys); None: plain
    rope_scaling: Optional[dict] = None
    rms_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v (LLaMA's attention_bias; always in Qwen2)
    out_bias: bool = False  # a bias on the output projection (LLaMA's attention_bias; never in Qwen2)
    mlp_bias: bool = False
    pad_token_id: Optional[int] = None  # the embedding's padding row (it gets no gradient, as in transformers)
    # per layer: a causal window of this many keys (the query and the ones before it), None: full causal
    sliding_windows: Optional[List[Optional[int]]] = None
    model_type: str = "llama"  # which transformers twin: llama, mistral or qwen2

    @classmethod
    def from_hf(cls, hf_config):
        model_type = getattr(hf_config, "model_type", "llama")
        if model_type not in HF_CLASSES:
            raise NotImplementedError(f"LLaMA from a {model_type!r} config (only {sorted(HF_CLASSES)})")
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        kind = rope.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise NotImplementedError(f"LLaMA with config field rope_parameters rope_type={kind!r} "
                                      f"(supported: {ROPE_TYPES})")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError(f"LLaMA with config field rope_parameters partial_rotary_factor="
                                      f"{rope['partial_rotary_factor']} (LLaMA rotates the whole head)")
        activations.check(hf_config.hidden_act, "hidden_act")
        kw = config_kwargs(cls, hf_config)
        kw["rope_theta"] = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        kw["rope_scaling"] = rope if kind != "default" else None
        kw["model_type"] = model_type
        n = hf_config.num_hidden_layers
        if model_type == "llama":
            kw["qkv_bias"] = kw["out_bias"] = bool(hf_config.attention_bias)
        elif model_type == "qwen2":
            kw["qkv_bias"] = True
            kw["sliding_windows"] = [hf_config.sliding_window if kind == "sliding_attention" else None
                                     for kind in hf_config.layer_types]
        else:  # mistral: one window in every layer, or none
            kw["sliding_windows"] = [hf_config.sliding_window] * n
        return cls(**kw)

    def to_hf(self):
        import transformers

        kw = dataclasses.asdict(self)
        kw["rope_parameters"] = {"rope_type": "default", **(kw.pop("rope_scaling") or {}),
                                 "rope_theta": kw.pop("rope_theta")}
        # explicit: transformers' defaults for None differ between the three (Mistral: 8 key/value heads)
        kw["head_dim"] = self.head_dim or self.hidden_size // self.num_attention_heads
        kw["num_key_value_heads"] = self.num_key_value_heads or self.num_attention_heads
        qkv_bias, out_bias, windows = kw.pop("qkv_bias"), kw.pop("out_bias"), kw.pop("sliding_windows")
        model_type = kw.pop("model_type")
        windows = windows or [None] * self.num_hidden_layers
        if model_type == "llama":
            if qkv_bias != out_bias or any(windows):
                raise ValueError("transformers' LLaMA has biases on all of q, k, v, o or none, and no sliding window")
            kw["attention_bias"] = qkv_bias
        else:
            if kw.pop("mlp_bias") or out_bias or qkv_bias != (model_type == "qwen2"):
                raise ValueError(f"transformers' {model_type} has no MLP or output bias, and q/k/v biases only in "
                                 "qwen2")
            window = next((w for w in windows if w is not None), None)
            if model_type == "mistral":
                if len(set(windows)) > 1:
                    raise ValueError("transformers' Mistral has one sliding window for every layer")
                kw["sliding_window"] = window
            else:
                kw.update(use_sliding_window=window is not None, sliding_window=window,
                          layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
                if len({w for w in windows if w is not None}) > 1:
                    raise ValueError("transformers' Qwen2 has one sliding window size")
        return getattr(transformers, HF_CLASSES[model_type][0])(**kw)


class Llama(DecoderLM):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        c = self.config = config
        d = c.hidden_size
        head_dim = c.head_dim or d // c.num_attention_heads
        rotary = Rotary(head_dim, c.max_position_embeddings,  # shared by the layers
                        {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta})
        blocks = [Block(
            Attention(d, c.num_attention_heads, c.num_key_value_heads, head_dim, qkv_bias=c.qkv_bias,
                      out_bias=c.out_bias, dropout=c.attention_dropout, rotary=rotary),
            MLP(d, c.intermediate_size, c.hidden_act, gated=True, bias=c.mlp_bias),
            RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps), pre_norm=True)
            for _ in range(c.num_hidden_layers)]
        super().__init__(c.vocab_size, d, blocks, RMSNorm(d, c.rms_norm_eps), tie_embeddings=c.tie_word_embeddings,
                         windows=c.sliding_windows, padding_idx=c.pad_token_id)

    @property
    def hf_class(self) -> str:
        return HF_CLASSES[self.config.model_type][1]

    # ------------------------------------------------------------------------------ transformers weights

    def hf_mapping(self):
        c = self.config
        m = [("wte.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
        for i in range(c.num_hidden_layers):
            a, b = f"blocks.{i}.", f"model.layers.{i}."
            att = b + "self_attn."
            m += [(a + "norm1.weight", b + "input_layernorm.weight"),
                  (a + "attn.qkv.weight", (att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight")),
                  (a + "attn.out.weight", att + "o_proj.weight"),
                  (a + "norm2.weight", b + "post_attention_layernorm.weight")]
            if c.qkv_bias:
                m += [(a + "attn.qkv.bias", (att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias"))]
            if c.out_bias:
                m += [(a + "attn.out.bias", att + "o_proj.bias")]
            m += [(a + "mlp.gate.weight", b + "mlp.gate_proj.weight"), (a + "mlp.fc.weight", b + "mlp.up_proj.weight"),
                  (a + "mlp.proj.weight", b + "mlp.down_proj.weight")]
            if c.mlp_bias:
                m += [(a + "mlp.gate.bias", b + "mlp.gate_proj.bias"), (a + "mlp.fc_bias", b + "mlp.up_proj.bias"),
                      (a + "mlp.proj.bias", b + "mlp.down_proj.bias")]
        return m
