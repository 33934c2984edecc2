"""The CUDA sources compile with nvcc, without torch, for Ampere (sm_80) and Hopper (sm_90a).

The .cu files include only CUDA headers and csrc/cuda/launchers.h, so this runs on any machine with nvcc,
GPU or not, and catches build breaks that the CPU-only extension build would never see.
"""

import subprocess

import pytest

from .sm90_records import CUDA_DIR, SM90A, find_nvcc

SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = {"sm_80": ["-arch=sm_80"], "sm_90a": SM90A}
NVCC = find_nvcc()


def test_sources_found():
    assert SOURCES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (not on PATH, nor $CUDA_HOME/bin/nvcc)")
@pytest.mark.parametrize("arch", list(ARCHS), ids=list(ARCHS))
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_nvcc_compiles(source, arch, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-O2", *ARCHS[arch], "-I", str(CUDA_DIR), str(source),
           "-o", str(tmp_path / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"nvcc failed on {source.name} for {arch} (exit {proc.returncode}):\n{' '.join(cmd)}\n{proc.stderr}")
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert not warnings, f"nvcc warnings on {source.name} for {arch}:\n{proc.stderr}"
