"""`python -m ptm_kernels.info`: what was built, and which implementation each op uses on this machine."""

from __future__ import annotations

import os
import platform

import torch

from . import _ext, backend, fallbacks


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # report, don't fail
        return f"not importable ({type(exc).__name__})"


def report() -> dict:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = {}
    for op in backend.OPS:
        ops[op] = {}
        for dev in devices:
            available = [b for b in backend.BACKENDS if backend.supports(b, op, dev)]
            try:
                chosen = backend.select(op, torch.device(dev))
            except RuntimeError as exc:
                chosen = f"error: {exc}"
            ops[op][dev] = {"uses": chosen, "available": available}
    return {
        "ptm_kernels": __import__("ptm_kernels").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "PTM_KERNELS_BACKEND": os.environ.get("PTM_KERNELS_BACKEND", ""),
        "extension_built": _ext.BUILT,
        "extension_with_cuda": _ext.WITH_CUDA,
        "extension_error": _ext.ERROR,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "ops": ops,
        # calls in this process that a drop-in handed to PyTorch: "op: reason" -> count
        "fallbacks": {f"{op}: {reason}": n for (op, reason), n in sorted(fallbacks.counts().items())},
    }


def main() -> None:
    r = report()
    print(f"ptm_kernels {r['ptm_kernels']}  python {r['python']}  torch {r['torch']} (cuda {r['torch_cuda']})  "
          f"triton {r['triton']}")
    built = "yes, with CUDA" if r["extension_with_cuda"] else ("yes, CPU only" if r["extension_built"] else "no")
    print(f"extension ptm_kernels._C built: {built}")
    if r["extension_error"]:
        print(f"  (import failed: {r['extension_error']}; ops fall back to Triton or the reference)")
    print(f"GPU: {r['cuda_device'] or 'none'}   TRITON_INTERPRET={r['TRITON_INTERPRET'] or '0'}   "
          f"PTM_KERNELS_BACKEND={r['PTM_KERNELS_BACKEND'] or '(default)'}")
    print(f"\n{'op':<12} {'device':<6} {'uses':<10} available")
    for op, per_dev in r["ops"].items():
        for dev, d in per_dev.items():
            print(f"{op:<12} {dev:<6} {d['uses']:<10} {', '.join(d['available'])}")
    print("\nfallbacks to PyTorch in this process (ptm_kernels.fallbacks.counts()): "
          + ("none" if not r["fallbacks"] else ""))
    for what, n in r["fallbacks"].items():
        print(f"  {n:>8}  {what}")


if __name__ == "__main__":
    main()
