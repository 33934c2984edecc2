"""Counts of the calls that a drop-in op handed to PyTorch because no ptm_kernels kernel covers them.

A drop-in (``pk.scaled_dot_product_attention``, the ``ptm_kernels.hf`` patches) must accept everything torch
accepts. Where our kernels do not cover an input (a head dim of 300, float64, a 5-D tensor, ...) the op calls
torch's own implementation instead, and records it here, keyed by ``(op, reason)``, so a user can see that
the fast path was not taken: ``fallbacks.counts()`` or ``python -m ptm_kernels.info``.

The first time each ``(op, reason)`` happens it is logged once at DEBUG level on the ``ptm_kernels.fallbacks``
logger (enable it with ``logging.getLogger("ptm_kernels.fallbacks").setLevel(logging.DEBUG)``); later calls only
count, so a fallback inside a training loop is not noisy.

Inside ``torch.compile`` tracing nothing is recorded: the count would be of traces, not of calls, and the lock
would break the graph.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

import torch

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()


def record(op: str, reason: str) -> None:
    """Count one call of ``op`` that fell back to PyTorch, because of ``reason`` (a short phrase)."""
    if not isinstance(op, str) or not isinstance(reason, str):
        raise TypeError(f"fallbacks.record(op, reason) takes two strings, got {type(op).__name__}, "
                        f"{type(reason).__name__}")
    if torch.compiler.is_compiling():
        return
    key = (op, reason)
    with _lock:
        first = key not in _counts
        _counts[key] += 1
    if first:
        logger.debug("ptm_kernels: %s falls back to PyTorch: %s", op, reason)


def counts() -> dict[tuple[str, str], int]:
    """A copy of the counts so far, ``{(op, reason): number of calls}``."""
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Forget all counts (the first-time log line will be written again for each reason)."""
    with _lock:
        _counts.clear()
