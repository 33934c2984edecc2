// The kernel halves of the CPU kernel families compiled for AVX2 + FMA, in namespace ptm::cpu::AVX2: the host
// halves call them when at::get_cpu_capability() is AVX2. See common.h.
#define PTM_CPU_KERNELS_ONLY
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "common.h"

#if PTM_CPU_X86_ISAS
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// sleef.h (included by ATen's vec headers) declares its vector functions only under the compiler's
// instruction-set macros, which #pragma GCC target does not define: include it once with them.
#include <immintrin.h>
#define __AVX__ 1
#include <sleef.h>
#undef __AVX__

#include "activations.cpp"
#include "linear.cpp"
#include "losses.cpp"
#include "norms.cpp"
#include "rope.cpp"
#endif
