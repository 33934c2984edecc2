"""Test setup shared by every test file.

Random data: every test starts from its own seed (torch, random), printed with the test's output. By default
the seed is fixed per test (a hash of its id), so a CI run is reproducible and independent of test order;
`PTM_TEST_SEED=random` draws fresh seeds (run it a few times to explore), `PTM_TEST_SEED=<n>` reruns one.

Without a GPU, Triton kernels run on CPU tensors through the interpreter. Triton reads TRITON_INTERPRET
when a kernel is defined, so it must be set before ptm_kernels (and its Triton modules) is imported.
"""

import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ptm_kernels  # noqa: E402,F401  (import after TRITON_INTERPRET is set)
from ptm_kernels import backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config):
    from ptm_kernels import info

    r = info.report()
    return [f"ptm_kernels: extension built={r['extension_built']} (cuda={r['extension_with_cuda']}), "
            f"triton {r['triton']}, TRITON_INTERPRET={r['TRITON_INTERPRET'] or '0'}, device={DEVICE}"]


def backend_params(op: str):
    """One pytest param per backend, each skipped with the reason when it cannot run `op` here."""
    params = []
    for name in backend.BACKENDS:
        marks = []
        if not backend.supports(name, op, DEVICE.type):
            why = {
                "cuda": "CUDA kernels need a GPU and the extension built with CUDA",
                "cpu": "C++ CPU kernels run on CPU tensors only, and need ptm_kernels._C built"
                if DEVICE.type == "cpu" else "C++ CPU kernels run on CPU tensors only; this run tests on CUDA",
                "triton": "Triton needs triton importable, and CUDA or TRITON_INTERPRET=1",
            }.get(name, "not available")
            if backend.supports(name, "rms_norm", DEVICE.type):  # the backend runs here, without this family
                why = f"it has no {op} kernel (on {DEVICE.type}, {op} runs on the other backends)"
            marks.append(pytest.mark.skip(reason=f"{name} backend unavailable for {op} on {DEVICE.type}: {why}"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _seed_for(test_id: str) -> int:
    chosen = os.environ.get("PTM_TEST_SEED", "")
    if chosen == "random":
        return random.SystemRandom().randrange(2**31)
    return int(chosen) if chosen else zlib.crc32(test_id.encode())


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed, already applied to torch and random."""
    s = _seed_for(request.node.nodeid)
    print(f"seed={s}: rerun with PTM_TEST_SEED={s}")
    torch.manual_seed(s)
    random.seed(s)
    return s


@pytest.fixture
def device():
    return DEVICE
