"""Shared setup of the model tests: tiny configs run faster on one intra-op thread than on two on a loaded
2-core machine."""

import pytest
import torch

# the shared checks (and the encoder protocol's tests) live in parity.py: pytest explains their failed asserts too
pytest.register_assert_rewrite("tests.models.parity")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
