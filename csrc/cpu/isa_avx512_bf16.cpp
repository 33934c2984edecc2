// The kernel halves of the CPU kernel families compiled for AVX512 (F, BW, VL, DQ) plus the bfloat16 conversion
// instructions (AVX512_BF16), in namespace ptm::cpu::AVX512_BF16: the host halves call them when
// at::get_cpu_capability() is AVX512 and the CPU has AVX512_BF16. ATen's vec headers are the AVX512 ones; only
// vec_utils.h's float -> bfloat16 rounding differs. See common.h.
#define PTM_CPU_KERNELS_ONLY
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define PTM_CPU_ISA AVX512_BF16
#define PTM_CPU_AVX512_BF16
#include "common.h"

#if PTM_CPU_X86_ISAS
#pragma GCC target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// sleef.h (included by ATen's vec headers) declares its vector functions only under the compiler's
// instruction-set macros, which #pragma GCC target does not define: include it once with them.
#include <immintrin.h>
#define __AVX__ 1
#define __AVX512F__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX512F__

#include "activations.cpp"
#include "linear.cpp"
#include "losses.cpp"
#include "norms.cpp"
#include "rope.cpp"
#endif
