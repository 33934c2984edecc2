"""Index-like arguments out of range are refused under torch.compile too, not only eagerly.

Eagerly each is checked with one sync and a ValueError (tests/ops/test_bad_input.py, test_mask_checks.py,
test_relative_attention.py). Inside a traced graph a data-dependent raise cannot run, so `_checks.values_in`
puts a graph assertion there instead (torch._assert_async: a RuntimeError on the CPU, a device-side assert on a
GPU). Before, the compiled call skipped the check: a position past the cos/sin cache or the query stream, or a
length past Lk, went to the kernel as it was.
"""

import pytest
import torch

import ptm_kernels as pk
from ptm_kernels import AttentionMask

from ..conftest import DEVICE


def _compiled(f):
    torch._dynamo.reset()
    return torch.compile(f, fullgraph=True, backend="aot_eager")


def test_rope_positions_checked_when_compiled():
    B, H, L, D, cache = 1, 2, 5, 8, 6
    q = torch.randn(B, H, L, D, device=DEVICE)
    cos, sin = torch.randn(cache, D // 2, device=DEVICE), torch.randn(cache, D // 2, device=DEVICE)
    f = _compiled(lambda q, pos: pk.rope(q, None, cos, sin, position_ids=pos)[0])
    ok = torch.tensor([[0, 1, 2, 3, 5]], device=DEVICE)
    torch.testing.assert_close(f(q, ok), pk.rope(q, None, cos, sin, position_ids=ok)[0])
    with pytest.raises(RuntimeError, match=r"positions must lie in \[0, 6\) \(the cos/sin cache\)"):
        f(q, torch.tensor([[0, 1, 2, 3, 6]], device=DEVICE))
    with pytest.raises(RuntimeError, match=r"positions must lie in \[0, 6\)"):
        f(q, torch.tensor([[0, 1, -1, 3, 4]], device=DEVICE))


def test_key_padding_lengths_checked_when_compiled():
    B, H, L, D = 2, 2, 8, 16
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE) for _ in range(3))
    f = _compiled(lambda q, k, v, n: pk.attention(q, k, v, AttentionMask.key_padding(lengths=n)))
    ok = torch.tensor([3, 8], device=DEVICE)
    torch.testing.assert_close(f(q, k, v, ok), pk.attention(q, k, v, AttentionMask.key_padding(lengths=ok)))
    with pytest.raises(RuntimeError, match=r"key_padding lengths must lie in \[0, Lk = 8\]"):
        f(q, k, v, torch.tensor([3, 9], device=DEVICE))


def test_query_positions_checked_when_compiled():
    B, H, Lq, D = 1, 2, 4, 16
    q, k, v = (torch.randn(B, H, Lq, D, device=DEVICE) for _ in range(3))
    r = torch.randn(H, 2 * Lq, D, device=DEVICE)
    f = _compiled(lambda q, g, pos: pk.two_stream_attention(q, g, k, v, r, query_positions=pos)[1])
    g = q[:, :, :2]
    ok = torch.tensor([[0, 3]], device=DEVICE)
    torch.testing.assert_close(f(q, g, ok), pk.two_stream_attention(q, g, k, v, r, query_positions=ok)[1])
    with pytest.raises(RuntimeError, match=r"query_positions must lie in \[0, Lq = 4\)"):
        f(q, g, torch.tensor([[0, 4]], device=DEVICE))
