// CPU attention kernels of ptm_kernels: declarations. The semantics are those of the functions with the same
// names in ptm_kernels/reference_kernels.py (the kernel interface); that file is the spec.
//
// Tile size: these kernels classify (and skip) tiles of kAttentionBlockM x kAttentionBlockN, so a block map
// built by the Python layer at that size is used; a block map of any other size is ignored (still correct,
// but the dense-mask tiles are then not skipped). attention_tile() of this backend is (64, 64) for every
// head dim and dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernel_params.h"

namespace ptm::cpu {

constexpr int64_t kAttentionBlockM = 64;
constexpr int64_t kAttentionBlockN = 64;

// -> (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)
std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionParams& p);

// -> (dq, dk, dv, dbias float32 [B, H, Lq, Lk] or empty, dtoeplitz float32 [H, Lq + Lk - 1] or empty)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                                 const Tensor& v, const Tensor& out, const Tensor& lse,
                                                                 const AttentionParams& p);

// This backend's dropout keep-mask, bool [B, H, Lq, Lk] (True = kept), for `seed`.
Tensor attention_dropout_mask(int64_t seed, double dropout_p, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              c10::Device device);

}  // namespace ptm::cpu
