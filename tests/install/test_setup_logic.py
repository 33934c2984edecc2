"""setup.py's build decisions, tested without building: where the CUDA toolkit is, whether to build the CUDA
kernels, and for which architectures. setup.py only calls setup() when run as a script, so its helpers import.

The two traps these guard against (both seen on the machines this project builds on):
- torch guesses CUDA_HOME as the parent of the `nvcc` on PATH's directory; a wrapper script there
  (/usr/local/bin/nvcc: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`) makes the guess a folder without headers.
- with no visible GPU and no TORCH_CUDA_ARCH_LIST, torch's _get_cuda_arch_flags raises IndexError.
"""

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[2]


def _load_setup():
    spec = importlib.util.spec_from_file_location("ptm_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = _load_setup()


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_toolkit(tmp_path, monkeypatch):
    """A toolkit at tmp/cuda-13.0 (headers, an nvcc that reports its root like the real one under --dryrun)
    and a wrapper tmp/wrapper/bin/nvcc that execs it; only the wrapper is on PATH. Returns (root, wrapper dir)."""
    root = tmp_path / "cuda-13.0"
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("// header\n")
    _script(root / "bin" / "nvcc", 'echo "#\\$ _HERE_=$(dirname "$0")" >&2\necho "#\\$ TOP=$(dirname "$0")/.." >&2\n')
    _script(tmp_path / "wrapper" / "bin" / "nvcc", f'exec {root}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrapper' / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return root, tmp_path / "wrapper"


def test_torch_guess_is_wrong_for_a_wrapper(fake_toolkit):
    # The trap itself: torch's own guess is the wrapper's prefix, which has no headers.
    root, wrapper = fake_toolkit
    guess = cpp_extension._find_cuda_home()
    assert Path(guess) == wrapper
    assert not setup_py.has_cuda_headers(guess)


def test_toolkit_found_through_the_wrapper(fake_toolkit):
    root, wrapper = fake_toolkit
    home, why_not = setup_py.find_cuda_home(str(wrapper))
    assert (home, why_not) == (str(root), None)
    assert setup_py.want_cuda("13.0", home, why_not)


def test_torch_guess_kept_when_it_has_headers(fake_toolkit, tmp_path):
    root, _ = fake_toolkit
    other = tmp_path / "other"
    (other / "include").mkdir(parents=True)
    (other / "include" / "cuda_runtime.h").write_text("")
    assert setup_py.find_cuda_home(str(other)) == (str(other), None)


def test_explicit_cuda_home_is_honoured(fake_toolkit, tmp_path, monkeypatch):
    root, wrapper = fake_toolkit
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert setup_py.find_cuda_home(str(wrapper)) == (str(root), None)
    # A wrong explicit CUDA_HOME is reported, not replaced by a guess.
    monkeypatch.setenv("CUDA_HOME", str(wrapper))
    home, why_not = setup_py.find_cuda_home(str(wrapper))
    assert home is None and f"CUDA_HOME={wrapper}" in why_not and "cuda_runtime.h" in why_not


def test_no_toolkit_falls_back_to_cpu_with_a_message(fake_toolkit, monkeypatch, capsys):
    root, wrapper = fake_toolkit
    shutil.rmtree(root / "include")
    monkeypatch.delenv("PTM_KERNELS_BUILD_CUDA", raising=False)
    home, why_not = setup_py.find_cuda_home(str(wrapper))
    assert home is None and str(wrapper / "bin" / "nvcc") in why_not
    assert not setup_py.want_cuda("13.0", home, why_not)
    err = capsys.readouterr().err
    assert "CPU kernels only" in err and "Set CUDA_HOME" in err


def test_no_nvcc_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home, why_not = setup_py.find_cuda_home(None)
    assert home is None and "nvcc is not on PATH" in why_not


def test_forced_cuda_build_raises_naming_the_fix(monkeypatch):
    monkeypatch.setenv("PTM_KERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"PTM_KERNELS_BUILD_CUDA=1 .*Set CUDA_HOME to the toolkit root"):
        setup_py.want_cuda("13.0", None, "no nvcc")
    with pytest.raises(RuntimeError, match=r"PTM_KERNELS_BUILD_CUDA=1 .*torch\.version\.cuda is None"):
        setup_py.want_cuda(None, "/usr/local/cuda", None)
    monkeypatch.setenv("PTM_KERNELS_BUILD_CUDA", "0")
    assert not setup_py.want_cuda("13.0", "/usr/local/cuda", None)


def test_cpu_torch_builds_cpu_silently(monkeypatch, capsys):
    monkeypatch.delenv("PTM_KERNELS_BUILD_CUDA", raising=False)
    assert not setup_py.want_cuda(None, None, None)
    assert capsys.readouterr().err == ""


def test_torch_arch_flags_fail_without_gpu_or_list(monkeypatch):
    # The trap itself (torch.cuda.device_count() is 0 here, with or without a CUDA build of torch).
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(cpp_extension.torch.cuda, "device_count", lambda: 0)
    with pytest.raises(IndexError):
        cpp_extension._get_cuda_arch_flags()


@pytest.mark.parametrize("given", [None, "", "native"])
def test_default_archs_without_gpu(monkeypatch, given):
    if given is None:
        monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    archs = setup_py.cuda_arch_list(visible_gpus=0)
    assert archs == setup_py.DEFAULT_CUDA_ARCHS
    # What torch makes of it: Ampere and Hopper machine code, plus PTX for later GPUs.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags


def test_user_or_gpu_choice_is_kept(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert setup_py.cuda_arch_list(visible_gpus=0) is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert setup_py.cuda_arch_list(visible_gpus=1) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH: the real-toolkit check needs one")
def test_real_nvcc_reports_a_toolkit_with_headers():
    root = setup_py.nvcc_toolkit_root(shutil.which("nvcc"))
    assert setup_py.has_cuda_headers(root), f"nvcc on PATH reports toolkit root {root} without headers"


def test_setup_py_runs_nothing_on_import():
    # Importing (as these tests do) must not start a build; running it as a script still works.
    proc = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PTM_KERNELS_BUILD_EXT": "0"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ptm-kernels"


def test_every_package_folder_is_listed():
    # A folder of Python files missing from [tool.setuptools] packages is silently left out of every wheel.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(("ptm_kernels",) + p.parent.relative_to(ROOT / "ptm_kernels").parts)
               for p in (ROOT / "ptm_kernels").rglob("*.py")} | {"ptm_kernels.models"}
    assert listed == on_disk
    assert config["package-dir"]["ptm_kernels.models"] == "models"
    assert not [p for p in (ROOT / "models").iterdir() if p.is_dir() and list(p.rglob("*.py"))], (
        "models/ has subpackages: list them in pyproject.toml")


def test_editable_builds_keep_their_objects():
    # pip install -e compiles in a fresh temporary folder; ours keeps the objects so ninja rebuilds only changes.
    from setuptools import Distribution

    command_class = setup_py._build_ext_class(cpp_extension.BuildExtension)
    editable = command_class(Distribution({"ext_modules": []}))
    editable.editable_mode = True
    editable.ensure_finalized()
    assert Path(editable.build_temp) == ROOT / "build" / "editable"
    wheel = command_class(Distribution({"ext_modules": []}))
    wheel.ensure_finalized()
    assert Path(wheel.build_temp) != ROOT / "build" / "editable"
