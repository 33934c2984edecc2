"""Conversion to and from transformers' twins of our models: weight mappings, and from_hf / to_hf built on them.

A mapping is a list of rows (our_key, hf_key) or (our_key, hf_key, transpose):
- hf_key may be a tuple of keys whose tensors are concatenated along dim 0 into ours (q, k, v -> one fused qkv
  projection); going back, the fused tensor is split in the sizes of the HF model's own tensors (uneven parts
  for grouped-query attention);
- transpose=True marks transformers' Conv1D weights (GPT, GPT-2), stored [in, out] where ours are [out, in].
The same list drives both directions and the gradient comparison in the tests, so a model states its mapping once.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

HFKey = Union[str, Tuple[str, ...]]
Mapping = List[tuple]  # rows (our_key, HFKey) or (our_key, HFKey, transpose)


def _rows(mapping: Mapping) -> Iterator[Tuple[str, Tuple[str, ...], bool]]:
    """Each row as (our key, its HF keys as a tuple, transpose)."""
    for ours, hf, *transpose in mapping:
        yield ours, (hf,) if isinstance(hf, str) else tuple(hf), bool(transpose and transpose[0])


def prefixed(mapping: Mapping, ours: str, hf: str) -> Mapping:
    """The mapping with a prefix put before every key on each side ('' leaves a side as it is)."""
    def pre(p, k):
        return p + k if isinstance(k, str) else tuple(p + x for x in k)
    return [(ours + o, pre(hf, h), *transpose) for o, h, *transpose in mapping]


def _in_our_layout(parts: Sequence[Tensor], transpose: bool) -> Tensor:
    t = torch.cat(list(parts)) if len(parts) > 1 else parts[0]
    return t.t() if transpose else t


# transformers buffers that are no weights: recomputed from the config, never read from a checkpoint
DERIVED_HF_BUFFERS: Dict[str, str] = {
    ".rotary_emb.inv_freq": "rotary frequencies, recomputed from the config (older transformers saved them)",
    ".position_ids": "an arange(max_positions) buffer",
    ".token_type_ids": "BERT's all-zero token type ids buffer",
    ".masked_bias": "GPT-2's and GPT-Neo's constant -1e4 of older transformers",
}
# older transformers' causal tril buffers (bool / uint8) under names that real biases end in too
CAUSAL_MASK_BUFFERS = (".attn.bias", ".attention.bias")


def _is_derived(key: str, tensor: Tensor) -> bool:
    if key.endswith(CAUSAL_MASK_BUFFERS):
        return tensor.dtype in (torch.bool, torch.uint8)
    return key.endswith(tuple(DERIVED_HF_BUFFERS))


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Tied names of one tensor (a tied LM head stored under both names)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def load_from_hf(model: nn.Module, hf_state: Dict[str, Tensor], mapping: Mapping,
                 own: Sequence[str] = (), derived: Sequence[str] = ()) -> nn.Module:
    """Copy the HF tensors into `model`; every parameter and buffer of ours must be covered, except those under
    the prefixes `own` (parts transformers does not have, e.g. SpanBERT's span boundary head), and every HF
    tensor must be read, except the derived buffers of DERIVED_HF_BUFFERS and the keys ending in one of
    `derived` (tables ours computes itself, e.g. Pegasus' sinusoids): a tensor nothing reads would be a part of
    the HF model that ours does not run (KeyError naming it).

    A tensor tied under several names (a tied LM head) is covered by a row for any of them, so a row whose HF
    tensors are absent is passed over: a checkpoint may store a tied head only as the embedding."""
    ours = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one object
    covered, absent, consumed, written = set(), [], set(), {}
    with torch.no_grad():
        for o, keys, transpose in _rows(mapping):
            if any(k not in hf_state for k in keys):
                absent += [k for k in keys if k not in hf_state]
                continue
            src = _in_our_layout([hf_state[k] for k in keys], transpose)
            if ours[o].shape != src.shape:
                raise ValueError(f"{o}: shape {tuple(ours[o].shape)} but {' + '.join(keys)} give {tuple(src.shape)}")
            if id(ours[o]) in covered and not torch.equal(ours[o], src.to(ours[o].dtype)):
                first = next(k for k in written if written[k] == id(ours[o]))
                raise ValueError(f"{o} is one tensor here but {first} and {' + '.join(keys)} differ in the HF model "
                                 "(its config field tie_word_embeddings=False?): untied weights are not supported")
            ours[o].copy_(src)
            covered.add(id(ours[o]))
            written[" + ".join(keys)] = id(ours[o])
            consumed.update(keys)
    missing = [k for k, t in ours.items() if id(t) not in covered and not k.startswith(tuple(own))]
    if missing:
        note = f" (absent from the HF state: {absent})" if absent else ""
        raise KeyError(f"no HF weight mapped to {missing}{note}")
    read = [hf_state[k] for k in consumed]
    unread = [k for k, t in hf_state.items() if k not in consumed and not _is_derived(k, t)
              and not k.endswith(tuple(derived)) and not any(_same_tensor(t, r) for r in read)]
    if unread:
        raise KeyError(f"HF tensors that the conversion does not read (the model would run without them): {unread}")
    return model


def hf_dtype(hf_model: nn.Module) -> torch.dtype:
    """The floating dtype of the HF model's parameters (float32 if it has none)."""
    dtypes = {p.dtype for p in hf_model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the HF model mixes parameter dtypes {sorted(map(str, dtypes))}: pass dtype= to from_hf")
    return dtypes.pop() if dtypes else torch.float32


def cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype), except the rotary cos/sin caches: they stay float32, as transformers computes them."""
    from ptm_kernels.nn import RotaryEmbedding

    rotary = [(m, m.cos, m.sin) for m in model.modules() if isinstance(m, RotaryEmbedding)]
    model.to(dtype)
    for m, cos, sin in rotary:
        m.cos, m.sin = cos, sin
    return model


def hf_state_from(model: nn.Module, mapping: Mapping,
                  like: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """Our weights under their HF names. A fused tensor is split back along dim 0 in the sizes of the tensors of
    `like` (the target HF state dict), else in equal parts."""
    ours = model.state_dict()
    out = {}
    for o, keys, transpose in _rows(mapping):
        t = ours[o].t() if transpose else ours[o]
        if len(keys) == 1:
            parts = (t,)
        elif like is not None:
            parts = t.split([like[k].shape[0] for k in keys])
        else:
            parts = t.chunk(len(keys))
        for k, p in zip(keys, parts):
            out[k] = p.clone(memory_format=torch.contiguous_format)
    return out


def load_into_hf(hf_model: nn.Module, model: nn.Module, mapping: Mapping,
                 derived: Sequence[str] = ()) -> nn.Module:
    """Write our weights into a freshly built HF model. Every HF tensor must be covered, except those whose keys
    end in one of `derived`: tensors transformers computes that are no weights of ours (Pegasus' sinusoids)."""
    target = hf_model.state_dict()
    mapped = {k for _, keys, _ in _rows(mapping) for k in keys}
    unknown = mapped - set(target)
    missing = {k for k in target if k not in mapped and not k.endswith(tuple(derived))}
    if unknown or missing:
        raise KeyError(f"mapping does not match the HF model: unknown {sorted(unknown)}, missing {sorted(missing)}")
    hf_model.load_state_dict(hf_state_from(model, mapping, like=target), strict=not derived)  # derived: as built
    return hf_model


def hf_tensors(hf_model: nn.Module, mapping: Mapping, what: str = "grad") -> Dict[str, Optional[Tensor]]:
    """For each of our keys, the HF parameter (what='data') or its gradient (what='grad') in our layout
    (concatenated, transposed like the weights): the tests compare our gradients with these. None where a
    gradient is missing."""
    params = hf_model.state_dict(keep_vars=True)

    def get(k):
        t = params[k]
        return t.detach() if what == "data" else t.grad

    out = {}
    for o, keys, transpose in _rows(mapping):
        parts = [get(k) for k in keys]
        out[o] = None if any(p is None for p in parts) else _in_our_layout(parts, transpose)
    return out


def refuse_unless(hf_config, model: str, **supported) -> None:
    """NotImplementedError naming the first config field whose value is not the supported one (fields the
    config lacks pass: older or other configs)."""
    for field, value in supported.items():
        if hasattr(hf_config, field) and getattr(hf_config, field) != value:
            raise NotImplementedError(f"{model} with config field {field}={getattr(hf_config, field)!r} "
                                      f"(only {value!r} is supported)")


def config_kwargs(dataclass_type, hf_config, renames: Sequence[Tuple[str, str]] = ()) -> dict:
    """Fields of our config dataclass read from an HF config (same names unless renamed: (ours, hf))."""
    names = dict(renames)
    kw = {}
    for f in dataclasses.fields(dataclass_type):
        hf_name = names.get(f.name, f.name)
        if hasattr(hf_config, hf_name):
            kw[f.name] = getattr(hf_config, hf_name)
    return kw


class HFTwin:
    """from_hf / to_hf for a model with a transformers twin (a mixin of an nn.Module).

    The model class names the transformers class (`hf_class`), states its weights' `hf_mapping()` and its
    `config_class`, whose `from_hf(hf_config)` and `to_hf()` translate the config; a model whose config needs
    more than the HF config overrides `config_from_hf` / `hf_config` instead."""

    hf_class: str = ""
    config_class = None
    hf_own: Tuple[str, ...] = ()  # prefixes of our weights that the transformers class lacks (kept as initialised)
    hf_derived: Tuple[str, ...] = ()  # endings of transformers keys that are no weights of ours (sinusoid tables)

    def hf_mapping(self) -> Mapping:
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, hf_model):
        return cls.config_class.from_hf(hf_model.config)

    @classmethod
    def build_like(cls, hf_model, config):
        """Our model for this config, with the optional parts the HF model has (BertModel's pooler)."""
        return cls(config)

    def hf_config(self):
        return self.config.to_hf()

    @classmethod
    def from_hf(cls, hf_model, dtype: Optional[torch.dtype] = None, **config_overrides):
        """Our model on the HF model's weights, in the HF model's dtype unless `dtype` asks for another."""
        dtype = dtype or hf_dtype(hf_model)
        config = dataclasses.replace(cls.config_from_hf(hf_model), **config_overrides)
        model = cls.build_like(hf_model, config)
        load_from_hf(model, hf_model.state_dict(), model.hf_mapping(), own=cls.hf_own, derived=cls.hf_derived)
        return cast(model, dtype)

    def to_hf(self):
        import transformers

        hf = getattr(transformers, self.hf_class)(self.hf_config())
        return load_into_hf(hf, self, self.hf_mapping(), derived=self.hf_derived)


class SingleLabelClassifier:
    """Mixin of the sequence classifiers (before their HFTwin base): their loss is cross-entropy, so from_hf
    refuses transformers' regression (num_labels == 1) and multi-label problem types, whose loss is another."""

    @classmethod
    def config_from_hf(cls, hf_model):
        c = hf_model.config
        if getattr(c, "problem_type", None) not in (None, "single_label_classification"):
            raise NotImplementedError(f"config field problem_type={c.problem_type!r}: only single-label "
                                      "classification (cross-entropy)")
        if c.num_labels == 1:
            raise NotImplementedError("config field num_labels=1 (transformers' regression, MSE loss): "
                                      "only classification")
        return super().config_from_hf(hf_model)
