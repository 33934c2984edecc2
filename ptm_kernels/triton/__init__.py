"""The Triton backend: the kernel interface of `ptm_kernels.reference_kernels`, as Triton kernels.

Inputs may live on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported).
"""

from .activations import act_bwd, act_fwd, glu_bwd, glu_fwd
from .norms import layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd
from .rope import rope_fwd

__all__ = [
    "rms_norm_fwd", "rms_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
    "act_fwd", "act_bwd", "glu_fwd", "glu_bwd",
    "rope_fwd",
]
