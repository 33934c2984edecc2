"""ptm-kernels: fused kernels for pre-trained language models, and the models built on them.

    import ptm_kernels as pk
    y, resid = pk.rms_norm(x, weight, residual=resid)     # fused add + RMSNorm
    q, k = pk.rope(q, k, cos, sin, offset=cache_len)       # rotary embedding, q and k in one call

`python -m ptm_kernels.info` shows what was built and which implementation each op uses here.
"""

from . import backend, nn, reference
from .attention_mask import AttentionMask
from .ops import bias_gelu, geglu, gelu, layer_norm, rms_norm, rope, silu, swiglu
from .ops import attention, scaled_dot_product_attention
from .ops import relative_attention, two_stream_attention
from .ops import cross_entropy, linear_cross_entropy, mlm_loss
from .ops import linear
from .reference import rope_cos_sin

__version__ = "0.1.0"

__all__ = [
    "rms_norm", "layer_norm", "gelu", "bias_gelu", "silu", "swiglu", "geglu", "rope", "rope_cos_sin",
    "attention", "scaled_dot_product_attention", "AttentionMask", "relative_attention", "two_stream_attention",
    "cross_entropy", "linear_cross_entropy", "mlm_loss", "linear",
    "backend", "nn", "reference",
]
