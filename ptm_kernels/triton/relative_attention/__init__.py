"""Relative-position attention (Transformer-XL / XLNet), forward and backward, as Triton kernels.

The interface (arguments, results, semantics) is `ptm_kernels.reference_relative` (relative_attention_fwd/bwd,
two_stream_attention_fwd/bwd), taking the same parameter objects (RelativeParams, RelativeStream). Layout
[B, H, L, D], unit stride in D, any other strides; r [B, H, R, D] (stride 0 on B when shared).

Position term without a rel-shift copy: row i (at position p_i) and key j use r row
t = r_offset - (p_i + Lk - q_len - j) = base_i + j (rows outside [0, R) give a 0 term); no [Lq, Lk] or [Lq, R]
tensor in memory. Two forms, chosen per stream by a constexpr flag:
- band (rows consecutive: positions None, row i at position i): t = c - i + j with c = r_offset - (Lk - q_len),
  so a (row tile m0.., key tile n0..) pair uses only the BLOCK_M + BLOCK_N - 1 consecutive rows of r from
  t_lo = c - (m0 + BLOCK_M - 1) + n0. The kernel loads that band (BAND rows, a power of two), computes
  PB = qv_tile . band^T [BLOCK_M, BAND] on tensor cores and selects pos[i, j] = PB[i, (m0 + BLOCK_M - 1 - i) +
  (j - n0)] with tl.gather; the backward forms the band image of dS the same way (DPB[i, c] = dS[i, c - (m0 +
  BLOCK_M - 1 - i)]) and takes dqv += DPB . band, dr[band] += DPB^T . qv_tile: two dots and BAND x D atomics per
  tile instead of BLOCK_M x BLOCK_N x D loads and atomics. With 64-row tiles (16-bit inputs on a GPU) these band
  products are band-major (PB^T = band . qv_tile^T, DPB^T, dq^T): see position._pos_band. The dq kernel's
  band of 128 rows serves four 16-key steps (position._band_keys); the dk/dv kernel at D = 128 takes the position
  term per 32-row half of its tile (position._pos_row_halves). On Hopper the forward loads the band (and at
  D <= 64 its key tiles) through TMA descriptors (launch._tma_loads): a band that starts before r's first row
  is a box at a negative row coordinate, read as zeros like any row outside r.
- gather (arbitrary rows: the query stream of XLNet with target_mapping): for each row, the BLOCK_N rows of r it
  needs (r[base_i + j0 + n], a [BLOCK_M, BLOCK_N, D_CHUNK] gather over D chunks), reduced in registers. On a GPU
  it is also the fallback of every stream when the band kernel does not fit in shared memory (_launch).

Forward: one program per (row tile, b * h, stream); online softmax in base 2, float32 accumulation; the two streams
of two_stream_attention_fwd run in one launch (grid axis 2 = stream). Backward (backward.py), two kernels that
recompute the probabilities from lse: dq, one program per (row tile, b * h, stream), accumulates dq = dqu + dqv (the
gradient of q, through q + u and q + v_bias) and dseg in registers (the gather form adds dqv chunks into a float32
buffer, joined to dq at the end; only the streams whose form does so get one, launch._dqv_in_memory) and adds dr
into a float32 buffer with atomics; dkdv, one program per (key tile, b * h), walks the row tiles of both streams
and owns dk and dv. Dropout: attention's (_common.dropout_keep) with Lr
rows, the query stream with seed + 1 (modulo 2 ** 63); deterministic per seed (its own mask, not the reference's).

Precision: every dot takes the inputs' dtype, float32 accumulation: for 16-bit inputs the probabilities, dS and
its band image DPB are rounded to it before their dots (as FlashAttention does), so that every dot runs on wgmma
with 16-bit operands on Hopper (sm_90: tiles of 64 rows). Float32 inputs: tf32x3 or tf32 per
torch.backends.cuda.matmul.allow_tf32 (_common.precision); the interpreter multiplies exactly ("ieee") but still
rounds P and dS to the inputs' dtype, so the tests see the GPU's rounding.

Files: args.py (the kernels' arguments: NamedTuples built from the parameter objects, None for an absent part),
position.py (band / gather position term), scores.py (scores, visibility, row terms, the per-stream dispatch),
forward.py / backward.py (kernels), launch.py (config, launch ladder, the functions below).
"""

from .backward import _rel_bwd_dkdv_kernel, _rel_bwd_dq_kernel  # noqa: F401
from .forward import _rel_fwd_kernel  # noqa: F401
from .launch import (_GPU_CHOICE, relative_attention_bwd, relative_attention_fwd,  # noqa: F401
                     two_stream_attention_bwd, two_stream_attention_fwd)

__all__ = ["relative_attention_fwd", "relative_attention_bwd", "two_stream_attention_fwd", "two_stream_attention_bwd"]
