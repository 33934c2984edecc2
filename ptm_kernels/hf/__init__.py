"""ptm_kernels for transformers models (needs transformers; `import ptm_kernels` never imports this)."""

from .attention import register

__all__ = ["register"]
