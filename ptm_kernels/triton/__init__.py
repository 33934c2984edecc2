"""The Triton backend: the kernel interface of `ptm_kernels.reference_kernels`, as Triton kernels.

Inputs may live on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported).

Every function takes the parameter objects of ptm_kernels/kernel_params.py, like every backend; the launchers
(attention/launch.py, relative_attention/launch.py) take them directly.
"""

from .activations import act_bwd, act_fwd, glu_bwd, glu_fwd
from .attention import attention_bwd, attention_dropout_mask, attention_fwd, attention_tile
from .losses import cross_entropy_bwd, cross_entropy_fwd
from .norms import layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd
from .relative_attention import (relative_attention_bwd, relative_attention_fwd, two_stream_attention_bwd,
                                 two_stream_attention_fwd)
from .rope import rope_fwd

__all__ = [
    "rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
    "act_fwd", "act_bwd", "glu_fwd", "glu_bwd",
    "rope_fwd",
    "attention_fwd", "attention_bwd", "attention_dropout_mask", "attention_tile",
    "relative_attention_fwd", "relative_attention_bwd", "two_stream_attention_fwd", "two_stream_attention_bwd",
    "cross_entropy_fwd", "cross_entropy_bwd",
]
