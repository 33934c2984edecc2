"""Shared setup of the model tests.

`ptm_kernels.models` is the source tree's `models/` package once installed (`make build`: pyproject maps it);
without an install, alias it here so that the tests import it under the same name either way.
Tiny configs run faster on one intra-op thread than on two on a loaded 2-core machine.
"""

import importlib
import sys

import pytest
import torch

import ptm_kernels

try:
    importlib.import_module("ptm_kernels.models")
except ModuleNotFoundError:  # not installed: the repository root is on sys.path (pytest rootdir)
    sys.modules["ptm_kernels.models"] = ptm_kernels.models = importlib.import_module("models")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
