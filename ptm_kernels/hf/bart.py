"""`hf.apply` for BART and Pegasus: not written yet.

No family is registered here, so `ptm_kernels.hf.apply` on a BART or Pegasus model raises ValueError listing
the supported model types (instead of silently patching nothing). What it would take: the encoder/decoder
attention on `ptm_kernels.attention` with analytic masks (as `t5.py` does, without the Toeplitz part, with
`scale=head_dim**-0.5`), the post-norm (BART) / pre-norm (Pegasus) residual + LayerNorm fusion, and the
ConditionalGeneration loss on `linear_cross_entropy` (mind `final_logits_bias`).
"""
