"""The Triton backend: the kernel interface of `ptm_kernels.reference_kernels`, as Triton kernels.

Inputs may live on a GPU, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported).

The attention functions take the parameter objects of ptm_kernels/kernel_params.py, like every backend (the
attention launchers in attention/launch.py take them directly). The relative-attention launchers still take
their fields as flat arguments: the adapters below unpack the objects into those argument lists.
"""

from ..kernel_params import RelativeParams, RelativeStream, Visibility
from . import relative_attention as _relative
from .activations import act_bwd, act_fwd, glu_bwd, glu_fwd
from .attention import attention_bwd, attention_dropout_mask, attention_fwd, attention_tile
from .losses import cross_entropy_bwd, cross_entropy_fwd
from .norms import layer_norm_bwd, layer_norm_fwd, rms_norm_bwd, rms_norm_fwd
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


def _shared(p: RelativeParams) -> tuple:
    """k_ids ... seed of the relative-attention launchers (after k, v, r)."""
    return p.k_ids, p.scale, p.r_offset, p.q_len, p.dropout.p, p.dropout.seed_value


def _stream(s: RelativeStream) -> tuple:
    return (s.qu, s.qv, s.seg, s.q_ids, s.positions, *_visibility(s.vis))


# --------------------------------------------------------------------------------------- relative attention
def relative_attention_fwd(k, v, r, p: RelativeParams, s: RelativeStream):
    return _relative.relative_attention_fwd(k, v, r, *_shared(p), *_stream(s))


def relative_attention_bwd(dout, out, lse, k, v, r, p: RelativeParams, s: RelativeStream):
    return _relative.relative_attention_bwd(dout, out, lse, k, v, r, *_shared(p), *_stream(s))


def two_stream_attention_fwd(k, v, r, p: RelativeParams, c: RelativeStream, g: RelativeStream):
    return _relative.two_stream_attention_fwd(k, v, r, *_shared(p), *_stream(c), *_stream(g))


def two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, p: RelativeParams,
                             c: RelativeStream, g: RelativeStream):
    return _relative.two_stream_attention_bwd(dout_c, out_c, lse_c, dout_g, out_g, lse_g, k, v, r, *_shared(p),
                                              *_stream(c), *_stream(g))
