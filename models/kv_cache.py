"""A preallocated key/value cache for incremental decoding: written in place, never concatenated.

Two ways to write it:
- growing (prefill, and any forward with an AttentionMask): `update` writes the new keys after the `length`
  cached ones and returns views [B, Hk, length + L, D]; the model calls `advance(L)` once per forward;
- static (the decode step that torch.compile captures): with `index` set (a [L] long tensor, the cache columns
  this step writes, moved on in place by the generate loop), `update` writes there with `index_copy_` and
  returns the whole [B, Hk, max_len, D] buffers; the step's additive mask hides the columns not written yet.
  No Python int changes between steps, so the compiled graph is reused as it is. An eager step also sets
  `filled` (a Python int: the columns holding tokens once this step's are written): `update` then returns
  only those, so attention reads no empty column.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every layer, [n_layers, B, Hk, max_len, D] each, filled up to `length`.

    All rows share one fill (batched prompts are left padded; padding is hidden by the key-padding mask).
    The returned views have a unit last stride, so the fused attention reads them in place, and with Lq < Lk
    its bottom-right causal mask lines the new queries up with the end of the cache.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        self.index: Optional[Tensor] = None  # static mode: the columns the next update writes
        self.filled: Optional[int] = None  # static mode, eager: the columns update returns (None: all)

    def update(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Store this step's k, v [B, Hk, L, D]; return the keys and values to attend to (see the module doc)."""
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            if self.filled is not None:
                return self.k[layer, :, :, :self.filled], self.v[layer, :, :, :self.filled]
            return self.k[layer], self.v[layer]
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
        self.index = None
        self.filled = None

    def reorder(self, rows: Tensor) -> None:
        """Beam search: row r of the cache becomes row rows[r] (all layers, the filled columns)."""
        n = self.max_len if self.index is not None else self.length
        for t in (self.k, self.v):
            t[:, :, :, :n] = t[:, rows, :, :n]
