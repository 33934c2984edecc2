"""Weight mapping between our models and transformers' twins.

A mapping is a list of (our_key, hf_key) pairs; hf_key may be a tuple of keys whose tensors are concatenated
along dim 0 into ours (q, k, v -> one fused qkv projection). The same list drives both directions and the
gradient comparison in the tests, so a model states its mapping once.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

HFKey = Union[str, Tuple[str, ...]]
Mapping = List[Tuple[str, HFKey]]


def prefixed(mapping: Mapping, ours: str, hf: str) -> Mapping:
    """The mapping with a prefix put before every key on each side ('' leaves a side as it is)."""
    def pre(p, k):
        return tuple(p + x for x in k) if isinstance(k, tuple) else p + k
    return [(ours + o, pre(hf, h)) for o, h in mapping]


def load_from_hf(model: nn.Module, hf_state: Dict[str, Tensor], mapping: Mapping,
                 own: Sequence[str] = ()) -> nn.Module:
    """Copy the HF tensors into `model`; every parameter and buffer of ours must be covered, except those
    under the prefixes `own` (parts transformers does not have, e.g. SpanBERT's span boundary head)."""
    ours = model.state_dict()
    seen = set()
    with torch.no_grad():
        for o, h in mapping:
            src = torch.cat([hf_state[k] for k in h]) if isinstance(h, tuple) else hf_state[h]
            if ours[o].shape != src.shape:
                raise ValueError(f"{o}: shape {tuple(ours[o].shape)} but {h} gives {tuple(src.shape)}")
            ours[o].copy_(src)
            seen.add(o)
    missing = [k for k in ours if k not in seen and not k.startswith(tuple(own))]
    if missing:
        raise KeyError(f"no HF weight mapped to {missing}")
    return model


def hf_state_from(model: nn.Module, mapping: Mapping) -> Dict[str, Tensor]:
    """Our weights under their HF names (fused tensors split back in equal parts)."""
    ours = model.state_dict()
    out = {}
    for o, h in mapping:
        if isinstance(h, tuple):
            for k, t in zip(h, ours[o].chunk(len(h))):
                out[k] = t.clone()
        else:
            out[h] = ours[o].clone()
    return out


def load_into_hf(hf_model: nn.Module, model: nn.Module, mapping: Mapping) -> nn.Module:
    """Write our weights into a freshly built HF model; every HF tensor must be covered."""
    state = hf_state_from(model, mapping)
    hf_keys = set(hf_model.state_dict())
    unknown, missing = set(state) - hf_keys, hf_keys - set(state)
    if unknown or missing:
        raise KeyError(f"mapping does not match the HF model: unknown {sorted(unknown)}, missing {sorted(missing)}")
    hf_model.load_state_dict(state, strict=True)
    return hf_model


def hf_tensors(hf_model: nn.Module, mapping: Mapping, what: str = "grad") -> Dict[str, Tensor]:
    """For each of our keys, the HF parameter (what='data') or its gradient (what='grad'), concatenated like
    the weights: the tests compare our gradients with these."""
    params = hf_model.state_dict(keep_vars=True)

    def get(k):
        t = params[k]
        return t.detach() if what == "data" else t.grad

    return {o: torch.cat([get(k) for k in h]) if isinstance(h, tuple) else get(h) for o, h in mapping}


def config_kwargs(dataclass_type, hf_config, renames: Sequence[Tuple[str, str]] = ()) -> dict:
    """Fields of our config dataclass read from an HF config (same names unless renamed: (ours, hf))."""
    import dataclasses

    names = dict(renames)
    kw = {}
    for f in dataclasses.fields(dataclass_type):
        hf_name = names.get(f.name, f.name)
        if hasattr(hf_config, hf_name):
            kw[f.name] = getattr(hf_config, hf_name)
    return kw
