// The parameter objects of the attention kernels, mirroring ptm_kernels/kernel_params.py field for field (that
// file documents each field). The kernels take these structs; csrc/kernel_params_py.h fills them from the Python
// objects, once per call, in the binding.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace ptm::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

struct Visibility {
  bool causal = false;
  int64_t window_left = -1, window_right = -1;  // -1 = unbounded
  OptTensor key_lengths, prefix_lengths, q_segments, k_segments, dense_mask;
  OptTensor block_map;  // per tile of block_m x block_n: 0 nothing visible, 1 some, 2 all
  int64_t block_m = 0, block_n = 0;
};

struct Bias {
  OptTensor dense, toeplitz;
  bool dense_requires_grad = false, toeplitz_requires_grad = false;
};

struct Dropout {
  double p = 0.0;
  int64_t seed = 0;  // the Python object's seed tensor, read once by the binding
};

struct AttentionParams {
  double scale = 1.0;
  Visibility vis;
  Bias bias;
  Dropout dropout;
};

struct RelativeParams {
  OptTensor k_ids;
  double scale = 1.0;
  int64_t r_offset = 0, q_len = 0;
  Dropout dropout;
};

struct RelativeStream {
  Tensor qu, qv;   // q + u, q + v_bias (Python's RelativeStream.biased())
  Tensor q;
  OptTensor u, v_bias;  // None: that bias is 0 (no gradient returned for it)
  OptTensor seg, q_ids, positions;
  Visibility vis;
};

}  // namespace ptm::cpu
