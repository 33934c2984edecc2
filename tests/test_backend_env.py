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
