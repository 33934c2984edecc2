"""The sm_90 compile records, shared by the compile tests and `make sm90-report` (compiled once per process).

* Triton: tests/compile/triton_sm90.py FAMILY in a subprocess (TRITON_INTERPRET unset, a fresh Triton
  cache), one `RESULT {json}` line per compile / case; every compile record carries the figures of
  sm90_artefacts (registers, spill bytes, MMA kind, TMA, SASS counts). With PTM_SM90_DROPOUT_TWINS set, each
  launch with dropout is compiled a second time with dropout off (status "dropout_twin").
* CUDA: each csrc/cuda/*.cu compiled by nvcc to an sm_90a cubin (the flags of tests/compile/test_nvcc.py),
  one record per kernel (template instance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import sm90_artefacts

HELPER = Path(__file__).with_name("triton_sm90.py")
REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "cuda"
SM90A = ["-gencode", "arch=compute_90a,code=sm_90a"]
TIMEOUT_S = 1800  # a safety net: the slowest family takes ~2 min alone, much longer on a busy machine

_TRITON: dict = {}
_CUDA: dict = {}


def run_family(family: str, cache_dir: str | None = None) -> dict:
    """-> {records, rc, stderr} for one harness family (memoised: the first call compiles)."""
    if family not in _TRITON:
        with tempfile.TemporaryDirectory(prefix="triton_cache_") as tmp:
            _TRITON[family] = _run_family(family, cache_dir or tmp)
    return _TRITON[family]


def run_families(families: list) -> dict:
    """run_family for several families, one subprocess per CPU at a time (each compile is single-threaded)."""
    todo = [f for f in families if f not in _TRITON]
    if todo:
        with ThreadPoolExecutor(max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            list(pool.map(run_family, todo))
    return {f: _TRITON[f] for f in families}


def _run_family(family: str, cache_dir: str) -> dict:
    return run_harness([family], cache_dir, PTM_SM90_DROPOUT_TWINS="1")


def run_harness(args: list, cache_dir: str, **env_vars) -> dict:
    """-> {records, rc, stderr} of triton_sm90.py with args (FAMILY [CASE-SUBSTRING]), compiling into cache_dir
    (a fresh cache: every kernel is compiled by this run's code), with env_vars set (e.g. PTM_SM90_DUMP)."""
    env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, **env_vars)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    try:
        p = subprocess.run([sys.executable, str(HELPER), *args], capture_output=True, text=True, env=env,
                           cwd=str(REPO), timeout=TIMEOUT_S)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {TIMEOUT_S} s", -1
    records = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return dict(records=records, rc=rc, stderr=err)


def launched(records: list) -> list:
    """The compiles that a launcher would run on an H100: status ok, in a case that succeeded."""
    ok_cases = {r["case"] for r in records if "kernel" not in r and r.get("status") == "ok" and "case" in r}
    return [r for r in records if "kernel" in r and r["status"] == "ok" and r["case"] in ok_cases]


def find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    return None


def cuda_records(source: Path) -> list:
    """One record per kernel of a .cu file compiled for sm_90a (memoised)."""
    if source not in _CUDA:
        nvcc = find_nvcc()
        if nvcc is None:
            raise FileNotFoundError("nvcc not found (not on PATH, nor $CUDA_HOME/bin/nvcc)")
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / (source.stem + ".cubin")
            cmd = [nvcc, "-cubin", "-std=c++17", "-O2", *SM90A, "-I", str(CUDA_DIR), str(source), "-o", str(cubin)]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
            figures = sm90_artefacts.describe_cubin(cubin.read_bytes())
        names = sm90_artefacts.short_cuda_names(list(figures))
        _CUDA[source] = [dict(source=source.name, kernel=short, mangled=name, **f)
                         for short, (name, f) in zip(names, figures.items())]
    return _CUDA[source]
