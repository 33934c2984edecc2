"""The Triton backend: the kernel interface of `ptm_kernels.reference_kernels`, as Triton kernels.

Inputs may live on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported).

The attention functions take the parameter objects of ptm_kernels/kernel_params.py, like every backend. The
relative-attention launchers take them directly; the attention launchers take their fields as flat arguments,
unpacked by the adapters below, here and nowhere else.
"""

from ..kernel_params import AttentionParams, Visibility
from . import attention as _attention
from .activations import act_bwd, act_fwd, glu_bwd, glu_fwd
from .losses import cross_entropy_bwd, cross_entropy_fwd
from .attention import attention_dropout_mask, attention_tile
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


# ------------------------------------------------------------------------ parameter objects -> flat arguments
def _visibility(v: Visibility) -> tuple:
    """The launchers' visibility arguments (the block map travels separately: relative attention takes none)."""
    return (v.causal, v.window_left, v.window_right, v.key_lengths, v.prefix_lengths, v.q_segments, v.k_segments,
            v.dense_mask)


def _attention_args(p: AttentionParams) -> tuple:
    """scale ... seed of the attention launchers."""
    v, d = p.vis, p.dropout
    return (p.scale, *_visibility(v), p.bias.dense, p.bias.toeplitz, v.block_map, v.block_m, v.block_n, d.p,
            d.seed_value)


# --------------------------------------------------------------------------------------------- attention
def attention_fwd(q, k, v, p: AttentionParams):
    return _attention.attention_fwd(q, k, v, *_attention_args(p))


def attention_bwd(dout, q, k, v, out, lse, p: AttentionParams):
    return _attention.attention_bwd(dout, q, k, v, out, lse, *_attention_args(p), p.bias.dense_requires_grad,
                                    p.bias.toeplitz_requires_grad)
