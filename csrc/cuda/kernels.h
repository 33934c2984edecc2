// CUDA kernels of ptm_kernels: torch-facing declarations (implemented in bindings.cpp on top of the
// torch-free launchers of launchers.h). The semantics of each function are those of the function with
// the same name in ptm_kernels/reference_kernels.py (the kernel interface); that file is the spec.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace ptm::cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// norms.cu
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight,
                                               const OptTensor& residual, double eps, bool round_normed);
std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                        const Tensor& rstd, const OptTensor& dh_out);
std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                          const OptTensor& bias, const OptTensor& residual,
                                                          double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& dh_out, bool has_bias);

// activations.cu ("gelu", "gelu_tanh", "silu")
Tensor act_fwd(const Tensor& x, const OptTensor& bias, const std::string& act);
std::tuple<Tensor, Tensor> act_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias,
                                   const std::string& act);
Tensor glu_fwd(const Tensor& gate, const Tensor& up, const std::string& act);
std::tuple<Tensor, Tensor> glu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up,
                                   const std::string& act);

// rope.cu
Tensor rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                bool interleaved, int64_t rotary_dim, bool inverse);

}  // namespace ptm::cuda
