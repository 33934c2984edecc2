// Vector helpers for the kernel halves. Compiled once per instruction set (see common.h), so everything here
// lives in namespace ptm::cpu::CPU_CAPABILITY.
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
namespace CPU_CAPABILITY {

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
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    return {lo, hi};
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

template <typename T>
inline void store(T* p, const V2& v, Full) {
  if constexpr (std::is_same_v<T, float>) {
    v.lo.store(p);
    v.hi.store(p + kVec);
  } else {
    at::vec::convert_from_float<T>(v.lo, v.hi).store(p);
  }
}
template <typename T>
inline void store(T* p, const V2& v, Part b) {
  if constexpr (std::is_same_v<T, float>) {
    v.lo.store(p, std::min(b.n, kVec));
    if (b.n > kVec) v.hi.store(p + kVec, b.n - kVec);
  } else {
    at::vec::convert_from_float<T>(v.lo, v.hi).store(p, static_cast<int>(b.n));
  }
}

// v rounded to T's precision (round to nearest even, like a cast); the identity for float.
template <typename T>
inline V2 round_to(const V2& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v.lo, v.hi));
    return {lo, hi};
  }
}

// Stores v as T and returns what was stored, as float (what reading it back would give).
template <typename T, typename Blk>
inline V2 store_rounded(T* p, const V2& v, Blk blk) {
  store(p, v, blk);
  return round_to<T>(v);
}

// v with the lanes past the block's end set to zero (for sums of values that are not zero there).
inline V2 keep_valid(const V2& v, Full) { return v; }
inline V2 keep_valid(const V2& v, Part b) {
  const Vec zero(0.f);
  return {Vec::set(zero, v.lo, std::min(b.n, kVec)), Vec::set(zero, v.hi, std::max<int64_t>(b.n - kVec, 0))};
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

}  // namespace CPU_CAPABILITY
}  // namespace ptm::cpu
