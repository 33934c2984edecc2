// CPU relative-position attention (Transformer-XL / XLNet), forward and backward, one stream or XLNet's two
// streams: declarations. Arguments, results and semantics are those of the functions with the same names in
// ptm_kernels/reference_relative.py (the kernel interface); that file is the spec.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "kernel_params.h"

namespace ptm::cpu {

// -> (out [B, H, Lr, D] in qu's dtype, lse [B, H, Lr] float32)
std::tuple<Tensor, Tensor> relative_attention_fwd(const Tensor& k, const Tensor& v, const Tensor& r,
                                                  const RelativeParams& p, const RelativeStream& s);

// -> (dq, du, dv_bias, dk, dv, dr float32 [B, H, R, D], dseg float32 [B, H, Lr, 2] or empty): dq = the gradients of
// q + u and q + v_bias summed, in q's dtype; du, dv_bias float32 [H, D] (their sums over batch and rows), empty
// where that bias is None.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> relative_attention_bwd(
    const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& k, const Tensor& v, const Tensor& r,
    const RelativeParams& p, const RelativeStream& s);

// Two streams (content c, query g) against the same k, v, r; the query stream's dropout uses seed + 1.
// -> (out_c, lse_c, out_g, lse_g)
std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd(const Tensor& k, const Tensor& v, const Tensor& r,
                                                                    const RelativeParams& p, const RelativeStream& c,
                                                                    const RelativeStream& g);

// -> (dq_c, du_c, dv_bias_c, dseg_c, dq_g, du_g, dv_bias_g, dseg_g, dk, dv, dr); dk, dv, dr summed over both
// streams.
using TwoStreamGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor>;
TwoStreamGrads two_stream_attention_bwd(
    const Tensor& dout_c, const Tensor& out_c, const Tensor& lse_c, const Tensor& dout_g, const Tensor& out_g,
    const Tensor& lse_g, const Tensor& k, const Tensor& v, const Tensor& r, const RelativeParams& p,
    const RelativeStream& c, const RelativeStream& g);

}  // namespace ptm::cpu
