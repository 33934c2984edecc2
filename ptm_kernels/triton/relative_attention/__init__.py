"""Relative-position attention (Transformer-XL / XLNet), forward and backward, as Triton kernels.

The interface (arguments, results, semantics) is `ptm_kernels.reference_relative` (relative_attention_fwd/bwd,
two_stream_attention_fwd/bwd), taking the same parameter objects (RelativeParams, RelativeStream). Layout [B, H, L, D], unit stride in D, any other strides; r [B, H, R, D]
(stride 0 on B when shared).

Position term without a rel-shift copy: row i (at position p_i) and key j use r row
t = r_offset - (p_i + Lk - q_len - j) = base_i + j (rows outside [0, R) give a 0 term); no [Lq, Lk] or [Lq, R]
tensor in memory. Two forms, chosen per stream by a constexpr flag:
- band (rows consecutive: positions None, row i at position i): t = c - i + j with c = r_offset - (Lk - q_len),
  so a (row tile m0.., key tile n0..) pair uses only the BLOCK_M + BLOCK_N - 1 consecutive rows of r from
  t_lo = c - (m0 + BLOCK_M - 1) + n0. The kernel loads that band (BAND rows, a power of two), computes
  PB = qv_tile . band^T [BLOCK_M, BAND] on tensor cores and selects pos[i, j] = PB[i, (m0 + BLOCK_M - 1 - i) +
  (j - n0)] with tl.gather; the backward forms the band image of dS the same way (DPB[i, c] = dS[i, c - (m0 +
  BLOCK_M - 1 - i)]) and takes dqv += DPB . band, dr[band] += DPB^T . qv_tile: two dots and BAND x D atomics per
  tile instead of BLOCK_M x BLOCK_N x D loads and atomics.
- gather (arbitrary rows: the query stream of XLNet with target_mapping): for each row, the BLOCK_N rows of r it
  needs (r[base_i + j0 + n], a [BLOCK_M, BLOCK_N, D_CHUNK] gather over D chunks), reduced in registers. On a GPU
  it is also the fallback of every stream when the band kernel does not fit in shared memory (_launch).

Forward: one program per (row tile, b * h, stream); online softmax in base 2, float32 accumulation; the two streams
of two_stream_attention_fwd run in one launch (grid axis 2 = stream). Backward: one program per (row tile, b * h,
stream) recomputes the probabilities from lse, accumulates dqu, dseg and (band form) dqv in registers (the gather
form adds dqv chunks into its float32 buffer) and adds dk, dv, dr into float32 buffers with atomics (both streams
in one launch, so their sums land in the same buffers). Dropout: attention's (_common.dropout_keep) with Lr rows,
the query stream with seed + 1; deterministic per seed (its own mask, not the reference's).

Precision: q.k^T, dO.v^T and qv.band^T take the inputs' dtype; the probabilities and dS (and DPB) stay float32 in
their dots (tf32 on a GPU for 16-bit inputs, "ieee" or tf32 for float32 per torch.backends.cuda.matmul.allow_tf32):
the position and bias gradients sum dS over many rows, and rounding dS to bfloat16 (as FlashAttention does) tripled
their error against the float64 truth.

Files: args.py (the kernels' arguments: NamedTuples built from the parameter objects, None for an absent part),
position.py (band / gather position term), scores.py (scores, visibility, row terms, the per-stream dispatch),
forward.py / backward.py (kernels), launch.py (config, launch ladder, the functions below).
"""

from .backward import _rel_bwd_kernel  # noqa: F401
from .forward import _rel_fwd_kernel  # noqa: F401
from .launch import (_GPU_CHOICE, relative_attention_bwd, relative_attention_fwd,  # noqa: F401
                     two_stream_attention_bwd, two_stream_attention_fwd)

__all__ = ["relative_attention_fwd", "relative_attention_bwd", "two_stream_attention_fwd", "two_stream_attention_bwd"]
