"""The check behind `make check-cuda-build` (tests/install/check_installed.py), on this source tree: it finds
the kernels the Python layer calls, per op family, from the code, and it fails when `_C.cuda` lacks one."""

from pathlib import Path
from types import SimpleNamespace

from . import check_installed as check

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_calls_are_read_from_the_code():
    calls = check.kernel_calls(ROOT / "ptm_kernels")
    # forward and backward of each family the dispatcher knows; attention_tile is optional (getattr default)
    assert calls["rms_norm"] == {"rms_norm_fwd", "rms_norm_bwd"}
    assert calls["layer_norm"] == {"layer_norm_fwd", "layer_norm_bwd"}
    assert calls["activation"] == {"act_fwd", "act_bwd", "glu_fwd", "glu_bwd"}
    assert {"rope_fwd"} <= calls["rope"]
    assert {"attention_fwd", "attention_bwd"} <= calls["attention"] and "attention_tile" not in calls["attention"]


def test_cuda_declarations_are_read_from_csrc():
    declared = check.cuda_declared(ROOT)
    assert {"rms_norm_fwd", "layer_norm_bwd", "glu_bwd", "rope_fwd"} <= declared
    assert "attention_fwd" not in declared


def _module(names):
    return SimpleNamespace(**{n: print for n in names})


def test_complete_cuda_module_passes():
    calls = check.kernel_calls(ROOT / "ptm_kernels")
    declared = check.cuda_declared(ROOT)
    wanted = {n for names in calls.values() for n in names if names & declared}
    assert check.cuda_problems(calls, declared, _module(wanted), lambda family: True) == []


def test_missing_kernel_or_dispatch_fails():
    calls = check.kernel_calls(ROOT / "ptm_kernels")
    declared = check.cuda_declared(ROOT)
    wanted = {n for names in calls.values() for n in names if names & declared}
    problems = check.cuda_problems(calls, declared, _module(wanted - {"rms_norm_bwd"}), lambda family: True)
    assert problems == ["rms_norm: _C.cuda lacks ['rms_norm_bwd']"]
    problems = check.cuda_problems(calls, declared, _module(wanted), lambda family: family != "rope")
    assert problems == ["rope: backend.supports('cuda', 'rope', 'cuda') is False"]
    assert check.cuda_problems(calls, set(), _module(wanted), lambda family: True)[0].startswith("no op family")
