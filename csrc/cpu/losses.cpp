// Cross-entropy over rows of logits [N, V], forward (per-row loss and logsumexp) and backward (the gradient of
// the logits, optionally written over them). Semantics: cross_entropy_fwd / cross_entropy_bwd in
// ptm_kernels/reference_kernels.py, including label smoothing, z-loss, ignore_index and NaN/Inf behaviour.
//
// Kernel half: one row at a time, in float32, over rows [begin, end); compiled once per instruction set (see
// common.h). A row is read twice per call (its max, then its exponentials): a vocabulary row (V = 32k bfloat16
// is 64 KiB) stays in L2 between the passes, and two passes need one exp per element where an online
// logsumexp needs two. Host half: checks, allocation, at::parallel_for over rows.
#include "common.h"
#include "vec_utils.h"

#include <limits>

namespace ptm::cpu {

// Arguments of the row kernels. logits and dlogits have dtype x_dtype and may be the same memory (in place).
struct CrossEntropyArgs {
  const void* logits;     // [N, V]
  const int64_t* labels;  // [N], each in [0, V) or ignore_index (the host checked)
  float* loss;            // forward: [N] out
  float* lse;             // forward: [N] out; backward: [N] in
  const float* dloss;     // backward: [N]
  void* dlogits;          // backward: [N, V] out
  int64_t V;
  int64_t ignore_index;
  float label_smoothing, z_loss;
  DType x_dtype;
};

PTM_CPU_DECLARE_KERNEL(cross_entropy_fwd_rows, (const CrossEntropyArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(cross_entropy_bwd_rows, (const CrossEntropyArgs&, int64_t, int64_t))

// ---------------------------------------------------------------------------------------------- kernels
namespace PTM_CPU_ISA {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// v with the lanes past the block's end set to `fill` (loads put zeros there).
inline V2 fill_invalid(const V2& v, Full, float) { return v; }
inline V2 fill_invalid(const V2& v, Part b, float fill) {
  const Vec f(fill);
  return {Vec::set(f, v.lo, std::min(b.n, kVec)), Vec::set(f, v.hi, std::max<int64_t>(b.n - kVec, 0))};
}

inline float to_float(const void* p, int64_t i, DType d) {
  switch (d) {
    case DType::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    case DType::kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// logsumexp of row x as max + log(sum(exp(x - max))), like torch's log_softmax: NaN when the row has a NaN or
// a +inf (inf - inf) or is all -inf, as there. *sum_x gets sum(x) when wanted (label smoothing).
template <typename T>
float row_lse(const T* x, int64_t V, float* sum_x) {
  V2 m(kNegInf), s(0.f);
  for_blocks(V, [&](int64_t j, auto blk) {
    const V2 v = load(x + j, blk);
    const V2 vm = fill_invalid(v, blk, kNegInf);
    m = {at::vec::maximum(m.lo, vm.lo), at::vec::maximum(m.hi, vm.hi)};  // NaN-propagating
    if (sum_x) s = s + v;  // zeros past the end
  });
  const float mx = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, Vec(at::vec::maximum(m.lo, m.hi)));
  if (sum_x) *sum_x = reduce_add(s);
  if (!std::isfinite(mx)) return kNaN;
  const Vec mv(mx);
  V2 e(0.f);
  for_blocks(V, [&](int64_t j, auto blk) {
    const V2 v = load(x + j, blk);
    // exp(x - max) = exp_neg(max - x), max - x >= 0 (finite here: the row has no NaN or +inf, see above)
    e = e + keep_valid(V2(exp_neg(mv - v.lo), exp_neg(mv - v.hi)), blk);
  });
  return mx + std::log(reduce_add(e));
}

template <typename T>
void ce_fwd(const CrossEntropyArgs& a, int64_t begin, int64_t end) {
  const int64_t V = a.V;
  const bool smoothing = a.label_smoothing > 0.f;
  for (int64_t i = begin; i < end; ++i) {
    const T* x = static_cast<const T*>(a.logits) + i * V;
    float sum_x = 0.f;
    const float lse = row_lse(x, V, smoothing ? &sum_x : nullptr);
    a.lse[i] = lse;
    const int64_t y = a.labels[i];
    if (y == a.ignore_index) {
      a.loss[i] = 0.f;
      continue;
    }
    float loss = lse - (1.f - a.label_smoothing) * static_cast<float>(x[y]);
    if (smoothing) loss -= a.label_smoothing / static_cast<float>(V) * sum_x;  // not at 0: 0 * inf is NaN
    if (a.z_loss > 0.f) loss += a.z_loss * lse * lse;
    a.loss[i] = loss;
  }
}

// dx = scale * (softmax(x) * (1 + 2 z lse) - s / V) - scale * (1 - s) at the label, scale = dloss (0 if ignored).
template <typename T>
void ce_bwd(const CrossEntropyArgs& a, int64_t begin, int64_t end) {
  const int64_t V = a.V;
  for (int64_t i = begin; i < end; ++i) {
    const T* x = static_cast<const T*>(a.logits) + i * V;
    T* dx = static_cast<T*>(a.dlogits) + i * V;
    const int64_t y = a.labels[i];
    const bool ignored = y == a.ignore_index;
    const float lse = a.lse[i];
    const float scale = ignored ? 0.f : a.dloss[i];
    if (!std::isfinite(lse)) {  // the reference's exp(x - NaN): NaN everywhere, ignored or not
      for_blocks(V, [&](int64_t j, auto blk) { store(dx + j, V2(kNaN), blk); });
      continue;
    }
    const float p_scale = scale * (1.f + 2.f * a.z_loss * lse);
    const float shift = scale * a.label_smoothing / static_cast<float>(V);
    // The label's entry, from x[y] read before the row is overwritten (in place).
    const float g_y = ignored ? 0.f
                              : p_scale * std::exp(static_cast<float>(x[y]) - lse) - shift -
                                    scale * (1.f - a.label_smoothing);
    const Vec lv(lse), ps(p_scale), sh(shift);
    for_blocks(V, [&](int64_t j, auto blk) {
      const V2 v = load(x + j, blk);
      const V2 g(at::vec::fmsub(exp_neg(lv - v.lo), ps, sh), at::vec::fmsub(exp_neg(lv - v.hi), ps, sh));
      store(dx + j, g, blk);
    });
    if (!ignored) dx[y] = static_cast<T>(g_y);
  }
}

}  // namespace

void cross_entropy_fwd_rows(const CrossEntropyArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.x_dtype, [&](auto t) { ce_fwd<typename decltype(t)::type>(a, begin, end); });
}
void cross_entropy_bwd_rows(const CrossEntropyArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.x_dtype, [&](auto t) { ce_bwd<typename decltype(t)::type>(a, begin, end); });
}

}  // namespace PTM_CPU_ISA

// ------------------------------------------------------------------------------------------------- host
#ifndef PTM_CPU_KERNELS_ONLY
namespace {

// logits [N, V] and labels [N] int64 with every label in [0, V) or ignore_index (IndexError otherwise, as torch).
void check_ce_inputs(const Tensor& logits, const Tensor& labels, int64_t ignore_index) {
  check_rows(logits, "logits");
  dtype_of(logits, "logits");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1, "ptm_kernels cpu: logits must have at least one class, got shape ", logits.sizes());
  TORCH_CHECK(labels.device().is_cpu() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == N && labels.is_contiguous(),
              "ptm_kernels cpu: labels must be a contiguous int64 CPU tensor of shape [", N, "], got ",
              labels.scalar_type(), " ", labels.sizes());
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < V), "ptm_kernels cpu: labels: target ", y[i],
                      " is out of bounds: expected values in [0, ", V, ") or ignore_index=", ignore_index);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& logits, const Tensor& labels, int64_t ignore_index,
                                             double label_smoothing, double z_loss) {
  check_ce_inputs(logits, labels, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  Tensor lse = at::empty({N}, logits.options().dtype(at::kFloat));
  const CrossEntropyArgs a{logits.data_ptr(), labels.data_ptr<int64_t>(), loss.data_ptr<float>(),
                           lse.data_ptr<float>(), nullptr, nullptr, V, ignore_index,
                           static_cast<float>(label_smoothing), static_cast<float>(z_loss), dtype_of(logits, "logits")};
  const auto kernel = PTM_CPU_KERNEL(cross_entropy_fwd_rows);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {loss, lse};
}

Tensor cross_entropy_bwd(const Tensor& dloss, const Tensor& logits, const Tensor& labels, const Tensor& lse,
                         int64_t ignore_index, double label_smoothing, double z_loss, bool inplace) {
  check_ce_inputs(logits, labels, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_stat(dloss, "dloss", N);
  check_stat(lse, "lse", N);
  Tensor dlogits = inplace ? logits : at::empty_like(logits);
  const CrossEntropyArgs a{logits.data_ptr(), labels.data_ptr<int64_t>(), nullptr, lse.data_ptr<float>(),
                           dloss.data_ptr<float>(), dlogits.data_ptr(), V, ignore_index,
                           static_cast<float>(label_smoothing), static_cast<float>(z_loss), dtype_of(logits, "logits")};
  const auto kernel = PTM_CPU_KERNEL(cross_entropy_bwd_rows);
  at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return dlogits;
}

#endif  // PTM_CPU_KERNELS_ONLY
}  // namespace ptm::cpu
