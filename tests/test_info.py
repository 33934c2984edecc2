"""`python -m ptm_kernels.info` tells the truth about this installation."""

import importlib
import subprocess
import sys

import torch

from ptm_kernels import backend, info


def test_info_report_is_truthful():
    r = info.report()
    try:
        importlib.import_module("ptm_kernels._C")
        built = True
    except ImportError:
        built = False
    assert r["extension_built"] == built
    assert r["torch"] == torch.__version__
    for op, per_dev in r["ops"].items():
        for dev, d in per_dev.items():
            assert d["uses"] == backend.select(op, torch.device(dev))
            assert d["uses"] in d["available"]
            for name in backend.BACKENDS:
                assert (name in d["available"]) == backend.supports(name, op, dev)


def test_info_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "ptm_kernels.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "extension ptm_kernels._C built" in out.stdout
    assert "rms_norm" in out.stdout
