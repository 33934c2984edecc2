"""The public ops. Each file defines one family: checks, torch.library registration, autograd."""

from .activations import bias_gelu, geglu, gelu, silu, swiglu
from .norms import layer_norm, rms_norm
from .rope import rope
from .attention import attention, scaled_dot_product_attention
from .relative_attention import relative_attention, two_stream_attention
from .losses import cross_entropy, linear_cross_entropy, mlm_loss
from .linear import linear

__all__ = ["rms_norm", "layer_norm", "gelu", "bias_gelu", "silu", "swiglu", "geglu", "rope", "attention",
           "scaled_dot_product_attention", "relative_attention", "two_stream_attention", "cross_entropy",
           "linear_cross_entropy", "mlm_loss", "linear"]
