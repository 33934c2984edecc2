"""Pre-trained language models defined on ptm_kernels ops (imported as ptm_kernels.models)."""
