"""The models package is `ptm_kernels.models` (pyproject maps it to models/; `make build` or any pip install of
the project provides it): one way to import it, in the tests as everywhere."""

import importlib


def model_module(name: str):
    return importlib.import_module(f"ptm_kernels.models.{name}")
