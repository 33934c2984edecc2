// Activations: y = act(x + bias) and the gated y = act(gate) * up, forward and backward, for act in
// {gelu (erf), gelu_tanh, silu}. Semantics: the functions of the same names in
// ptm_kernels/reference_kernels.py.
//
// Kernel half: elementwise over a range [begin, end) of the flattened [N, C] input, in float32; compiled once
// per instruction set (see common.h). Host half: checks, allocation, at::parallel_for.
#include "common.h"
#include "vec_utils.h"

namespace ptm::cpu {

enum class Act : int8_t { kGelu, kGeluTanh, kSilu };

// Elementwise over elements [begin, end) of [N, C] tensors. x/y/dy/dx (and gate/up) have dtype x_dtype; bias
// has b_dtype (x's dtype or float32; x's without bias).
struct ActArgs {
  const void* x;     // x, or gate for the GLU
  const void* bias;  // act_*: null without bias; glu_*: up
  const void* dy;    // backward only
  void* out;         // y, or dx / dgate
  void* out2;        // glu_bwd: dup
  int64_t C;         // row length (bias index = element index % C)
  DType x_dtype, b_dtype;
  Act act;
  bool stream;  // write outputs with streaming stores (then ranges start at multiples of 64 elements)
};

// act_bwd: dbias over elements [begin, end) (whole rows) is added into the float32 buffer [C] (null: no bias).
PTM_CPU_DECLARE_KERNEL(act_fwd_elems, (const ActArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(act_bwd_elems, (const ActArgs&, int64_t, int64_t, float* dbias))
PTM_CPU_DECLARE_KERNEL(glu_fwd_elems, (const ActArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(glu_bwd_elems, (const ActArgs&, int64_t, int64_t))

// ---------------------------------------------------------------------------------------------- kernels
namespace PTM_CPU_ISA {
namespace {

// act(z) and act'(z) on vec_utils.h's fast exp and reciprocal (the Sleef exp and the divisions behind
// Vectorized's erf / tanh / sigmoid cost about twice as much), each written to avoid the cancellation in the
// reference's 1 + erf, 1 + tanh and 1 - sigmoid. Absolute errors are below 1e-6 (gelu forward) and 3e-7 (the
// rest), as accurate as the reference's float32 evaluation or more, except gelu's forward (see below).
template <Act A>
struct ActFn;

// gelu(z) = z cdf(z) with cdf = (1 + erf(x)) / 2, x = z / sqrt 2, in two ways:
//
// cdf_rational: erf by the rational approximation of Eigen / XLA, erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (+-1
// beyond). No exp, so about twice as fast; absolute error under 1e-6 (eager PyTorch's oneDNN GELU: 1.2e-6), but
// that swamps cdf(z) for z < -3 (cdf < 1.4e-3).
//
// cdf_exp: erf by Abramowitz & Stegun 7.1.26 (also Vectorized<float>::erf's), 1 - erf(|x|) = q =
// poly(t) t exp(-x^2), t = 1 / (1 + p |x|), evaluated without cancellation: cdf = q / 2 for z < 0 and 1 - q / 2
// otherwise. Absolute error 2e-7 and accurate tails; exp(-x^2) = exp(-z^2 / 2) also gives pdf(z).
//
// The forward uses cdf_rational unless a lane of the vector is below -3; the gradient, which needs the exp for
// pdf anyway, uses cdf_exp.
template <>
struct ActFn<Act::kGelu> {
  static constexpr float kInvSqrt2 = 0.70710678118654752440f;
  static Vec cdf_rational(const Vec& z) {
    const Vec x = at::vec::clamp(z * Vec(kInvSqrt2), Vec(-4.f), Vec(4.f));
    const Vec x2 = x * x;
    Vec p = at::vec::fmadd(x2, Vec(-2.72614225801306e-10f), Vec(2.77068142495902e-08f));
    p = at::vec::fmadd(x2, p, Vec(-2.10102402082508e-06f));
    p = at::vec::fmadd(x2, p, Vec(-5.69250639462346e-05f));
    p = at::vec::fmadd(x2, p, Vec(-7.34990630326855e-04f));
    p = at::vec::fmadd(x2, p, Vec(-2.95459980854025e-03f));
    p = at::vec::fmadd(x2, p, Vec(-1.60960333262415e-02f));
    Vec q = at::vec::fmadd(x2, Vec(-1.45660718464996e-05f), Vec(-2.13374055278905e-04f));
    q = at::vec::fmadd(x2, q, Vec(-1.68282697438203e-03f));
    q = at::vec::fmadd(x2, q, Vec(-7.37332916720468e-03f));
    q = at::vec::fmadd(x2, q, Vec(-1.42647390514189e-02f));  // q <= -0.0142: never 0
    const Vec half(0.5f);
    return at::vec::fmadd(half * x * p, reciprocal(q), half);
  }
  static Vec cdf_exp(const Vec& z, Vec& e) {
    const Vec one(1.f);
    // |x| capped for t where exp(-x^2) underflows anyway, keeping t finite for infinite z; e itself from the
    // uncapped |x|, so that it is exactly 0 there (gelu(-inf) = -inf * 0 = NaN and gelu(-max) = -0, as in torch).
    const Vec abs_x = z.abs() * Vec(kInvSqrt2);
    const Vec ax = at::vec::minimum(abs_x, Vec(9.f));
    const Vec t = reciprocal(at::vec::fmadd(Vec(0.3275911f), ax, one));
    Vec r = at::vec::fmadd(Vec(0.5f * 1.061405429f), t, Vec(0.5f * -1.453152027f));  // poly / 2
    r = at::vec::fmadd(r, t, Vec(0.5f * 1.421413741f));
    r = at::vec::fmadd(r, t, Vec(0.5f * -0.284496736f));
    r = at::vec::fmadd(r, t, Vec(0.5f * 0.254829592f));
    e = exp_neg(abs_x * abs_x);
    const Vec half_q = r * t * e;
    return where_negative(z, half_q, one - half_q);
  }
  static Vec fwd(const Vec& z) {
    if (any_less(z, -3.f)) {
      Vec e;
      return z * cdf_exp(z, e);
    }
    return z * cdf_rational(z);
  }
  static void fwd_grad(const Vec& z, Vec& y, Vec& dydz) {  // act' = cdf + z pdf
    Vec e;
    const Vec cdf = cdf_exp(z, e);
    y = z * cdf;
    dydz = at::vec::fmadd(z, e * Vec(0.39894228040143267794f), cdf);
  }
  static Vec grad(const Vec& z) {
    Vec y, dydz;
    fwd_grad(z, y, dydz);
    return dydz;
  }
};

// gelu_tanh(z) = z (1 + tanh(u)) / 2 = z s with s = sigmoid(2 u), u = sqrt(2 / pi) (z + 0.044715 z^3); then
// 1 - tanh(u)^2 = 4 s (1 - s) and act' = s + 2 z s (1 - s) u'(z).
template <>
struct ActFn<Act::kGeluTanh> {
  static constexpr float kSqrt2OverPi = 0.79788456080286535588f;
  static constexpr float kCoef = 0.044715f;
  static Vec sig(const Vec& z) {  // s
    return sigmoid(Vec(2.f * kSqrt2OverPi) * at::vec::fmadd(Vec(kCoef) * z, z * z, z));
  }
  static Vec fwd(const Vec& z) { return z * sig(z); }
  static void fwd_grad(const Vec& z, Vec& y, Vec& dydz) {
    Vec s, one_minus_s;
    sigmoid_both(Vec(2.f * kSqrt2OverPi) * at::vec::fmadd(Vec(kCoef) * z, z * z, z), s, one_minus_s);
    const Vec du = Vec(kSqrt2OverPi) * at::vec::fmadd(Vec(3.f * kCoef) * z, z, Vec(1.f));  // u'(z)
    y = z * s;
    dydz = at::vec::fmadd(Vec(2.f) * y * one_minus_s, du, s);
  }
  static Vec grad(const Vec& z) {
    Vec y, dydz;
    fwd_grad(z, y, dydz);
    return dydz;
  }
};

// silu(z) = z s with s = sigmoid(z); act' = s (1 + z (1 - s)).
template <>
struct ActFn<Act::kSilu> {
  static Vec fwd(const Vec& z) { return z * sigmoid(z); }
  static void fwd_grad(const Vec& z, Vec& y, Vec& dydz) {
    Vec s, one_minus_s;
    sigmoid_both(z, s, one_minus_s);
    y = z * s;
    dydz = s * at::vec::fmadd(z, one_minus_s, Vec(1.f));
  }
  static Vec grad(const Vec& z) {
    Vec y, dydz;
    fwd_grad(z, y, dydz);
    return dydz;
  }
};

template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kGelu: return f(ActFn<Act::kGelu>{});
    case Act::kGeluTanh: return f(ActFn<Act::kGeluTanh>{});
    case Act::kSilu: return f(ActFn<Act::kSilu>{});
  }
}

// Splits elements [begin, end) of [N, C] rows into pieces within one row: f(offset, column, length).
template <typename F>
inline void for_row_pieces(int64_t begin, int64_t end, int64_t C, F&& f) {
  for (int64_t i = begin; i < end;) {
    const int64_t col = i % C, len = std::min(end - i, C - col);
    f(i, col, len);
    i += len;
  }
}

template <typename T, typename B, typename Fn>
void act_fwd_impl(const ActArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.x);
  const B* bias = static_cast<const B*>(a.bias);
  T* y = static_cast<T*>(a.out);
  with_flag(bias != nullptr, [&](auto has_bias) {
    for_row_pieces(begin, end, a.C, [&](int64_t off, int64_t col, int64_t len) {
      for_blocks(len, [&](int64_t j, auto blk) {
        V2 z = load(x + off + j, blk);
        if constexpr (has_bias) z = z + load(bias + col + j, blk);  // the sum is not rounded
        store_out(y + off + j, V2(Fn::fwd(z.lo), Fn::fwd(z.hi)), blk, a.stream);
      });
    });
  });
  if (a.stream) stream_fence();
}

template <typename T, typename B, typename Fn>
void act_bwd_impl(const ActArgs& a, int64_t begin, int64_t end, float* dbias) {
  const T* x = static_cast<const T*>(a.x);
  const B* bias = static_cast<const B*>(a.bias);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.out);
  with_flag(bias != nullptr, [&](auto has_bias) {  // dbias is null exactly when bias is
    for_row_pieces(begin, end, a.C, [&](int64_t off, int64_t col, int64_t len) {
      for_blocks(len, [&](int64_t j, auto blk) {
        V2 z = load(x + off + j, blk);
        if constexpr (has_bias) z = z + load(bias + col + j, blk);
        const V2 dz = load(dy + off + j, blk) * V2(Fn::grad(z.lo), Fn::grad(z.hi));
        if constexpr (has_bias) store(dbias + col + j, dz + load(dbias + col + j, blk), blk);
        store_out(dx + off + j, dz, blk, a.stream);
      });
    });
  });
  if (a.stream) stream_fence();
}

template <typename T, typename Fn>
void glu_fwd_impl(const ActArgs& a, int64_t begin, int64_t end) {
  const T* gate = static_cast<const T*>(a.x);
  const T* up = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.out);
  for_blocks(end - begin, [&](int64_t j, auto blk) {
    const int64_t k = begin + j;
    const V2 g = load(gate + k, blk);
    store_out(y + k, V2(Fn::fwd(g.lo), Fn::fwd(g.hi)) * load(up + k, blk), blk, a.stream);
  });
  if (a.stream) stream_fence();
}

template <typename T, typename Fn>
void glu_bwd_impl(const ActArgs& a, int64_t begin, int64_t end) {
  const T* gate = static_cast<const T*>(a.x);
  const T* up = static_cast<const T*>(a.bias);
  const T* dy = static_cast<const T*>(a.dy);
  T* dgate = static_cast<T*>(a.out);
  T* dup = static_cast<T*>(a.out2);
  for_blocks(end - begin, [&](int64_t j, auto blk) {
    const int64_t k = begin + j;
    const V2 g = load(gate + k, blk), d = load(dy + k, blk);
    V2 act, grad;
    Fn::fwd_grad(g.lo, act.lo, grad.lo);
    Fn::fwd_grad(g.hi, act.hi, grad.hi);
    // dgate = up * (dy * act'(gate)): act' <= ~1.13, so only a true overflow overflows (dy * up may not)
    store_out(dgate + k, load(up + k, blk) * (d * grad), blk, a.stream);
    store_out(dup + k, d * act, blk, a.stream);                          // dup = dy * act(gate)
  });
  if (a.stream) stream_fence();
}

}  // namespace

#define PTM_ACT_TYPES(t, b, fn) typename decltype(t)::type, typename decltype(b)::type, decltype(fn)

void act_fwd_elems(const ActArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype_param(a.x_dtype, a.b_dtype, [&](auto t, auto b) {
    dispatch_act(a.act, [&](auto fn) { act_fwd_impl<PTM_ACT_TYPES(t, b, fn)>(a, begin, end); });
  });
}
void act_bwd_elems(const ActArgs& a, int64_t begin, int64_t end, float* dbias) {
  dispatch_dtype_param(a.x_dtype, a.b_dtype, [&](auto t, auto b) {
    dispatch_act(a.act, [&](auto fn) { act_bwd_impl<PTM_ACT_TYPES(t, b, fn)>(a, begin, end, dbias); });
  });
}
void glu_fwd_elems(const ActArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.x_dtype, [&](auto t) {
    dispatch_act(a.act, [&](auto fn) { glu_fwd_impl<typename decltype(t)::type, decltype(fn)>(a, begin, end); });
  });
}
void glu_bwd_elems(const ActArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.x_dtype, [&](auto t) {
    dispatch_act(a.act, [&](auto fn) { glu_bwd_impl<typename decltype(t)::type, decltype(fn)>(a, begin, end); });
  });
}

#undef PTM_ACT_TYPES

}  // namespace PTM_CPU_ISA

// ------------------------------------------------------------------------------------------------- host
#ifndef PTM_CPU_KERNELS_ONLY
namespace {

Act parse_act(const std::string& act) {
  if (act == "gelu") return Act::kGelu;
  if (act == "gelu_tanh") return Act::kGeluTanh;
  if (act == "silu") return Act::kSilu;
  TORCH_CHECK(false, "ptm_kernels cpu: unknown activation '", act, "' (expected gelu, gelu_tanh or silu)");
}

// Runs f(begin, end) over all numel elements in parallel, in pieces that start at multiples of 64 elements so
// that streaming stores stay aligned.
template <typename F>
void for_elements(int64_t numel, const F& f) {
  constexpr int64_t kUnit = 64;
  at::parallel_for(0, (numel + kUnit - 1) / kUnit, at::internal::GRAIN_SIZE / kUnit,
                   [&](int64_t begin, int64_t end) { f(begin * kUnit, std::min(end * kUnit, numel)); });
}

// Checks x [N, C] and an optional bias; fills the dtype tags and C of `a` (C = N * C without bias, so that
// elementwise ranges are never cut at row ends).
void check_act_inputs(const Tensor& x, const OptTensor& bias, ActArgs& a) {
  check_rows(x, "x");
  a.x_dtype = dtype_of(x, "x");
  a.b_dtype = a.x_dtype;
  a.C = std::max<int64_t>(x.numel(), 1);
  if (bias) {
    check_param(*bias, "bias", x.size(1), x.scalar_type());
    a.b_dtype = dtype_of(*bias, "bias");
    a.bias = bias->data_ptr();
    a.C = x.size(1);
  }
}

void check_glu_inputs(const Tensor& gate, const Tensor& up, ActArgs& a) {
  check_rows(gate, "gate");
  check_like(up, "up", gate, "gate");
  a.x_dtype = a.b_dtype = dtype_of(gate, "gate");
  a.C = std::max<int64_t>(gate.numel(), 1);
}

// Streaming stores for outputs of `x`'s shape and dtype, moving `tensors` such tensors in all.
bool act_stream(const Tensor& x, const ActArgs& a, int tensors, std::initializer_list<const void*> outs) {
  return want_stream(tensors * x.nbytes(), x.nbytes(), outs, a.bias ? a.C * x.element_size() : 0);
}

}  // namespace

Tensor act_fwd(const Tensor& x, const OptTensor& bias, const std::string& act) {
  ActArgs a{};
  a.act = parse_act(act);
  check_act_inputs(x, bias, a);
  Tensor y = at::empty_like(x);
  a.x = x.data_ptr();
  a.out = y.data_ptr();
  a.stream = act_stream(x, a, 2, {a.out});
  const auto kernel = PTM_CPU_KERNEL(act_fwd_elems);
  for_elements(x.numel(), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return y;
}

std::tuple<Tensor, Tensor> act_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias,
                                   const std::string& act) {
  ActArgs a{};
  a.act = parse_act(act);
  check_act_inputs(x, bias, a);
  check_like(dy, "dy", x, "x");
  Tensor dx = at::empty_like(x);
  a.x = x.data_ptr();
  a.dy = dy.data_ptr();
  a.out = dx.data_ptr();
  a.stream = act_stream(x, a, 3, {a.out});
  const auto kernel = PTM_CPU_KERNEL(act_bwd_elems);
  if (!bias) {
    for_elements(x.numel(), [&](int64_t begin, int64_t end) { kernel(a, begin, end, nullptr); });
    return {dx, x.new_empty({0})};
  }
  // dbias: one float32 [C] buffer per chunk of whole rows, summed at the end.
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t chunks = num_row_chunks(N, C);
  Tensor partial = at::zeros({chunks, C}, x.options().dtype(at::kFloat));
  float* p = partial.data_ptr<float>();
  for_row_chunks(N, chunks, [&](int64_t c, int64_t begin, int64_t end) {
    if (end > begin) kernel(a, begin * C, end * C, p + c * C);
  });
  return {dx, chunks == 1 ? partial[0] : partial.sum(0)};
}

Tensor glu_fwd(const Tensor& gate, const Tensor& up, const std::string& act) {
  ActArgs a{};
  a.act = parse_act(act);
  check_glu_inputs(gate, up, a);
  Tensor y = at::empty_like(gate);
  a.x = gate.data_ptr();
  a.bias = up.data_ptr();
  a.out = y.data_ptr();
  a.stream = want_stream(3 * gate.nbytes(), gate.nbytes(), {a.out});
  const auto kernel = PTM_CPU_KERNEL(glu_fwd_elems);
  for_elements(gate.numel(), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return y;
}

std::tuple<Tensor, Tensor> glu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up,
                                   const std::string& act) {
  ActArgs a{};
  a.act = parse_act(act);
  check_glu_inputs(gate, up, a);
  check_like(dy, "dy", gate, "gate");
  Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  a.x = gate.data_ptr();
  a.bias = up.data_ptr();
  a.dy = dy.data_ptr();
  a.out = dgate.data_ptr();
  a.out2 = dup.data_ptr();
  a.stream = want_stream(5 * gate.nbytes(), gate.nbytes(), {a.out, a.out2});
  const auto kernel = PTM_CPU_KERNEL(glu_bwd_elems);
  for_elements(gate.numel(), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {dgate, dup};
}

#endif  // PTM_CPU_KERNELS_ONLY
}  // namespace ptm::cpu
