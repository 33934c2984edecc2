"""Weight mapping to and from transformers: a model lists (our key, their key(s), transpose) rows.

    rows = [("wte.weight", "transformer.wte.weight", False),
            ("blocks.0.attn.qkv.weight", "transformer.h.0.attn.c_attn.weight", True),  # Conv1D is [in, out]
            ("blocks.0.attn.qkv.weight", ("...q_proj.weight", "...k_proj.weight", "...v_proj.weight"), False)]

Several of their keys concatenate along dim 0 into ours (separate q/k/v -> one qkv); `export` splits them
back with the sizes of the target model's tensors.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

Row = Tuple[str, Union[str, Sequence[str]], bool]


def load_from_hf(model: nn.Module, hf_state: Dict[str, Tensor], rows: Iterable[Row]) -> nn.Module:
    """Copy transformers' weights into `model`; every parameter of `model` must be covered."""
    ours = {}
    for mine, theirs, transpose in rows:
        keys = (theirs,) if isinstance(theirs, str) else tuple(theirs)
        if any(k not in hf_state for k in keys):
            if mine == "lm_head.weight":  # tied: transformers may keep only the embedding
                continue
            raise KeyError(f"transformers state dict has no {[k for k in keys if k not in hf_state]}")
        t = torch.cat([hf_state[k] for k in keys], 0) if len(keys) > 1 else hf_state[keys[0]]
        ours[mine] = t.t() if transpose else t
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or model.lm_head.weight is not model.wte.weight]
    if missing or unexpected:
        raise KeyError(f"weight mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model


def export_to_hf(model: nn.Module, hf_model: nn.Module, rows: Iterable[Row]) -> nn.Module:
    """Copy `model`'s weights into a transformers model built from the matching config."""
    state = model.state_dict()
    target = hf_model.state_dict()
    theirs_out = {}
    for mine, theirs, transpose in rows:
        t = state[mine].t() if transpose else state[mine]
        keys = (theirs,) if isinstance(theirs, str) else tuple(theirs)
        parts = t.split([target[k].shape[0] for k in keys], 0) if len(keys) > 1 else (t,)
        for k, p in zip(keys, parts):
            if k in target:
                theirs_out[k] = p.contiguous().clone()
    missing, unexpected = hf_model.load_state_dict(theirs_out, strict=False)
    if unexpected or [k for k in missing if k in dict(hf_model.named_parameters())]:
        raise KeyError(f"weight export incomplete: missing {missing}, unexpected {unexpected}")
    return hf_model
