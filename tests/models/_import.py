"""The models package: `ptm_kernels.models` once installed (make build maps it to models/), else the source
tree's `models/` (the repository root is on sys.path under pytest)."""

import importlib


def model_module(name: str):
    try:
        return importlib.import_module(f"ptm_kernels.models.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"models.{name}")
