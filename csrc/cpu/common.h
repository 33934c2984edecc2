// What the CPU kernel families (norms.cpp, activations.cpp, rope.cpp) share: dtype tags, runtime
// instruction-set dispatch and, for the host half only, tensor checks and row splitting.
//
// Why several instruction sets: setup.py compiles every source with baseline flags (no -mavx2), and
// at::vec::Vectorized is only fast when compiled for AVX2/AVX512. So, like ATen's own kernels, each family's
// kernel half is compiled several times: once inside the family's .cpp (namespace ptm::cpu::DEFAULT), and
// once per x86 instruction set by isa_avx2.cpp, isa_avx512.cpp and isa_avx512_bf16.cpp, which #include the
// family .cpp files with PTM_CPU_KERNELS_ONLY under `#pragma GCC target` (namespaces ptm::cpu::AVX2, AVX512,
// AVX512_BF16). The host half picks one at runtime with PTM_CPU_KERNEL(name), following
// at::get_cpu_capability(): the instruction set eager PyTorch uses, including an ATEN_CPU_CAPABILITY=default|avx2
// override. AVX512_BF16 is AVX512 plus the bfloat16 conversion instructions (one instruction instead of ~15 to
// round 32 floats to bfloat16), used when the CPU has them.
//
// Rules for a kernel half (it is compiled into TUs that may only run on AVX512 machines): raw pointers and
// plain argument structs only; no at::Tensor, TORCH_CHECK or at::parallel_for. An inline function from a
// shared header used there could be emitted with AVX512 instructions and picked by the linker for baseline
// code, so the host half validates, allocates and parallelizes.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PTM_CPU_X86_ISAS 1  // isa_avx2.cpp / isa_avx512.cpp are compiled (they need GCC's #pragma target)
#else
#define PTM_CPU_X86_ISAS 0  // baseline kernels only
#endif

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT  // the namespace of ATen's vec headers in this TU
#endif
#ifndef PTM_CPU_ISA
#define PTM_CPU_ISA CPU_CAPABILITY  // the namespace of our kernel halves in this TU
#endif

// Declares kernel `name` with parameter list `params` in every instruction-set namespace.
#if PTM_CPU_X86_ISAS
#define PTM_CPU_DECLARE_KERNEL(name, params) \
  namespace DEFAULT { void name params; }    \
  namespace AVX2 { void name params; }       \
  namespace AVX512 { void name params; }     \
  namespace AVX512_BF16 { void name params; }
#else
#define PTM_CPU_DECLARE_KERNEL(name, params) \
  namespace DEFAULT { void name params; }
#endif

namespace ptm::cpu {

// The floating dtypes the kernels take (float64 is the reference backend's job).
enum class DType : int8_t { kFloat, kBFloat16, kHalf };

}  // namespace ptm::cpu

#ifndef PTM_CPU_KERNELS_ONLY
// ------------------------------------------------------------------------------------------ host half
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/Version.h>         // at::get_cpu_capability

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "kernels.h"

namespace ptm::cpu {

enum class Isa { kDefault, kAvx2, kAvx512, kAvx512Bf16 };

// The instruction set of this machine's kernels: at::get_cpu_capability()'s, capped by the environment variable
// PTM_KERNELS_CPU_ISA=default|avx2|avx512 if set (to test the other kernels).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kDefault;
#if PTM_CPU_X86_ISAS
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") best = __builtin_cpu_supports("avx512bf16") ? Isa::kAvx512Bf16 : Isa::kAvx512;
    if (cap == "AVX2") best = Isa::kAvx2;
#endif
    const char* env = std::getenv("PTM_KERNELS_CPU_ISA");
    const std::string cap_env = env ? env : "";
    const Isa cap_isa = cap_env == "default" ? Isa::kDefault
                        : cap_env == "avx2"  ? Isa::kAvx2
                        : cap_env == "avx512" ? Isa::kAvx512
                                              : Isa::kAvx512Bf16;
    return std::min(best, cap_isa);
  }();
  return isa;
}

// The kernel `name` compiled for this machine's instruction set (a function pointer).
#if PTM_CPU_X86_ISAS
#define PTM_CPU_KERNEL(name) ::ptm::cpu::select_kernel(&DEFAULT::name, &AVX2::name, &AVX512::name, &AVX512_BF16::name)
template <typename Fn>
Fn select_kernel(Fn default_, Fn avx2, Fn avx512, Fn avx512_bf16) {
  switch (cpu_isa()) {
    case Isa::kAvx512Bf16: return avx512_bf16;
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return default_;
  }
}
#else
#define PTM_CPU_KERNEL(name) (&DEFAULT::name)
#endif

// The kernels' tag for a tensor's dtype; `what` names the argument in the error.
inline DType dtype_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default:
      TORCH_CHECK(false, "ptm_kernels cpu: ", what, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

// A [N, C] row-major input.
inline void check_rows(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "ptm_kernels cpu: ", what, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "ptm_kernels cpu: ", what, " must be 2-D [N, C], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ptm_kernels cpu: ", what, " must be contiguous, got strides ", t.strides());
}

// A second [N, C] input that must match `ref` in shape, and in dtype unless `dtype` says otherwise.
inline void check_like(const at::Tensor& t, const char* what, const at::Tensor& ref, const char* ref_name,
                       std::optional<at::ScalarType> dtype = std::nullopt) {
  check_rows(t, what);
  TORCH_CHECK(t.sizes() == ref.sizes(), "ptm_kernels cpu: ", what, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  const auto want = dtype.value_or(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, "ptm_kernels cpu: ", what, " must be ", want, ", got ", t.scalar_type());
}

// A per-channel parameter [C] (weight or bias) of x's dtype or float32.
inline void check_param(const at::Tensor& p, const char* what, int64_t C, at::ScalarType x_dtype) {
  TORCH_CHECK(p.device().is_cpu(), "ptm_kernels cpu: ", what, " must be a CPU tensor, got ", p.device());
  TORCH_CHECK(p.dim() == 1 && p.size(0) == C, "ptm_kernels cpu: ", what, " must have shape [", C, "], got ",
              p.sizes());
  TORCH_CHECK(p.is_contiguous(), "ptm_kernels cpu: ", what, " must be contiguous");
  TORCH_CHECK(p.scalar_type() == x_dtype || p.scalar_type() == at::kFloat, "ptm_kernels cpu: ", what,
              " must be float32 or the input's dtype ", x_dtype, ", got ", p.scalar_type());
}

// A per-row float32 statistic [N] (mean, rstd).
inline void check_stat(const at::Tensor& s, const char* what, int64_t N) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == N &&
                  s.is_contiguous(),
              "ptm_kernels cpu: ", what, " must be a contiguous float32 CPU tensor of shape [", N, "], got ",
              s.scalar_type(), " ", s.sizes());
}

// Whether kernels should write their outputs with streaming stores (see vec_utils.h): when the op moves much
// more memory than the last-level cache holds, so its outputs would be evicted before being read anyway; when
// every output block is 64-byte aligned (the outputs are, and so are their rows when row_bytes is given); and
// when each output is under 32 MiB. Larger outputs come straight from mmap (glibc's largest threshold), and the
// kernel zeroes each fresh page through the cache on first touch, so ordinary stores then hit in cache and
// streaming measured slower. Thresholds measured on a 32 MiB-L3 machine.
constexpr int64_t kStreamMinBytesMoved = int64_t{32} << 20;
constexpr int64_t kStreamMaxOutputBytes = int64_t{32} << 20;
inline bool want_stream(int64_t bytes_moved, int64_t output_bytes, std::initializer_list<const void*> outs,
                        int64_t row_bytes = 0) {
  bool aligned = row_bytes % 64 == 0;
  for (const void* p : outs) aligned = aligned && reinterpret_cast<uintptr_t>(p) % 64 == 0;
  return aligned && bytes_moved >= kStreamMinBytesMoved && output_bytes < kStreamMaxOutputBytes;
}

// Rows per parallel task, so that a task covers about GRAIN_SIZE elements.
inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(C, 1));
}

// Runs fn(chunk, row_begin, row_end) over a fixed split of [0, N) rows into num_chunks contiguous pieces,
// in parallel. The split depends only on N, C and the thread count, so reductions over rows done with one
// float32 buffer per chunk (then summed) are deterministic; no atomics.
inline int64_t num_row_chunks(int64_t N, int64_t C) {
  const int64_t by_work = (N + row_grain(C) - 1) / row_grain(C);
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), by_work));
}
template <typename F>
void for_row_chunks(int64_t N, int64_t num_chunks, const F& fn) {
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c, N * c / num_chunks, N * (c + 1) / num_chunks);
  });
}

}  // namespace ptm::cpu
#endif  // PTM_CPU_KERNELS_ONLY
