// CPU relative-position attention (Transformer-XL / XLNet), forward and backward, one stream or XLNet's two
// streams: declarations. Arguments, results and semantics are those of the functions with the same names in
// ptm_kernels/reference_relative.py (the kernel interface); that file is the spec.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ptm::cpu {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// -> (out [B, H, Lr, D] in qu's dtype, lse [B, H, Lr] float32)
std::tuple<Tensor, Tensor> relative_attention_fwd(
    const Tensor& k, const Tensor& v, const Tensor& r, const OptTensor& k_ids, double scale, int64_t r_offset,
    int64_t q_len, double dropout_p, int64_t seed, const Tensor& qu, const Tensor& qv, const OptTensor& seg,
    const OptTensor& q_ids, const OptTensor& positions, bool causal, int64_t window_left, int64_t window_right,
    const OptTensor& key_lengths, const OptTensor& prefix_lengths, const OptTensor& q_segments,
    const OptTensor& k_segments, const OptTensor& dense_mask);

// -> (dqu, dqv, dk, dv, dr float32 [B, H, R, D], dseg float32 [B, H, Lr, 2] or empty)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> relative_attention_bwd(
    const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& k, const Tensor& v, const Tensor& r,
    const OptTensor& k_ids, double scale, int64_t r_offset, int64_t q_len, double dropout_p, int64_t seed,
    const Tensor& qu, const Tensor& qv, const OptTensor& seg, const OptTensor& q_ids, const OptTensor& positions,
    bool causal, int64_t window_left, int64_t window_right, const OptTensor& key_lengths,
    const OptTensor& prefix_lengths, const OptTensor& q_segments, const OptTensor& k_segments,
    const OptTensor& dense_mask);

// Two streams (content _c, query _g) against the same k, v, r; the query stream's dropout uses seed + 1.
// -> (out_c, lse_c, out_g, lse_g)
std::tuple<Tensor, Tensor, Tensor, Tensor> two_stream_attention_fwd(
    const Tensor& k, const Tensor& v, const Tensor& r, const OptTensor& k_ids, double scale, int64_t r_offset,
    int64_t q_len, double dropout_p, int64_t seed,
    const Tensor& qu_c, const Tensor& qv_c, const OptTensor& seg_c, const OptTensor& q_ids_c,
    const OptTensor& positions_c, bool causal_c, int64_t wl_c, int64_t wr_c, const OptTensor& kl_c,
    const OptTensor& pl_c, const OptTensor& qs_c, const OptTensor& ks_c, const OptTensor& dense_c,
    const Tensor& qu_g, const Tensor& qv_g, const OptTensor& seg_g, const OptTensor& q_ids_g,
    const OptTensor& positions_g, bool causal_g, int64_t wl_g, int64_t wr_g, const OptTensor& kl_g,
    const OptTensor& pl_g, const OptTensor& qs_g, const OptTensor& ks_g, const OptTensor& dense_g);

// -> (dqu_c, dqv_c, dseg_c, dqu_g, dqv_g, dseg_g, dk, dv, dr); dk, dv, dr summed over both streams.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> two_stream_attention_bwd(
    const Tensor& dout_c, const Tensor& out_c, const Tensor& lse_c, const Tensor& dout_g, const Tensor& out_g,
    const Tensor& lse_g, const Tensor& k, const Tensor& v, const Tensor& r, const OptTensor& k_ids, double scale,
    int64_t r_offset, int64_t q_len, double dropout_p, int64_t seed,
    const Tensor& qu_c, const Tensor& qv_c, const OptTensor& seg_c, const OptTensor& q_ids_c,
    const OptTensor& positions_c, bool causal_c, int64_t wl_c, int64_t wr_c, const OptTensor& kl_c,
    const OptTensor& pl_c, const OptTensor& qs_c, const OptTensor& ks_c, const OptTensor& dense_c,
    const Tensor& qu_g, const Tensor& qv_g, const OptTensor& seg_g, const OptTensor& q_ids_g,
    const OptTensor& positions_g, bool causal_g, int64_t wl_g, int64_t wr_g, const OptTensor& kl_g,
    const OptTensor& pl_g, const OptTensor& qs_g, const OptTensor& ks_g, const OptTensor& dense_g);

}  // namespace ptm::cpu
