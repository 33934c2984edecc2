"""Rotary position embedding with transformers' scaling variants (rope_type default, linear, dynamic, llama3,
yarn), for LLaMA-style models.

The angles are computed per call from the position ids, as transformers computes them (float32
position * inv_freq, then cos and sin times the variant's attention factor), and handed to the fused `ptm::rope`
as a table of exactly those rows. So any position works (past max_position_embeddings too, as in
transformers), "dynamic" NTK scaling sees the call's longest sequence (max position + 1) as transformers' does,
and nothing here needs a Python-side value of a tensor: the static decode step stays one graph.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.ops.rope import rope_cos_sin_at, rope_frequencies


class Rotary(nn.Module):
    """`forward(q, k, position_ids=None)` -> (q_rot, k_rot); q [B, H, L, D], k [B, Hk, L, D], position_ids
    [B or 1, L] (default arange(L)). rope_parameters: transformers' dict (rope_type, rope_theta, ...)."""

    def __init__(self, rotary_dim: int, max_position_embeddings: int, rope_parameters: Optional[dict] = None):
        super().__init__()
        self.rotary_dim, self.max_position_embeddings = rotary_dim, max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.dynamic = self.rope_parameters.get("rope_type") == "dynamic"
        inv_freq, self.attention_factor = rope_frequencies(rotary_dim, self.rope_parameters, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):  # follow the model's device, never its dtype (angles stay float32)
        super()._apply(fn, recurse)
        self.inv_freq = self.inv_freq.float()
        return self

    def forward(self, q: Tensor, k: Optional[Tensor], position_ids: Optional[Tensor] = None):
        L = q.shape[2]
        if position_ids is None:
            position_ids = torch.arange(L, device=q.device)
        position_ids = position_ids.reshape(-1, L)  # [B or 1, L]
        inv_freq = self.inv_freq
        if self.dynamic:  # transformers' dynamic NTK: the base grows with the call's longest sequence
            inv_freq, _ = rope_frequencies(self.rotary_dim, self.rope_parameters, self.max_position_embeddings,
                                           seq_len=position_ids.max() + 1)
        cos, sin = rope_cos_sin_at(inv_freq, position_ids, self.attention_factor)  # [B * L, rotary_dim // 2]
        # row b of the batch reads table rows b * L ... b * L + L - 1 (a per-row offset: nothing to validate)
        offset = torch.arange(position_ids.shape[0], device=q.device) * L
        return pk.rope(q, k, cos, sin, offset=offset, rotary_dim=self.rotary_dim)
