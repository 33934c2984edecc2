"""`hf.apply` for XLNet: not written yet.

No family is registered here, so `ptm_kernels.hf.apply` on an XLNet model raises ValueError listing the
supported model types (instead of silently patching nothing). What it would take: `XLNetRelativeAttention.
rel_attn_core` for both streams on `ptm_kernels.two_stream_attention` (content, position and segment terms
in one call; the permutation mask as a dense part), plus the LM loss on `linear_cross_entropy`.
"""
