"""Build ptm_kernels and its extension ptm_kernels._C.

C++ CPU kernels are always built. CUDA kernels are built too when torch has CUDA and nvcc is found;
PTM_KERNELS_BUILD_CUDA=1 forces them (and fails loudly if that is impossible), =0 leaves them out.
PTM_KERNELS_BUILD_EXT=0 skips the extension entirely (the package then runs on Triton and the reference).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(CUDA_HOME) -> bool:
    import torch

    flag = os.environ.get("PTM_KERNELS_BUILD_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not possible:
        raise RuntimeError(
            "PTM_KERNELS_BUILD_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
        )
    return possible if flag is None else flag == "1"


def _extensions():
    if os.environ.get("PTM_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = ["csrc/ops.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if _want_cuda(CUDA_HOME):
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "ptm_kernels._C", sources, define_macros=[("PTM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("ptm_kernels._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
