// CPU kernels of ptm_kernels: declarations (implemented in norms.cpp, activations.cpp, rope.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ptm::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#include "../memory_bound_kernels.inc"

}  // namespace ptm::cpu
