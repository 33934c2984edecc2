"""The models package: `ptm_kernels.models` once installed (make build) or aliased by conftest.py, else the
source tree's `models/`."""

import importlib


def model_module(name: str):
    try:
        return importlib.import_module(f"ptm_kernels.models.{name}")
    except ModuleNotFoundError:
        return importlib.import_module(f"models.{name}")
