// The element-wise row kernels of the CPU attention kernels; declarations and semantics in attention_rows.h.
#include "attention_rows.h"

#include <cstring>
#include <limits>

namespace ptm::cpu::attn {

// Each PTM_SIMD function is compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (ifunc).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define PTM_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PTM_SIMD
#endif
// Without AVX-512's masked instructions, GCC only vectorises the exp's clamps and selects under
// -fno-trapping-math (which torch itself is built with: floating-point exceptions are never unmasked).
// Everything inlined into this region must be defined in it (std::min/max are not: plain ternaries).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace {  // helpers, inlined into the kernels below

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) for x <= ~88, in a form the vectoriser accepts (Cephes polynomial, ~1 ulp). x < -87 (including
// -inf, the masked scores) gives exactly 0.
inline float fast_exp(float x) {
  float xc = x < -87.f ? -87.f : x;
  xc = xc > 88.f ? 88.f : xc;
  const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const float two_n = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  return p * two_n * (x < -87.f ? 0.f : 1.f);
}

// The bits of dropout's keep(row, j): two rounds of murmur3's 32-bit finaliser over the column, keyed per row
// (k1, k2: DropoutRng::row_keys in attention_common.h).
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

inline uint32_t dropout_bits(uint32_t k1, uint32_t k2, uint32_t j) { return fmix32(fmix32(j ^ k1) + k2); }

}  // namespace

// s = s * scale + bias + toep (bias, toep may be null)
PTM_SIMD void scores_row(float* s, int64_t n, float scale, const float* bias, const float* toep) {
  if (bias && toep) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale + bias[j] + toep[j];
  } else if (bias || toep) {
    const float* add = bias ? bias : toep;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * scale + add[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] *= scale;
  }
}

// The max, NaN when any element is NaN (a NaN score must reach the row's result, as in torch's softmax): the
// max ignores NaN, a flag per row remembers it.
PTM_SIMD float max_row(const float* s, int64_t n) {
  float m = kNegInf;
  int nan_seen = 0;
#pragma omp simd reduction(max : m) reduction(| : nan_seen)
  for (int64_t j = 0; j < n; ++j) {
    m = s[j] > m ? s[j] : m;
    nan_seen |= s[j] != s[j];
  }
  return nan_seen ? std::numeric_limits<float>::quiet_NaN() : m;
}

// s = exp(s * a - m); returns the sum
PTM_SIMD float exp_sum_row(float* s, int64_t n, float a, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float p = fast_exp(s[j] * a - m);
    s[j] = p;
    sum += p;
  }
  return sum;
}

// s = exp(s * a - m)
PTM_SIMD void exp_row(float* s, int64_t n, float a, float m) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = fast_exp(s[j] * a - m);
}

PTM_SIMD void scale_row(float* x, int64_t n, float a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

PTM_SIMD void add_row(float* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
}

// Four keys (value rows) per pass, each used by every query row while in L1: a query (output) row is loaded
// once for four keys (values).
PTM_SIMD void dot_rows(float* s, int64_t ls, const float* q, int64_t lq, int64_t nq, const float* k, int64_t n,
                       int64_t ld, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *k0 = k + j * ld, *k1 = k0 + ld, *k2 = k1 + ld, *k3 = k2 + ld;
    for (int64_t g = 0; g < nq; ++g) {
      const float* qg = q + g * lq;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t d = 0; d < D; ++d) {
        const float x = qg[d];
        a0 += x * k0[d];
        a1 += x * k1[d];
        a2 += x * k2[d];
        a3 += x * k3[d];
      }
      float* sg = s + g * ls + j;
      sg[0] = a0;
      sg[1] = a1;
      sg[2] = a2;
      sg[3] = a3;
    }
  }
  for (; j < n; ++j) {
    const float* kj = k + j * ld;
    for (int64_t g = 0; g < nq; ++g) {
      const float* qg = q + g * lq;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += qg[d] * kj[d];
      s[g * ls + j] = acc;
    }
  }
}

PTM_SIMD void axpy_rows(float* o, int64_t lo, const float* p, int64_t lp, int64_t nq, const float* v, int64_t n,
                        int64_t ld, int64_t D) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float *v0 = v + j * ld, *v1 = v0 + ld, *v2 = v1 + ld, *v3 = v2 + ld;
    for (int64_t g = 0; g < nq; ++g) {
      float* og = o + g * lo;
      const float* pg = p + g * lp + j;
      const float p0 = pg[0], p1 = pg[1], p2 = pg[2], p3 = pg[3];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += (p0 * v0[d] + p1 * v1[d]) + (p2 * v2[d] + p3 * v3[d]);
    }
  }
  for (; j < n; ++j) {
    const float* vj = v + j * ld;
    for (int64_t g = 0; g < nq; ++g) {
      float* og = o + g * lo;
      const float pj = p[g * lp + j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) og[d] += pj * vj[d];
    }
  }
}

PTM_SIMD void mask_segments_row(float* s, int64_t n, const int64_t* k_seg, int64_t q_seg) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = k_seg[j] == q_seg ? s[j] : kNegInf;  // a select: a hidden NaN is hidden
}

// visible: the bytes of a bool array (GCC does not vectorise bool loads)
PTM_SIMD void mask_dense_row(float* s, int64_t n, const uint8_t* visible) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = visible[j] ? s[j] : kNegInf;  // a select: a hidden NaN is hidden
}

PTM_SIMD void add_segment_term_row(float* s, int64_t n, const int64_t* k_ids, int64_t q_id, float same,
                                   float other) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += k_ids[j] == q_id ? same : other;
}

PTM_SIMD void segment_sums_row(const float* ds, int64_t n, const int64_t* k_ids, int64_t q_id, float* same,
                               float* other) {
  float s = 0.f, o = 0.f;
#pragma omp simd reduction(+ : s, o)
  for (int64_t j = 0; j < n; ++j) {
    const bool in = k_ids[j] == q_id;
    s += in ? ds[j] : 0.f;
    o += in ? 0.f : ds[j];
  }
  *same = s;
  *other = o;
}

// dS = P * (dP - delta), written over dp
PTM_SIMD void ds_row(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// ------------------------------------------------------------------------------------------------ dropout
// p[j] *= keep(j0 + j) / (1 - p)
PTM_SIMD void dropout_row(float* p, int64_t n, uint32_t k1, uint32_t k2, uint32_t j0, uint32_t threshold,
                          float keep_scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout_bits(k1, k2, j0 + static_cast<uint32_t>(j)) >= threshold;
    p[j] *= keep ? keep_scale : 0.f;
  }
}

// Backward with dropout: dS = P * (dP * keep / (1 - p) - delta) over dp, and P becomes the dropped-out P
// that multiplied V (for dV).
PTM_SIMD void ds_row_dropout(float* p, float* dp, int64_t n, float delta, uint32_t k1, uint32_t k2, uint32_t j0,
                             uint32_t threshold, float keep_scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout_bits(k1, k2, j0 + static_cast<uint32_t>(j)) >= threshold;
    const float f = keep ? keep_scale : 0.f;
    dp[j] = p[j] * (dp[j] * f - delta);
    p[j] *= f;
  }
}

PTM_SIMD void dropout_keep_row(bool* keep, int64_t n, uint32_t k1, uint32_t k2, uint32_t threshold) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) keep[j] = dropout_bits(k1, k2, static_cast<uint32_t>(j)) >= threshold;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace ptm::cpu::attn
