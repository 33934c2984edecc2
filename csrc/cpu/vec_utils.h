// Vector helpers for the kernel halves. Compiled once per instruction set (see common.h), so everything here
// lives in namespace ptm::cpu::PTM_CPU_ISA.
//
// All math is float32: a "block" of kBlock = 2 * Vec::size() elements of any input dtype is loaded as two
// float vectors (a V2), because one Vectorized<bfloat16/half> holds exactly two float vectors' worth. Row loops
// go through for_blocks, which hands the body either Full{} (a whole block, no bounds checks) or Part{n} (the
// last n < kBlock elements: loads fill the missing lanes with zeros, stores write n elements).
#pragma once

#include "common.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace ptm::cpu {
namespace PTM_CPU_ISA {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlock = 2 * kVec;

// Two float vectors: one block.
struct V2 {
  Vec lo, hi;
  V2() = default;
  V2(Vec l, Vec h) : lo(l), hi(h) {}
  explicit V2(float s) : lo(s), hi(s) {}
};
inline V2 operator+(const V2& a, const V2& b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline V2 operator-(const V2& a, const V2& b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline V2 operator*(const V2& a, const V2& b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline V2 operator-(const V2& a) { return {a.lo.neg(), a.hi.neg()}; }
inline V2 fmadd(const V2& a, const V2& b, const V2& c) {
  return {at::vec::fmadd(a.lo, b.lo, c.lo), at::vec::fmadd(a.hi, b.hi, c.hi)};
}
inline float reduce_add(const V2& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, v.lo + v.hi);
}

struct Full {};             // a whole block
struct Part { int64_t n; };  // the last, partial block: n < kBlock elements

// Calls f(j, Full{}) / f(j, Part{..}) for the blocks [j, j + kBlock) covering [0, n).
template <typename F>
inline void for_blocks(int64_t n, F&& f) {
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) f(j, Full{});
  if (j < n) f(j, Part{n - j});
}

template <typename T>
inline V2 load(const T* p, Full) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(p), Vec::loadu(p + kVec)};
  } else {  // two half-width loads, each widened in place: cheaper than one load split in registers
    V2 v;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      at::vec::load_fp32_from_bf16(p, v.lo);
      at::vec::load_fp32_from_bf16(p + kVec, v.hi);
    } else {
      at::vec::load_fp32_from_fp16(p, v.lo);
      at::vec::load_fp32_from_fp16(p + kVec, v.hi);
    }
    return v;
  }
}
template <typename T>
inline V2 load(const T* p, Part b) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(p, std::min(b.n, kVec)), b.n > kVec ? Vec::loadu(p + kVec, b.n - kVec) : Vec(0.f)};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p, static_cast<int>(b.n)));
    return {lo, hi};
  }
}

// v rounded to a vector of T (T = bfloat16 or half), to nearest even like a cast.
template <typename T>
inline at::vec::Vectorized<T> from_float(const V2& v) {
#if defined(PTM_CPU_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    // One vcvtne2ps2bf16 instead of ~15 integer instructions. It treats float denormals (|v| < 1.2e-38) as
    // zero, where a cast would give a bfloat16 denormal.
    return at::vec::Vectorized<T>(reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v.hi, v.lo)));
  }
#endif
  return at::vec::convert_from_float<T>(v.lo, v.hi);
}

template <typename T>
inline void store(T* p, const V2& v, Full) {
  if constexpr (std::is_same_v<T, float>) {
    v.lo.store(p);
    v.hi.store(p + kVec);
  } else {
    from_float<T>(v).store(p);
  }
}
template <typename T>
inline void store(T* p, const V2& v, Part b) {
  if constexpr (std::is_same_v<T, float>) {
    v.lo.store(p, std::min(b.n, kVec));
    if (b.n > kVec) v.hi.store(p + kVec, b.n - kVec);
  } else {
    from_float<T>(v).store(p, static_cast<int>(b.n));
  }
}

// Streaming (non-temporal) stores write whole cache lines without reading them first and without keeping them
// in cache: for outputs much larger than the cache they save the read of each output line (a third of an
// elementwise op's memory traffic). p must be 64-byte aligned; the host decides (want_stream in common.h), and
// partial blocks use ordinary stores. Call stream_fence() after a kernel's last streaming store.
template <typename T>
inline void store_stream(T* p, const V2& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, v.lo);
    _mm512_stream_ps(p + kVec, v.hi);
  } else {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), from_float<T>(v));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v.lo);
    _mm256_stream_ps(p + kVec, v.hi);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), from_float<T>(v));
  }
#else
  store(p, v, Full{});
#endif
}
template <typename T>
inline void store_out(T* p, const V2& v, Full, bool stream) {
  if (stream) {
    store_stream(p, v);
  } else {
    store(p, v, Full{});
  }
}
template <typename T>
inline void store_out(T* p, const V2& v, Part b, bool) {
  store(p, v, b);
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// v rounded to T's precision (round to nearest even, like a cast); the identity for float.
template <typename T>
inline V2 round_to(const V2& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(from_float<T>(v));
    return {lo, hi};
  }
}

// v with the lanes past the block's end set to zero (for sums of values that are not zero there).
inline V2 keep_valid(const V2& v, Full) { return v; }
inline V2 keep_valid(const V2& v, Part b) {
  const Vec zero(0.f);
  return {Vec::set(zero, v.lo, std::min(b.n, kVec)), Vec::set(zero, v.hi, std::max<int64_t>(b.n - kVec, 0))};
}

// ---- Fast math: inline, about 1 ulp, and several times cheaper than Vectorized's exp (a Sleef call) or a
// division, which dominate activations on bfloat16 data. Plain Vectorized code on other instruction sets.

// exp(-y) for y >= 0 (Cephes' expf: exp(-y) = 2^n exp(r), n = round(-y / ln 2), |r| <= ln 2 / 2, exp(r) =
// 1 + r + r^2 P(r)). y > 87 (+inf included) gives exactly 0, where the float result would be a denormal or 0:
// sigmoid(-inf) must be 0 for silu(-inf) = -inf * 0 = NaN, as in torch. A NaN y gives a finite result: callers
// propagate NaN through their other factors.
inline Vec exp_neg(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  using R = __m512;
#define PTM_V(op) _mm512_##op
#else
  using R = __m256;
#define PTM_V(op) _mm256_##op
#endif
  const R yc = PTM_V(min_ps)(y, PTM_V(set1_ps)(87.f));
  const R m = PTM_V(mul_ps)(yc, PTM_V(set1_ps)(-1.44269504088896341f));
#if defined(CPU_CAPABILITY_AVX512)
  const R n = _mm512_roundscale_ps(m, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const R n = _mm256_round_ps(m, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  R r = PTM_V(fnmsub_ps)(n, PTM_V(set1_ps)(0.693359375f), yc);  // -y - n ln2, in two parts (Cody & Waite)
  r = PTM_V(fnmadd_ps)(n, PTM_V(set1_ps)(-2.12194440e-4f), r);
  R p = PTM_V(fmadd_ps)(PTM_V(set1_ps)(1.9875691500e-4f), r, PTM_V(set1_ps)(1.3981999507e-3f));
  p = PTM_V(fmadd_ps)(p, r, PTM_V(set1_ps)(8.3334519073e-3f));
  p = PTM_V(fmadd_ps)(p, r, PTM_V(set1_ps)(4.1665795894e-2f));
  p = PTM_V(fmadd_ps)(p, r, PTM_V(set1_ps)(1.6666665459e-1f));
  p = PTM_V(fmadd_ps)(p, r, PTM_V(set1_ps)(5.0000001201e-1f));
  p = PTM_V(fmadd_ps)(p, PTM_V(mul_ps)(r, r), PTM_V(add_ps)(r, PTM_V(set1_ps)(1.f)));
#if defined(CPU_CAPABILITY_AVX512)
  const R e = _mm512_scalef_ps(p, n);
  return _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(y, PTM_V(set1_ps)(87.f), _CMP_GT_OQ), _mm512_setzero_ps());
#else
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const R e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
  return _mm256_andnot_ps(_mm256_cmp_ps(y, PTM_V(set1_ps)(87.f), _CMP_GT_OQ), e);
#endif
#undef PTM_V
#else
  return y.neg().exp();
#endif
}

// 1 / x for finite x with 1e-30 < |x| < 1e30: the hardware estimate refined by one Newton step (about 1 ulp).
inline Vec reciprocal(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 r = _mm512_rcp14_ps(x);
  return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);  // r + r (1 - x r)
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 r = _mm256_rcp_ps(x);
  return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(1.f)), r);
#else
  return Vec(1.f) / x;
#endif
}

// a where v < 0, else b.
inline Vec where_negative(const Vec& v, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), b, a);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_blendv_ps(b, a, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ));
#else
  return Vec::blendv(b, a, v < Vec(0.f));
#endif
}

// Whether any lane of v is below c.
inline bool any_less(const Vec& v, float c) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(v, _mm512_set1_ps(c), _CMP_LT_OQ) != 0;
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(c), _CMP_LT_OQ)) != 0;
#else
  return (v < Vec(c)).zero_mask() != (1 << kVec) - 1;
#endif
}

// sigmoid(v) = 1 / (1 + exp(-v)), as e / (1 + e) for v < 0 (e = exp(-|v|)) so that exp never overflows.
inline Vec sigmoid(const Vec& v) {
  const Vec e = exp_neg(v.abs());
  return where_negative(v, e, Vec(1.f)) * reciprocal(Vec(1.f) + e);
}
// s = sigmoid(v) and 1 - s = sigmoid(-v), both without cancellation (1 - s computed as 1 minus s loses all
// accuracy once s rounds to 1, and gradients multiply it by large factors).
inline void sigmoid_both(const Vec& v, Vec& s, Vec& one_minus_s) {
  const Vec e = exp_neg(v.abs());
  const Vec r = reciprocal(Vec(1.f) + e);
  s = where_negative(v, e, Vec(1.f)) * r;
  one_minus_s = where_negative(v, Vec(1.f), e) * r;
}

// Calls f(std::true_type{}) or f(std::false_type{}): hoists a loop-invariant test out of an inner loop.
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// dispatch_dtype(d, f) calls f(Tag<T>{}) with T the C++ type of d.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
inline void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat: return f(Tag<float>{});
    case DType::kBFloat16: return f(Tag<c10::BFloat16>{});
    case DType::kHalf: return f(Tag<c10::Half>{});
  }
}
// For an input of dtype x and a parameter (weight, bias) of dtype p, which is x's dtype or float32 (the host
// checked): calls f(Tag<T>{}, Tag<P>{}).
template <typename F>
inline void dispatch_dtype_param(DType x, DType p, F&& f) {
  dispatch_dtype(x, [&](auto t) {
    using T = typename decltype(t)::type;
    if constexpr (std::is_same_v<T, float>) {
      f(t, t);
    } else {
      if (p == DType::kFloat) {
        f(t, Tag<float>{});
      } else {
        f(t, t);
      }
    }
  });
}

}  // namespace PTM_CPU_ISA
}  // namespace ptm::cpu
