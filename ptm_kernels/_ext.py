"""The compiled extension ptm_kernels._C, if it was built; the package works without it."""

try:
    from . import _C as C  # noqa: N812

    ERROR = None
except ImportError as exc:  # not built (PTM_KERNELS_BUILD_EXT=0, a source checkout) or built for another torch
    C = None
    ERROR = f"{type(exc).__name__}: {exc}"

BUILT = C is not None
WITH_CUDA = bool(getattr(C, "built_with_cuda", False))
