"""The one activation table (ptm_kernels/activations.py) against transformers' ACT2FN, name by name."""

import pytest
import torch

from ptm_kernels.activations import ACTIVATIONS, apply, bias_apply, check, gated_apply
from ptm_kernels.hf import activations as hf_activations

ACT2FN = pytest.importorskip("transformers.activations").ACT2FN


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_matches_transformers(name):
    x = torch.randn(4, 96, dtype=torch.float64) * 3
    bias, up = torch.randn(96, dtype=torch.float64), torch.randn(4, 96, dtype=torch.float64)
    theirs = ACT2FN[name]
    # float64, so 1e-10 is far below any real difference; the tanh GELUs differ only in the order of their
    # float64 operations (gelu_fast: tanh(x c (1 + a x^2)), ours: tanh(c (x + a x^3))), about 1e-11 relative
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(apply(x, name), theirs(x), **tol)
    torch.testing.assert_close(bias_apply(x, bias, name), theirs(x + bias), **tol)
    torch.testing.assert_close(gated_apply(x, up, name), theirs(x) * up, **tol)


def test_hf_patches_read_the_same_table():
    for name, act in ACTIVATIONS.items():
        assert hf_activations.gelu_approximate(name) == act.gelu
        assert (hf_activations.gated(name) is not None) == (act.gelu is not None or act.silu)
    assert hf_activations.gelu_approximate("relu") is None


def test_unknown_name_names_the_field():
    with pytest.raises(NotImplementedError, match="hidden_act='gelu_10'"):
        check("gelu_10", "hidden_act")
