// RMSNorm and LayerNorm, forward and backward, optionally fused with the residual add h = x + residual.
// Semantics: the functions of the same names in ptm_kernels/reference_kernels.py.
//
// Kernel half: one row at a time, in float32, over rows [begin, end); compiled once per instruction set
// (see common.h). The row is first streamed from memory for its statistics, then re-read from cache for the
// output. Host half: checks, allocation, at::parallel_for over rows.
#include "common.h"
#include "vec_utils.h"

namespace ptm::cpu {

// Arguments of the row kernels; pointers that may be null say so. x, h, residual, dh_out, dh have x's dtype
// x_dtype; weight and bias have w_dtype (x's dtype or float32; x's dtype when there is no weight).
struct RmsFwdArgs {
  const void* x;
  const void* residual;  // null: h is x
  const void* weight;    // null: no weight
  void* y;               // dtype promote(x, weight) = w_dtype
  void* h;               // x + residual rounded to x's dtype; null without residual
  float* rstd;
  int64_t C;
  float eps;
  bool round_normed;
  bool stream;  // write y and h with streaming stores
  DType x_dtype, w_dtype;
};

struct RmsBwdArgs {
  const void* dy;  // dtype w_dtype (y's dtype)
  const void* h;
  const void* weight;
  const float* rstd;
  const void* dh_out;  // null: none
  void* dh;
  int64_t C;
  bool stream;  // write dh with streaming stores
  DType x_dtype, w_dtype;
};

struct LnFwdArgs {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;  // x's dtype
  void* h;
  float* mean;
  float* rstd;
  int64_t C;
  float eps;
  bool stream;
  DType x_dtype, w_dtype;
};

struct LnBwdArgs {
  const void* dy;  // x's dtype
  const void* h;
  const void* weight;
  const float* mean;
  const float* rstd;
  const void* dh_out;
  void* dh;
  int64_t C;
  bool stream;
  DType x_dtype, w_dtype;
};

// dweight / dbias: the sums over rows [begin, end) are added into the float32 buffers [C] (null: not wanted).
PTM_CPU_DECLARE_KERNEL(rms_norm_fwd_rows, (const RmsFwdArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(rms_norm_bwd_rows, (const RmsBwdArgs&, int64_t, int64_t, float* dweight))
PTM_CPU_DECLARE_KERNEL(layer_norm_fwd_rows, (const LnFwdArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(layer_norm_bwd_rows, (const LnBwdArgs&, int64_t, int64_t, float* dweight, float* dbias))

// ---------------------------------------------------------------------------------------------- kernels
namespace PTM_CPU_ISA {
namespace {

// One row of the forward's input h = x, or x + residual rounded to T. Later passes recompute h from x and
// residual, which are still in cache, rather than re-reading h: h may have been written with streaming stores.
template <typename T>
struct RowInput {
  const T* x;
  const T* r;  // null without residual
  T* h;        // where to store h in the first pass; null without residual
  RowInput(const void* x_, const void* r_, void* h_, int64_t i, int64_t C)
      : x(static_cast<const T*>(x_) + i * C),
        r(r_ ? static_cast<const T*>(r_) + i * C : nullptr),
        h(r_ ? static_cast<T*>(h_) + i * C : nullptr) {}
  template <typename Blk>
  V2 operator()(int64_t j, Blk blk) const {
    const V2 v = load(x + j, blk);
    return r ? round_to<T>(v + load(r + j, blk)) : v;
  }
  // The first pass: also stores h.
  template <typename Blk>
  V2 first(int64_t j, Blk blk, bool stream) const {
    const V2 v = (*this)(j, blk);
    if (h) store_out(h + j, v, blk, stream);
    return v;
  }
};

template <typename T, typename W>  // y has dtype W = promote(T, W)
void rms_fwd(const RmsFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const W* w = static_cast<const W*>(a.weight);
  for (int64_t i = begin; i < end; ++i) {
    const RowInput<T> h(a.x, a.residual, a.h, i, C);
    V2 ss(0.f);
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 v = h.first(j, blk, a.stream);
      ss = fmadd(v, v, ss);
    });
    const float rstd = 1.f / std::sqrt(reduce_add(ss) / static_cast<float>(C) + a.eps);
    a.rstd[i] = rstd;
    const V2 r(rstd);
    W* y = static_cast<W*>(a.y) + i * C;
    for_blocks(C, [&](int64_t j, auto blk) {
      V2 n = h(j, blk) * r;
      if (a.round_normed) n = round_to<T>(n);  // the LLaMA convention: normalize, cast, then scale
      if (w) n = n * load(w + j, blk);
      store_out(y + j, n, blk, a.stream);
    });
  }
  if (a.stream) stream_fence();
}

template <typename T, typename W>  // dy has dtype W
void rms_bwd(const RmsBwdArgs& a, int64_t begin, int64_t end, float* dw) {
  const int64_t C = a.C;
  const W* w = static_cast<const W*>(a.weight);
  for (int64_t i = begin; i < end; ++i) {
    const W* dy = static_cast<const W*>(a.dy) + i * C;
    const T* h = static_cast<const T*>(a.h) + i * C;
    const V2 r(a.rstd[i]);
    // With n = h * rstd and g = dy * weight: dh = rstd * (g - n * mean(g * n)) + dh_out; dweight += dy * n.
    V2 sgn(0.f);
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 n = load(h + j, blk) * r;
      V2 g = load(dy + j, blk);
      if (dw) store(dw + j, fmadd(g, n, load(dw + j, blk)), blk);
      if (w) g = g * load(w + j, blk);
      sgn = fmadd(g, n, sgn);
    });
    const V2 m(reduce_add(sgn) / static_cast<float>(C));
    const T* dh_out = a.dh_out ? static_cast<const T*>(a.dh_out) + i * C : nullptr;
    T* dh = static_cast<T*>(a.dh) + i * C;
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 n = load(h + j, blk) * r;
      V2 g = load(dy + j, blk);
      if (w) g = g * load(w + j, blk);
      V2 d = r * (g - n * m);
      if (dh_out) d = d + load(dh_out + j, blk);
      store_out(dh + j, d, blk, a.stream);
    });
  }
  if (a.stream) stream_fence();
}

template <typename T, typename W>
void ln_fwd(const LnFwdArgs& a, int64_t begin, int64_t end) {
  const int64_t C = a.C;
  const W* w = static_cast<const W*>(a.weight);
  const W* b = static_cast<const W*>(a.bias);
  for (int64_t i = begin; i < end; ++i) {
    const RowInput<T> h(a.x, a.residual, a.h, i, C);
    V2 s(0.f);
    for_blocks(C, [&](int64_t j, auto blk) { s = s + h.first(j, blk, a.stream); });
    const float mean = reduce_add(s) / static_cast<float>(C);
    const V2 mv(mean);
    // Two-pass variance (mean of squared deviations), like the reference: no cancellation.
    V2 ss(0.f);
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 d = keep_valid(h(j, blk) - mv, blk);
      ss = fmadd(d, d, ss);
    });
    const float rstd = 1.f / std::sqrt(reduce_add(ss) / static_cast<float>(C) + a.eps);
    a.mean[i] = mean;
    a.rstd[i] = rstd;
    const V2 r(rstd);
    T* y = static_cast<T*>(a.y) + i * C;
    for_blocks(C, [&](int64_t j, auto blk) {
      V2 v = (h(j, blk) - mv) * r;
      if (w) v = v * load(w + j, blk);
      if (b) v = v + load(b + j, blk);
      store_out(y + j, v, blk, a.stream);
    });
  }
  if (a.stream) stream_fence();
}

template <typename T, typename W>
void ln_bwd(const LnBwdArgs& a, int64_t begin, int64_t end, float* dw, float* db) {
  const int64_t C = a.C;
  const W* w = static_cast<const W*>(a.weight);
  for (int64_t i = begin; i < end; ++i) {
    const T* dy = static_cast<const T*>(a.dy) + i * C;
    const T* h = static_cast<const T*>(a.h) + i * C;
    const V2 mv(a.mean[i]), r(a.rstd[i]);
    // With n = (h - mean) * rstd and g = dy * weight: dh = rstd * (g - mean(g) - n * mean(g * n)) + dh_out;
    // dweight += dy * n, dbias += dy.
    V2 sg(0.f), sgn(0.f);
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 n = (load(h + j, blk) - mv) * r;
      V2 g = load(dy + j, blk);  // zero past the row's end, so the sums below need no mask
      if (dw) store(dw + j, fmadd(g, n, load(dw + j, blk)), blk);
      if (db) store(db + j, g + load(db + j, blk), blk);
      if (w) g = g * load(w + j, blk);
      sg = sg + g;
      sgn = fmadd(g, n, sgn);
    });
    const V2 mg(reduce_add(sg) / static_cast<float>(C)), mgn(reduce_add(sgn) / static_cast<float>(C));
    const T* dh_out = a.dh_out ? static_cast<const T*>(a.dh_out) + i * C : nullptr;
    T* dh = static_cast<T*>(a.dh) + i * C;
    for_blocks(C, [&](int64_t j, auto blk) {
      const V2 n = (load(h + j, blk) - mv) * r;
      V2 g = load(dy + j, blk);
      if (w) g = g * load(w + j, blk);
      V2 d = r * (g - mg - n * mgn);
      if (dh_out) d = d + load(dh_out + j, blk);
      store_out(dh + j, d, blk, a.stream);
    });
  }
  if (a.stream) stream_fence();
}

}  // namespace

void rms_norm_fwd_rows(const RmsFwdArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    rms_fwd<typename decltype(t)::type, typename decltype(w)::type>(a, begin, end);
  });
}
void rms_norm_bwd_rows(const RmsBwdArgs& a, int64_t begin, int64_t end, float* dweight) {
  dispatch_dtype_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    rms_bwd<typename decltype(t)::type, typename decltype(w)::type>(a, begin, end, dweight);
  });
}
void layer_norm_fwd_rows(const LnFwdArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    ln_fwd<typename decltype(t)::type, typename decltype(w)::type>(a, begin, end);
  });
}
void layer_norm_bwd_rows(const LnBwdArgs& a, int64_t begin, int64_t end, float* dweight, float* dbias) {
  dispatch_dtype_param(a.x_dtype, a.w_dtype, [&](auto t, auto w) {
    ln_bwd<typename decltype(t)::type, typename decltype(w)::type>(a, begin, end, dweight, dbias);
  });
}

}  // namespace PTM_CPU_ISA

// ------------------------------------------------------------------------------------------------- host
#ifndef PTM_CPU_KERNELS_ONLY
namespace {

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// Checks x [N, C], an optional residual, weight and bias; returns the weight/bias dtype tag (x's without).
DType check_norm_inputs(const Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual) {
  check_rows(x, "x");
  const DType xd = dtype_of(x, "x");
  const int64_t C = x.size(1);
  TORCH_CHECK(C >= 1, "ptm_kernels cpu: the normalized dimension C must be >= 1, got x of shape ", x.sizes());
  if (residual) check_like(*residual, "residual", x, "x");
  if (weight) check_param(*weight, "weight", C, x.scalar_type());
  if (bias) check_param(*bias, "bias", C, x.scalar_type());
  if (weight) return dtype_of(*weight, "weight");
  if (bias) return dtype_of(*bias, "bias");
  return xd;
}

// The float32 [C] sum over chunks of per-chunk partial sums [num_chunks, C].
Tensor sum_chunks(const Tensor& partial) { return partial.size(0) == 1 ? partial[0] : partial.sum(0); }

}  // namespace

std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight,
                                               const OptTensor& residual, double eps, bool round_normed) {
  const DType wd = check_norm_inputs(x, weight, std::nullopt, residual);
  const int64_t N = x.size(0), C = x.size(1);
  const auto y_dtype = weight ? at::promote_types(x.scalar_type(), weight->scalar_type()) : x.scalar_type();
  Tensor y = at::empty({N, C}, x.options().dtype(y_dtype));
  Tensor h = residual ? at::empty_like(x) : x.new_empty({0});
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const bool stream = want_stream(x.nbytes() * (residual ? 3 : 1) + y.nbytes(), y.nbytes(),
                                  {y.data_ptr(), residual ? h.data_ptr() : nullptr}, C * x.element_size()) &&
                      (C * y.element_size()) % 64 == 0;
  const RmsFwdArgs a{x.data_ptr(), ptr_or_null(residual), ptr_or_null(weight), y.data_ptr(),
                     residual ? h.data_ptr() : nullptr, rstd.data_ptr<float>(), C, static_cast<float>(eps),
                     round_normed, stream, dtype_of(x, "x"), wd};
  const auto kernel = PTM_CPU_KERNEL(rms_norm_fwd_rows);
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {y, h, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                        const Tensor& rstd, const OptTensor& dh_out) {
  const DType wd = check_norm_inputs(h, weight, std::nullopt, std::nullopt);
  const int64_t N = h.size(0), C = h.size(1);
  const auto y_dtype = weight ? at::promote_types(h.scalar_type(), weight->scalar_type()) : h.scalar_type();
  check_like(dy, "dy", h, "h", y_dtype);
  check_stat(rstd, "rstd", N);
  if (dh_out) check_like(*dh_out, "dh_out", h, "h");
  Tensor dh = at::empty_like(h);
  const bool stream = want_stream(dy.nbytes() + h.nbytes() * (dh_out ? 3 : 2), h.nbytes(), {dh.data_ptr()},
                                  C * h.element_size());
  const RmsBwdArgs a{dy.data_ptr(), h.data_ptr(), ptr_or_null(weight), rstd.data_ptr<float>(),
                     ptr_or_null(dh_out), dh.data_ptr(), C, stream, dtype_of(h, "h"), wd};
  const auto kernel = PTM_CPU_KERNEL(rms_norm_bwd_rows);
  if (!weight) {
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) { kernel(a, begin, end, nullptr); });
    return {dh, h.new_empty({0})};
  }
  const int64_t chunks = num_row_chunks(N, C);
  Tensor partial = at::zeros({chunks, C}, h.options().dtype(at::kFloat));
  float* p = partial.data_ptr<float>();
  for_row_chunks(N, chunks, [&](int64_t c, int64_t begin, int64_t end) { kernel(a, begin, end, p + c * C); });
  return {dh, sum_chunks(partial)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                          const OptTensor& bias, const OptTensor& residual,
                                                          double eps) {
  check_norm_inputs(x, weight, bias, residual);
  // The kernels take one dtype for weight and bias: if one is float32 and the other x's dtype, upcast the
  // other (exact; the math is float32 anyway).
  OptTensor w = weight, b = bias;
  if (w && b && w->scalar_type() != b->scalar_type()) {
    w = w->to(at::kFloat);
    b = b->to(at::kFloat);
  }
  const DType wd = check_norm_inputs(x, w, b, residual);
  const int64_t N = x.size(0), C = x.size(1);
  Tensor y = at::empty_like(x);
  Tensor h = residual ? at::empty_like(x) : x.new_empty({0});
  Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const bool stream = want_stream(x.nbytes() * (residual ? 4 : 2), x.nbytes(),
                                  {y.data_ptr(), residual ? h.data_ptr() : nullptr}, C * x.element_size());
  const LnFwdArgs a{x.data_ptr(), ptr_or_null(residual), ptr_or_null(w), ptr_or_null(b), y.data_ptr(),
                    residual ? h.data_ptr() : nullptr, mean.data_ptr<float>(), rstd.data_ptr<float>(), C,
                    static_cast<float>(eps), stream, dtype_of(x, "x"), wd};
  const auto kernel = PTM_CPU_KERNEL(layer_norm_fwd_rows);
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& dh_out, bool has_bias) {
  const DType wd = check_norm_inputs(h, weight, std::nullopt, std::nullopt);
  const int64_t N = h.size(0), C = h.size(1);
  check_like(dy, "dy", h, "h");
  check_stat(mean, "mean", N);
  check_stat(rstd, "rstd", N);
  if (dh_out) check_like(*dh_out, "dh_out", h, "h");
  Tensor dh = at::empty_like(h);
  const bool stream = want_stream(h.nbytes() * (dh_out ? 4 : 3), h.nbytes(), {dh.data_ptr()}, C * h.element_size());
  const LnBwdArgs a{dy.data_ptr(), h.data_ptr(), ptr_or_null(weight), mean.data_ptr<float>(),
                    rstd.data_ptr<float>(), ptr_or_null(dh_out), dh.data_ptr(), C, stream, dtype_of(h, "h"), wd};
  const auto kernel = PTM_CPU_KERNEL(layer_norm_bwd_rows);
  // Absent gradients are distinct empty tensors: outputs of a torch.library op may not alias each other.
  const auto empty = [&] { return h.new_empty({0}); };
  if (!weight && !has_bias) {
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { kernel(a, b, e, nullptr, nullptr); });
    return {dh, empty(), empty()};
  }
  // One float32 [C] buffer per chunk and parameter, summed over chunks at the end.
  const int64_t chunks = num_row_chunks(N, C);
  Tensor pw = weight ? at::zeros({chunks, C}, h.options().dtype(at::kFloat)) : empty();
  Tensor pb = has_bias ? at::zeros({chunks, C}, h.options().dtype(at::kFloat)) : empty();
  float* dw = weight ? pw.data_ptr<float>() : nullptr;
  float* db = has_bias ? pb.data_ptr<float>() : nullptr;
  for_row_chunks(N, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    kernel(a, begin, end, dw ? dw + c * C : nullptr, db ? db + c * C : nullptr);
  });
  return {dh, weight ? sum_chunks(pw) : empty(), has_bias ? sum_chunks(pb) : empty()};
}

#endif  // PTM_CPU_KERNELS_ONLY
}  // namespace ptm::cpu
