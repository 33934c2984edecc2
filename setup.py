"""Build ptm_kernels and its extension ptm_kernels._C.

C++ CPU kernels are always built. CUDA kernels are built too when torch has CUDA and the CUDA toolkit's
headers are found; PTM_KERNELS_BUILD_CUDA=1 forces them (and fails loudly, naming the fix, if that is
impossible), =0 leaves them out. PTM_KERNELS_BUILD_EXT=0 skips the extension entirely (the package then runs
on Triton and the reference).

Two traps of torch.utils.cpp_extension are handled here (tests/install/test_setup_logic.py):
- The toolkit root. torch guesses CUDA_HOME as the parent of the directory holding the `nvcc` on PATH; when
  that `nvcc` is a wrapper script (/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc) the guess has
  no headers and bindings.cpp fails on cuda_runtime.h. We ask nvcc itself where its toolkit is.
- The architectures. With no visible GPU and no TORCH_CUDA_ARCH_LIST (Docker builds, CI), torch's
  _get_cuda_arch_flags raises IndexError; we build for DEFAULT_CUDA_ARCHS instead.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# Ampere and Hopper, plus PTX for later GPUs. The .cu files use no sm_90a-only feature (wgmma, TMA), so
# plain 9.0 suffices; tests/compile/test_nvcc.py compiles them for sm_80 and sm_90a as well.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

CUDA_HEADER = os.path.join("include", "cuda_runtime.h")


def _log(message: str) -> None:
    print(f"ptm_kernels setup: {message}", file=sys.stderr)


def has_cuda_headers(root) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, CUDA_HEADER))


def nvcc_toolkit_root(nvcc):
    """The toolkit root that `nvcc` really uses (it may be a wrapper script), from `nvcc --dryrun`'s TOP=."""
    try:
        # --dryrun prints the driver's variables (TOP=<root>/bin/..) without compiling or reading the input.
        proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    return os.path.normpath(match.group(1).strip()) if match else None


def find_cuda_home(torch_guess):
    """(toolkit root with the CUDA headers or None, why not when None).

    An explicit CUDA_HOME / CUDA_PATH is honoured and never second-guessed. Otherwise torch's guess is kept
    when it has the headers, else the root reported by the nvcc on PATH.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if has_cuda_headers(explicit):
            return explicit, None
        return None, f"CUDA_HOME={explicit} has no {CUDA_HEADER}"
    if has_cuda_headers(torch_guess):
        return torch_guess, None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc is not on PATH and CUDA_HOME is not set"
    root = nvcc_toolkit_root(nvcc)
    if has_cuda_headers(root):
        return root, None
    return None, (f"the nvcc on PATH ({nvcc}) belongs to no toolkit with {CUDA_HEADER} "
                  f"(torch guessed CUDA_HOME={torch_guess}, nvcc reports {root})")


def want_cuda(torch_cuda_version, cuda_home, why_not) -> bool:
    """Whether to build the CUDA kernels; raises when PTM_KERNELS_BUILD_CUDA=1 asks for the impossible."""
    flag = os.environ.get("PTM_KERNELS_BUILD_CUDA")
    if flag == "0":
        return False
    problem = None
    if torch_cuda_version is None:
        problem = "the installed torch has no CUDA (torch.version.cuda is None): install a CUDA build of torch"
    elif cuda_home is None:
        problem = (f"the CUDA toolkit was not found: {why_not}. Set CUDA_HOME to the toolkit root, the "
                   f"directory with {CUDA_HEADER} (e.g. CUDA_HOME=/usr/local/cuda-13.0)")
    if problem and flag == "1":
        raise RuntimeError(f"PTM_KERNELS_BUILD_CUDA=1 but {problem}")
    if problem and torch_cuda_version is not None:
        _log(f"building the CPU kernels only: {problem}")
    return problem is None


def cuda_arch_list(visible_gpus: int):
    """The TORCH_CUDA_ARCH_LIST to build with: the user's, else torch's own choice when it can see a GPU,
    else DEFAULT_CUDA_ARCHS (None means: leave it to torch)."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given and not (given == "native" and visible_gpus == 0):
        return None
    if visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCHS


def _extensions():
    if os.environ.get("PTM_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    import torch.utils.cpp_extension as cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    cuda_home, why_not = (None, None)
    if os.environ.get("PTM_KERNELS_BUILD_CUDA") != "0" and torch.version.cuda is not None:
        cuda_home, why_not = find_cuda_home(cpp_extension.CUDA_HOME)
    if want_cuda(torch.version.cuda, cuda_home, why_not):
        # torch read CUDA_HOME when cpp_extension was imported; point it (and its nvcc) at the real toolkit.
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
        archs = cuda_arch_list(torch.cuda.device_count())
        if archs is not None:
            _log(f"no GPU visible and no TORCH_CUDA_ARCH_LIST: building for {archs}")
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "ptm_kernels._C", sources, define_macros=[("PTM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("ptm_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _build_ext_class(BuildExtension)}


def _build_ext_class(BuildExtension):
    class BuildExtensionKeepingObjects(BuildExtension):
        """`pip install -e .` compiles in a fresh temporary folder each time, so every rebuild recompiled every
        file. Editable builds keep their objects in build/editable instead: ninja then recompiles only what
        changed (it tracks headers, and reruns a command whose flags or include paths changed)."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join(ROOT, "build", "editable")

    return BuildExtensionKeepingObjects


# setuptools runs this file as __main__; tests/install imports it for the helpers above.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
