"""The source archive carries everything a wheel build needs.

Without MANIFEST.in, `python -m build --sdist` left out every header (csrc/**/*.h, *.cuh, *.inc) and a build
from the archive failed on `common.h`. This builds the sdist (no compile, ~5 s) and compares its file list
with the source tree. `make check-sdist` goes further: it compiles a wheel from the unpacked archive and
imports ptm_kernels._C from it.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_SOURCES = ("*.cpp", "*.h", "*.cu", "*.cuh", "*.inc")


@pytest.fixture(scope="module")
def sdist_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PTM_KERNELS_BUILD_EXT": "0"})
    assert proc.returncode == 0, f"python -m build --sdist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    return {name[len(top) + 1:] for name in names if "/" in name}


def _tree(folder: str, patterns) -> set:
    return {str(p.relative_to(ROOT)) for pattern in patterns for p in (ROOT / folder).rglob(pattern)
            if "__pycache__" not in p.parts}


def test_every_csrc_file_is_in_the_sdist(sdist_files):
    needed = _tree("csrc", BUILD_SOURCES)
    assert any(name.endswith(".h") for name in needed) and any(name.endswith(".inc") for name in needed)
    assert sorted(needed - sdist_files) == []


def test_python_sources_and_docs_are_in_the_sdist(sdist_files):
    needed = _tree("ptm_kernels", ["*.py"]) | _tree("models", ["*.py"]) | _tree("docs", ["*.md"])
    needed |= {"setup.py", "pyproject.toml", "README.md"}
    assert sorted(needed - sdist_files) == []
