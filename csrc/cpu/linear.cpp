// y = x W^T + b for the few rows of a decode step (float32). Semantics: linear_fwd in
// ptm_kernels/reference_kernels.py; the op is ops/linear.py.
//
// Why: a decode step multiplies one row per sequence by every weight. MKL's GEMV runs such a [1, K] x [K, N]
// product on one thread here, and its [N, K] (nn.Linear's) form is 1.2-2.5x slower than the [K, N] one; with
// a few rows, MKL's GEMM packs the weight (the big operand) on every call. So:
// - one row: this file's GEMV, each output a dot product of a weight row with x, output features split over
//   the threads (2.3-3.3x MKL's fastest layout on this project's 2-core CPU, [K, N] in {512, 1376} x {512,
//   1024, 1376, 8000}); for a weight stored [K, N] (transformers' Conv1D, passed transposed) the columns
//   are summed down the rows instead, again split over the threads;
// - 2..kFewRows rows: (W x^T)^T, the weight as the left operand (1.1-2.8x x W^T at 4, 16 and 64 rows, the same
//   shapes);
// - more rows: at::linear.
//
// Kernel half: output features [begin, end) of the one-row product: gemv_rows takes four weight rows at a time
// so that each loaded block of x feeds four FMAs, gemv_cols four blocks of columns at a time so that each
// broadcast x[k] feeds four FMAs; compiled once per instruction set (see common.h). Host half: checks, the
// choice above, at::parallel_for over groups of output features.
#include "common.h"
#include "vec_utils.h"

namespace ptm::cpu {

struct GemvArgs {
  const float* w;     // gemv_rows: [N, K], row stride ldw, unit column stride; gemv_cols: [K, N], the same
  const float* x;     // [K]
  const float* bias;  // [N] or nullptr
  float* y;           // [N]
  int64_t K, ldw;
};

PTM_CPU_DECLARE_KERNEL(gemv_rows, (const GemvArgs&, int64_t, int64_t))
PTM_CPU_DECLARE_KERNEL(gemv_cols, (const GemvArgs&, int64_t, int64_t))

// ---------------------------------------------------------------------------------------------- kernels
namespace PTM_CPU_ISA {
namespace {

// The dot products of `R` consecutive weight rows with x, a block (two vectors) of x feeding 2R FMAs.
template <int R>
inline void dot_rows(const GemvArgs& a, int64_t n) {
  V2 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V2(0.f);
  const float* w = a.w + n * a.ldw;
  for_blocks(a.K, [&](int64_t k, auto blk) {  // a partial last block loads zeros past K
    const V2 xv = load(a.x + k, blk);
    for (int r = 0; r < R; ++r) acc[r] = fmadd(load(w + r * a.ldw + k, blk), xv, acc[r]);
  });
  for (int r = 0; r < R; ++r) a.y[n + r] = reduce_add(acc[r]) + (a.bias ? a.bias[n + r] : 0.f);
}

// Outputs [n, n + C blocks) of x W for a [K, N] weight (transformers' Conv1D): C accumulators of columns, each
// summing over k in order, one broadcast of x[k] feeding C FMAs. The last block may be partial (last).
template <int C, typename Last>
inline void sum_cols(const GemvArgs& a, int64_t n, Last last) {
  V2 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = V2(0.f);
  const float* w = a.w + n;
  for (int64_t k = 0; k < a.K; ++k, w += a.ldw) {
    const V2 xk(a.x[k]);
    for (int c = 0; c < C - 1; ++c) acc[c] = fmadd(load(w + c * kBlock, Full{}), xk, acc[c]);
    acc[C - 1] = fmadd(load(w + (C - 1) * kBlock, last), xk, acc[C - 1]);
  }
  auto put = [&](int c, auto blk) {
    const int64_t j = n + c * kBlock;
    store(a.y + j, a.bias ? acc[c] + load(a.bias + j, blk) : acc[c], blk);
  };
  for (int c = 0; c < C - 1; ++c) put(c, Full{});
  put(C - 1, last);
}

}  // namespace

void gemv_rows(const GemvArgs& a, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) dot_rows<4>(a, n);
  for (; n < end; ++n) dot_rows<1>(a, n);
}

void gemv_cols(const GemvArgs& a, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + 4 * kBlock <= end; n += 4 * kBlock) sum_cols<4>(a, n, Full{});
  for (; n + kBlock <= end; n += kBlock) sum_cols<1>(a, n, Full{});
  if (n < end) sum_cols<1>(a, n, Part{end - n});
}

}  // namespace PTM_CPU_ISA

// ------------------------------------------------------------------------------------------------- host
#ifndef PTM_CPU_KERNELS_ONLY

// Rows up to which the weight goes on the left of the GEMM (see the file comment).
constexpr int64_t kFewRows = 64;

// One row (x [1, K]) through a GEMV kernel over the outputs [0, N), split across threads in whole groups of
// `group` outputs (at::parallel_for splits its range evenly, ignoring the grain's multiples, so the range is
// groups), about GRAIN_SIZE weight elements a task; ldw: the weight's stride (GemvArgs).
template <typename Kernel>
Tensor gemv(const Tensor& x, const Tensor& weight, const OptTensor& bias, Kernel kernel, int64_t ldw,
            int64_t group) {
  const int64_t N = weight.size(0), K = x.size(1);
  const Tensor xc = x.contiguous();
  const Tensor bc = bias ? bias->contiguous() : Tensor();
  Tensor y = at::empty({1, N}, x.options());
  const GemvArgs a{weight.data_ptr<float>(), xc.data_ptr<float>(), bias ? bc.data_ptr<float>() : nullptr,
                   y.data_ptr<float>(), K, ldw};
  const int64_t groups = (N + group - 1) / group;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(K * group, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    kernel(a, begin * group, std::min(end * group, N));
  });
  return y;
}

Tensor linear_fwd(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "ptm_kernels cpu: linear x and weight must be "
              "CPU tensors, got ", x.device(), " and ", weight.device());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "ptm_kernels cpu: linear x "
              "must be [M, K] and weight [N, K], got shapes ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "ptm_kernels cpu: linear weight must have x's dtype ",
              x.scalar_type(), ", got ", weight.scalar_type());
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  if (bias) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N &&
                    bias->scalar_type() == x.scalar_type(),
                "ptm_kernels cpu: linear bias must be a CPU tensor of shape [", N, "] and dtype ",
                x.scalar_type(), ", got ", bias->scalar_type(), " ", bias->sizes());
  }
  const bool float32 = x.scalar_type() == at::kFloat;
  if (float32 && M == 1 && N > 1 && weight.stride(0) == 1) {
    // the transpose of a [K, N] matrix (x W for transformers' Conv1D, passed as W^T): down its columns, in
    // groups of 128 (four blocks of 32 on AVX-512)
    return gemv(x, weight, bias, PTM_CPU_KERNEL(gemv_cols), weight.stride(1), 128);
  }
  if (float32 && M == 1 && N > 0 && weight.stride(1) == 1) {
    return gemv(x, weight, bias, PTM_CPU_KERNEL(gemv_rows), weight.stride(0), 4);  // weight rows, four a group
  }
  if (float32 && M > 1 && M <= kFewRows) {
    const Tensor yt = bias ? at::addmm(bias->unsqueeze(1), weight, x.t()) : at::mm(weight, x.t());  // [N, M]
    return yt.t().contiguous();
  }
  return bias ? at::linear(x, weight, *bias) : at::linear(x, weight);
}

#endif  // PTM_CPU_KERNELS_ONLY
}  // namespace ptm::cpu
