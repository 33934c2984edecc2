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


def test_kept_kernel_modules_follow_use_and_the_environment(monkeypatch):
    """`kernels` keeps the module it resolved per overrides in force: an op that ran once on the default backend
    still follows a `use()` block, its end, and PTM_KERNELS_BACKEND set or removed afterwards."""
    from ptm_kernels import reference_kernels

    monkeypatch.delenv("PTM_KERNELS_BACKEND", raising=False)
    x = torch.randn(4, 8)
    default = backend.module(backend.default("rms_norm", "cpu"))
    for _ in range(2):  # the second time from what was kept
        assert backend.kernels("rms_norm", x) is default
    with backend.use(rms_norm="reference"):
        assert backend.kernels("rms_norm", x) is reference_kernels
        assert backend.kernels("layer_norm", x) is backend.module(backend.default("layer_norm", "cpu"))
        with backend.use("cpu" if backend.supports("cpu", "rms_norm", "cpu") else "reference"):
            assert backend.kernels("rms_norm", x) is backend.module(backend.select("rms_norm", x.device))
        assert backend.kernels("rms_norm", x) is reference_kernels
    assert backend.kernels("rms_norm", x) is default
    monkeypatch.setenv("PTM_KERNELS_BACKEND", "reference")
    assert backend.kernels("rms_norm", x) is reference_kernels
    assert backend.kernels("rms_norm", x.double()) is reference_kernels
    monkeypatch.delenv("PTM_KERNELS_BACKEND")
    assert backend.kernels("rms_norm", x) is default


def test_an_op_call_runs_the_backend_in_force(monkeypatch):
    """End to end: pk.rms_norm runs the reference inside use(rms_norm="reference") after running the default."""
    import ptm_kernels as pk
    from ptm_kernels import reference_kernels

    monkeypatch.delenv("PTM_KERNELS_BACKEND", raising=False)
    calls = []
    real = reference_kernels.rms_norm_fwd
    monkeypatch.setattr(reference_kernels, "rms_norm_fwd", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(3, 8), torch.randn(8)
    with torch.no_grad():
        pk.rms_norm(x, w)
        default_calls = len(calls)
        with backend.use(rms_norm="reference"):
            pk.rms_norm(x, w)
        assert len(calls) == default_calls + 1
        monkeypatch.setenv("PTM_KERNELS_BACKEND", "rms_norm=reference")
        pk.rms_norm(x, w)
        assert len(calls) == default_calls + 2


def test_a_use_block_in_another_thread_changes_nothing_here(monkeypatch):
    import threading

    from ptm_kernels import reference_kernels

    monkeypatch.delenv("PTM_KERNELS_BACKEND", raising=False)
    x = torch.randn(4, 8)
    default = backend.kernels("rms_norm", x)
    entered, leave = threading.Event(), threading.Event()
    seen = []

    def other():
        with backend.use("reference"):
            seen.append(backend.kernels("rms_norm", x))
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(10)
        assert seen == [reference_kernels]
        assert backend.kernels("rms_norm", x) is default
    finally:
        leave.set()
        thread.join()
    assert backend.kernels("rms_norm", x) is default


@pytest.mark.skipif(backend.module("triton") is None, reason="the Triton backend is not importable here")
def test_triton_on_cpu_follows_triton_interpret_on_every_call(monkeypatch):
    """Triton on CPU tensors needs TRITON_INTERPRET=1: that answer is not kept, so unsetting it raises again."""
    x = torch.randn(4, 8)
    with backend.use(rms_norm="triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.kernels("rms_norm", x) is backend.module("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run rms_norm on cpu"):
            backend.kernels("rms_norm", x)
