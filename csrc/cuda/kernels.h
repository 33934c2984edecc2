// CUDA kernels of ptm_kernels: torch-facing declarations (implemented in bindings.cpp on top of the
// torch-free launchers of launchers.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ptm::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#include "../memory_bound_kernels.inc"

}  // namespace ptm::cuda
