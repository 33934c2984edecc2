"""Fused attention with composable masks, forward and backward (FlashAttention-2 style), as Triton kernels.

The interface (arguments, results, dtypes, mask semantics) is `ptm_kernels.reference_kernels.attention_*`:

    attention_fwd(q, k, v, p: AttentionParams)
        -> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32, natural log, -inf for empty rows)
    attention_bwd(dout, q, k, v, out, lse, p: AttentionParams)
        -> (dq, dk, dv, dbias float32 [B, H, Lq, Lk] or empty, dtoeplitz float32 [H, Lq + Lk - 1] or empty)
       (p: ptm_kernels/kernel_params.py; launch.py turns its Visibility, Bias and Dropout into the kernels'
       grouped arguments, masks.MaskArgs and the dropout tuple)
    attention_dropout_mask(seed, dropout_p, B, H, Lq, Lk, device) -> bool [B, H, Lq, Lk] keep-mask
    attention_tile(head_dim, dtype, device) -> (block_m, block_n) the forward tile, for the block map

Layout [B, H, L, D] with any strides (unit stride in D); k/v may have Hk | H heads (head h reads kv head
h // (H // Hk)); D from 16 to 256 (padded to a power of two, masked); Lq != Lk allowed.

Forward. One program per (query tile, b, h) (and per key split, see decoding below); q stays in registers,
K/V tiles stream through, online softmax in base 2 (log2(e) folded into the scale), float32 accumulation.
Which key tiles a program visits:
  * analytic parts only (causal, window, key lengths, prefix-LM): the visible key range of the query tile is
    computed in closed form, split into [masked | full | masked] sub-ranges; "full" tiles run with no
    per-element mask work at all (three loops, like the tutorial's STAGE split; without a window the first
    is empty and not compiled). On a masked tile the analytic parts are one interval of visible keys per
    query (of queries per key in dK/dV), compared with the tile's column offsets: one or two comparisons
    per score, no per-element key index.
  * element-wise parts (segment ids, dense bool mask) with a usable block map: the map is converted once
    (torch, cached) into per-row lists of partial tiles and of full tiles (FlexAttention's kv_indices /
    full_kv_indices): skipped tiles are never visited, full tiles skip mask work. A map built at another tile
    size is converted conservatively (a tile is skipped only if every map tile it overlaps is 0, full only if
    every one is 2), so any (block_m, block_n) is accepted.
  * element-wise parts without a map: every tile of the analytic range, masked.
Additive bias ([B|1, H|1, Lq, Lk] strided, stride 0 on broadcast dims) and the Toeplitz table
(table[h, i - j + Lk - 1]) are added to the scaled scores in-kernel. A row with no visible key (or whose
every score is -inf) gives out = 0, lse = -inf, never NaN.

Dropout: _common.dropout_keep (one Philox call per 16 keys of a row, an 8-bit threshold per key, so p is
rounded to a multiple of 1/256; kept values are scaled by 1 / (1 - p)). The forward, both backward kernels
and attention_dropout_mask() compute the same bits, so the mask can be replayed through the reference.

Decoding (few query tiles, long keys): the key tiles are split across programs (flash-decoding); each split
writes a float32 partial output and its lse, and a combine kernel merges them. Under GQA, while G * Lq <= 64
(and no block map), the G query heads of a kv head share one program (PACK_GROUP: row r is query row r % Lq
of head r // Lq, the head per row for masks, bias, dropout counter, out and lse), so each K / V tile is read
once per group instead of G times.

TMA (Hopper, 16-bit inputs, D <= 128, a Triton with host tensor descriptors): the forward loads Q / K / V, and
the dQ and dK/dV kernels Q / K / V / dO, through [B, H, L, D] descriptors (boxes of one (b, h), rows past L and
columns past D read as zeros) when the operands' base and strides are 16-byte multiples; no per-thread address
registers, so D = 128 runs 128 x 128 forward tiles with 3 stages. Elsewhere (the interpreter unless forced by
the test hook, older Triton, other GPUs, float32) pointer loads.

Backward (FlashAttention-2): a preprocess kernel (delta = rowsum(dO * O)), a dK/dV kernel (one program per
key tile; loops over the query tiles, and over the query heads that share the kv head for GQA, so dk/dv are
summed in registers; when that gives too few programs the group is split and float32 partials are summed
by torch), and a dQ kernel (one program per query tile, looping over key tiles). Deterministic except for
dtoeplitz. dbias: the dQ kernel writes float32 dS into a [B, H, Lq, Lk] buffer (only when requested).
dtoeplitz: per-diagonal sums of dS, accumulated by the dQ kernel with tl.atomic_add into the float32
[H, Lq + Lk - 1] table (float atomics: the summation order, hence the last bits, may vary run to run).

Precision: 16-bit inputs use tensor-core dots with float32 accumulation (P and dS are rounded to the input
dtype before their dots, as FlashAttention does). float32 inputs on a GPU use input_precision="tf32x3"
(each operand split into two tf32 parts, three tensor-core products: ~1e-6 relative error, float32-level;
plain "ieee" FMA dots replicate operands in registers and spill heavily), or "tf32" when
torch.backends.cuda.matmul.allow_tf32 is True; under the interpreter they are exact float32. The
interpreter multiplies bfloat16 tiles as raw bits, so there (only) bfloat16 operands are widened first.

Tiles / warps / stages per head dim, dtype and "heaviness" of the mask are in _fwd_configs / _bwd_configs,
picked by compiling for sm_90 offline (no spills, shared memory in budget) around FlexAttention's sm90
defaults and the tutorial's; a config that runs out of resources on the device falls back to the next,
smaller one. No autotuning. Under TRITON_INTERPRET=1 (CPU tensors) one small config is used.

Tile classification invariant: a tile on the unmasked ("full") path lies entirely inside [0, Lq) x [0, Lk),
so its loads carry no bounds masks; ragged last tiles always take the masked path.

Files: masks.py (visibility, tile ranges), forward.py / backward.py (kernels), configs.py (tiles per head dim,
dtype, device), block_map.py (block map -> tile lists), launch.py (the functions below).
"""

from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _bwd_preprocess_kernel  # noqa: F401
from .configs import _CONFIG_OVERRIDE, _bwd_configs, _fwd_configs, attention_tile  # noqa: F401
from .forward import _attn_combine_kernel, _attn_fwd_kernel, _dropout_mask_kernel  # noqa: F401
from .launch import _FALLBACK, attention_bwd, attention_dropout_mask, attention_fwd  # noqa: F401

__all__ = ["attention_fwd", "attention_bwd", "attention_dropout_mask", "attention_tile"]
