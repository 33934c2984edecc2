// CPU kernels of ptm_kernels: declarations (implemented in norms.cpp, activations.cpp, rope.cpp, losses.cpp,
// linear.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ptm::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#include "../memory_bound_kernels.inc"

// cross-entropy (losses.cpp; CPU only: the CUDA path is Triton)
std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& labels, int64_t ignore_index,
                                             double label_smoothing, double z_loss);
Tensor cross_entropy_bwd(const Tensor& dloss, const Tensor& logits, const Tensor& labels, const Tensor& lse,
                         int64_t ignore_index, double label_smoothing, double z_loss, bool inplace);

// linear for a decode step's few rows (linear.cpp; CPU only: on a GPU the op is torch's linear)
Tensor linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias);

}  // namespace ptm::cpu
