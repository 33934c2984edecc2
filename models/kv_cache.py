"""A preallocated key/value cache for incremental decoding: written in place, never concatenated."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, [n_layers, B, Hk, max_len, D] each, filled up to `length`.

    All rows share one fill (batched prompts are left padded; padding is hidden by the key-padding mask).
    Each layer calls `update(layer, k, v)` during a forward; the model calls `advance(L)` once after it.
    The returned views [B, Hk, length + L, D] have a unit last stride, so the fused attention reads them in
    place, and with Lq < Lk its bottom-right causal mask lines the new queries up with the end of the cache.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Write this step's k, v [B, Hk, L, D] after the cached ones; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
