"""The one activation table, by transformers' names: it lives in ptm_kernels.activations (ptm_kernels.nn.MLP
reads it too) and is re-exported here for the model files (`from . import activations`)."""

from ptm_kernels.activations import (ACTIVATIONS, Activation, apply, bias_apply, check, gated_apply,  # noqa: F401
                                     get)
