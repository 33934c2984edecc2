"""The dispatcher parses PTM_KERNELS_BACKEND once per value, yet follows a change of the variable at once."""

import pytest
import torch

from ptm_kernels import backend


def test_override_follows_the_environment(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv("PTM_KERNELS_BACKEND", "reference")
    assert backend.select("rms_norm", x.device) == "reference"
    monkeypatch.setenv("PTM_KERNELS_BACKEND", "rms_norm=reference,rope=reference")
    assert backend.select("rms_norm", x.device) == "reference"
    monkeypatch.delenv("PTM_KERNELS_BACKEND")
    assert backend.select("rms_norm", x.device) == backend.default("rms_norm", "cpu")


def test_a_bad_override_raises_naming_the_variable(monkeypatch):
    monkeypatch.setenv("PTM_KERNELS_BACKEND", "rms_norm=bogus")
    with pytest.raises(ValueError, match="PTM_KERNELS_BACKEND: unknown backend 'bogus'"):
        backend.select("rms_norm", torch.device("cpu"))


def test_attention_tile_follows_the_backend(monkeypatch):
    """The block-map tile is cached per tile function, yet follows use(...), PTM_KERNELS_BACKEND and a replaced
    tile function at once."""
    from ptm_kernels import AttentionMask, reference_kernels
    from ptm_kernels.ops.attention import attention_params

    q, k = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 70, 32)
    mask = AttentionMask.causal() & AttentionMask.dense(torch.rand(1, 1, 40, 70) < 0.7)  # every backend maps it

    def tile():
        vis = attention_params(q, k, mask, 1.0, 0.0).vis
        return (vis.block_m, vis.block_n) if vis.block_map is not None else None

    monkeypatch.delenv("PTM_KERNELS_BACKEND", raising=False)
    default_mod = backend.kernels("attention", q)
    default_tile = getattr(default_mod, "attention_tile", None)
    want = None if default_tile is None else tuple(default_tile(32, q.dtype, q.device))
    assert tile() == want
    monkeypatch.setattr(reference_kernels, "attention_tile", lambda d, dtype, device: (16, 32), raising=False)
    assert tile() == want
    with backend.use(attention="reference"):
        assert tile() == (16, 32)
    monkeypatch.setenv("PTM_KERNELS_BACKEND", "attention=reference")
    assert tile() == (16, 32)
    monkeypatch.setattr(reference_kernels, "attention_tile", lambda d, dtype, device: (32, 16))
    assert tile() == (32, 16)
    monkeypatch.delenv("PTM_KERNELS_BACKEND")
    assert tile() == want
