// CPU attention, forward and backward: tiled, online softmax (flash-attention style), every mask part of
// ptm_kernels/reference_kernels.py without materialising an [Lq, Lk] tensor for the analytic parts.
//
// Layout of the work:
// - Scores are classified per tile of kAttentionBlockM x kAttentionBlockN (query rows x keys): 0 = nothing
//   visible (never computed), 1 = partly visible (per-element masks), 2 = all visible (no mask work). The
//   analytic parts (causal, window, key lengths, prefix-LM, segment ids) are classified from per-row visible
//   key intervals, a block map built at our tile size adds the dense mask's knowledge.
// - Tile GEMMs go through at::mm_out / addmm_ (MKL), which are efficient from 64 x 64 tiles up; runs of
//   consecutive visible tiles are merged into one larger GEMM. Everything else (softmax, masks, dropout,
//   dS) is element-wise code that the compiler vectorises, cloned per x86 ISA level (AVX-512 / AVX2 / SSE2)
//   since the extension is built without -march flags.
// - All math in float32: half/bfloat16 inputs are converted once up front.
// - Forward: one work item per (b, h, group of kGroupTiles query tiles); consecutive tiles of a group whose
//   key tiles have identical statuses share their GEMMs. Backward: one per (b, kv head, key-tile partition), which
//   owns dK/dV of its key tiles (GQA heads of a group are summed inside the item) and adds into a dQ buffer
//   of its partition; partitions only exist when there are fewer (b, kv head) pairs than threads, and are
//   summed in a fixed order, so results do not depend on scheduling.
#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace ptm::cpu {
namespace {

constexpr int64_t kTileM = kAttentionBlockM;
constexpr int64_t kTileN = kAttentionBlockN;
// GEMM sizes. Measured with MKL on this machine: 64 x 64 x 64 tiles already run at ~95% of its best, the
// larger GEMMs gain a few percent more (less packing per flop).
constexpr int64_t kGroupTiles = 4;   // forward: query tiles per work item, sharing GEMMs when they can
constexpr int64_t kMaxChunkN = 256;  // forward: keys per GEMM (a run of visible key tiles)
constexpr int64_t kMaxChunkM = 256;  // backward: query rows per GEMM (a run of visible query tiles)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------- element-wise math
// Each PTM_SIMD function is compiled for AVX-512, AVX2 and baseline x86-64, picked at load time (ifunc).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define PTM_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PTM_SIMD
#endif

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) for x <= ~88, in a form the vectoriser accepts (Cephes polynomial, ~1 ulp). x < -87 (including
// -inf, the masked scores) gives exactly 0.
inline float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.f), 88.f);
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
  return x < -87.f ? 0.f : p * two_n;
}

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

PTM_SIMD float max_row(const float* s, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
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

PTM_SIMD void mask_segments_row(float* s, int64_t n, const int64_t* k_seg, int64_t q_seg) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += k_seg[j] == q_seg ? 0.f : kNegInf;  // an add, not a branch
}

// visible: the bytes of a bool array (GCC does not vectorise bool loads)
PTM_SIMD void mask_dense_row(float* s, int64_t n, const uint8_t* visible) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += visible[j] ? 0.f : kNegInf;  // an add, not a branch
}

// dS = P * (dP - delta), written over dp
PTM_SIMD void ds_row(const float* p, float* dp, int64_t n, float delta) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// ------------------------------------------------------------------------------------------------ dropout
// keep(b, h, i, j) depends only on (seed, row = (b * H + h) * Lq + i, j): a counter-based hash, so the
// backward regenerates the forward's mask without storing it. Two rounds of murmur3's 32-bit finaliser
// over the column, keyed per row by splitmix64.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

inline uint32_t dropout_bits(uint32_t k1, uint32_t k2, uint32_t j) { return fmix32(fmix32(j ^ k1) + k2); }

struct Dropout {
  bool on = false;
  uint64_t seed_key = 0;
  uint32_t threshold = 0;  // keep iff bits >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)

  Dropout() = default;
  Dropout(double p, int64_t seed) {
    on = p > 0;
    seed_key = splitmix64(static_cast<uint64_t>(seed));
    threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
    keep_scale = p < 1 ? static_cast<float>(1.0 / (1.0 - p)) : 0.f;
  }
  std::pair<uint32_t, uint32_t> row_keys(int64_t row) const {
    const uint64_t k = splitmix64(seed_key ^ static_cast<uint64_t>(row));
    return {static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
  }
};

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

// --------------------------------------------------------------------------------------- tensors, GEMMs
// A [B, H, L, D] float32 tensor with unit stride along D.
struct Heads {
  float* ptr;
  int64_t sb, sh, sl;
  explicit Heads(const Tensor& t)
      : ptr(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {}
  float* row(int64_t b, int64_t h, int64_t i) const { return ptr + b * sb + h * sh + i * sl; }
};

// A [B, H, Lq, Lk] mask or bias (stride 0 on broadcast dims) with unit stride along Lk.
template <typename T>
struct ScoreMatrix {
  const T* ptr = nullptr;
  int64_t sb = 0, sh = 0, si = 0;
  const T* row(int64_t b, int64_t h, int64_t i) const { return ptr + b * sb + h * sh + i * si; }
  explicit operator bool() const { return ptr != nullptr; }
};

// The rows x cols matrix at p (row stride ld), as a tensor view for at::mm.
Tensor mat(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}
// Its transpose (cols x rows).
Tensor mat_t(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {cols, rows}, {1, ld}, at::TensorOptions().dtype(at::kFloat));
}

void gemm(Tensor c, const Tensor& a, const Tensor& b) { at::mm_out(c, a, b); }  // c = a @ b
void gemm_acc(Tensor c, const Tensor& a, const Tensor& b, float alpha = 1.f) { c.addmm_(a, b, 1, alpha); }

// Float32 with unit stride in the last dim (no copy when it already is).
Tensor as_float_rows(const Tensor& t) {
  Tensor f = t.to(at::kFloat);
  return f.stride(-1) == 1 ? f : f.contiguous();
}

// A [B, H, Lq, Lk] view (stride 0 on broadcast dims) in dtype `dt` with unit stride along Lk, copying
// only the non-broadcast part when a copy is needed.
Tensor score_matrix_tensor(const Tensor& t, at::ScalarType dt) {
  if (t.scalar_type() == dt && (t.stride(3) == 1 || t.size(3) <= 1)) return t;
  Tensor c = t;
  for (int64_t d = 0; d < 3; ++d)
    if (c.size(d) > 1 && c.stride(d) == 0) c = c.narrow(d, 0, 1);
  return c.to(dt).contiguous().expand(t.sizes());
}

template <typename T>
ScoreMatrix<T> score_matrix(const Tensor& t) {
  ScoreMatrix<T> m;
  m.ptr = t.data_ptr<T>();
  m.sb = t.stride(0);
  m.sh = t.stride(1);
  m.si = t.stride(2);
  return m;
}

const int64_t* long_ptr(const OptTensor& t, std::vector<Tensor>& keep_alive) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep_alive.push_back(t->to(at::kLong).contiguous());
  return keep_alive.back().data_ptr<int64_t>();
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Runs the items [0, n) on at most at::get_num_threads() workers that take the next item when done (the
// items' costs differ under masks). worker(next) is called once per worker; next() returns item indices,
// n or more when all are taken.
template <typename Worker>
void for_each_worker(int64_t n, const Worker& worker) {
  if (n <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker([&] { return next.fetch_add(1); }); });
}

// ------------------------------------------------------------------------------------- the mask parts
using ColumnRuns = std::vector<std::pair<int64_t, int64_t>>;  // [begin, end) key ranges

struct Problem {
  int64_t B, H, Hk, Lq, Lk, D, nqt, nkt;
  float scale;
  bool causal;
  int64_t window_left, window_right;
  const int64_t* key_lengths = nullptr;     // [B]
  const int64_t* prefix_lengths = nullptr;  // [B]
  const int64_t* q_segments = nullptr;      // [B, Lq]
  const int64_t* k_segments = nullptr;      // [B, Lk]
  std::vector<int64_t> q_seg_range, k_seg_range;  // per (b, tile): min, max id
  ScoreMatrix<bool> dense;
  ScoreMatrix<float> bias;
  const float* toeplitz_rev = nullptr;  // [H, Lq + Lk - 1] reversed, so a score row reads it forwards
  const int8_t* block_map = nullptr;
  int64_t bm_stride[4] = {0, 0, 0, 0};
  Dropout dropout;
  std::vector<Tensor> keep_alive;  // converted copies the pointers above point into

  int64_t kv_head(int64_t h) const { return h / (H / Hk); }
  bool elementwise_masks() const { return q_segments || dense; }

  // Visible keys of query row i from the analytic parts (causal, prefix, window, key lengths): [lo, hi),
  // lo == hi when none. Both ends are non-decreasing in i, which the tile classification relies on.
  void row_range(int64_t b, int64_t i, int64_t& lo, int64_t& hi) const {
    const int64_t pos = i + Lk - Lq;  // the query's position in key coordinates (bottom-right aligned)
    lo = 0;
    hi = Lk;
    if (causal) hi = std::min(hi, std::max(pos + 1, prefix_lengths ? prefix_lengths[b] : int64_t(0)));
    if (window_left >= 0) lo = std::max(lo, pos - window_left);
    if (window_right >= 0) hi = std::min(hi, pos + window_right + 1);
    if (key_lengths) hi = std::min(hi, key_lengths[b]);
    lo = std::min(lo, Lk);
    hi = std::max(hi, lo);
  }

  // 0: no visible entry in tile (qt, kt), 1: some, 2: all.
  int tile_status(int64_t b, int64_t h, int64_t qt, int64_t kt) const {
    const int64_t i0 = qt * kTileM, i1 = std::min(i0 + kTileM, Lq);
    const int64_t j0 = kt * kTileN, j1 = std::min(j0 + kTileN, Lk);
    int64_t lo_first, hi_first, lo_last, hi_last;
    row_range(b, i0, lo_first, hi_first);
    row_range(b, i1 - 1, lo_last, hi_last);
    if (j0 >= hi_last || j1 <= lo_first) return 0;
    int status = (j0 >= lo_last && j1 <= hi_first) ? 2 : 1;
    if (q_segments) {
      const int64_t* qr = &q_seg_range[2 * (b * nqt + qt)];
      const int64_t* kr = &k_seg_range[2 * (b * nkt + kt)];
      if (qr[1] < kr[0] || kr[1] < qr[0]) return 0;
      if (!(qr[0] == qr[1] && kr[0] == kr[1] && qr[0] == kr[0])) status = 1;
    }
    if (block_map) {
      const int8_t v = block_map[b * bm_stride[0] + h * bm_stride[1] + qt * bm_stride[2] + kt * bm_stride[3]];
      status = std::min<int>(status, v);
    } else if (dense) {
      status = std::min(status, 1);
    }
    return status;
  }

  // s holds q_i . k_j for the keys [c0, c1); makes it the score: biased, -inf where masked. The
  // per-element masks (segments, dense) are applied only on the ranges in `partial`. Returns the factor
  // s still has to be multiplied by: when nothing is added, the scale is left to the exponential (saving
  // a pass over the scores).
  float score_row(float* s, int64_t b, int64_t h, int64_t i, int64_t c0, int64_t c1,
                  const ColumnRuns& partial) const {
    const int64_t n = c1 - c0;
    const bool fold_scale = !bias && !toeplitz_rev && scale > 0;  // a positive factor keeps the max
    if (!fold_scale)
      scores_row(s, n, scale, bias ? bias.row(b, h, i) + c0 : nullptr,
                 toeplitz_rev ? toeplitz_rev + h * (Lq + Lk - 1) + (Lq - 1 - i) + c0 : nullptr);
    int64_t lo, hi;
    row_range(b, i, lo, hi);
    lo = std::min(std::max(lo, c0), c1);
    hi = std::min(std::max(hi, lo), c1);
    std::fill(s, s + (lo - c0), kNegInf);
    std::fill(s + (hi - c0), s + n, kNegInf);
    if (elementwise_masks()) {
      for (const auto& [r0, r1] : partial) {
        const int64_t a = std::max(r0, lo), e = std::min(r1, hi);
        if (a >= e) continue;
        if (q_segments) mask_segments_row(s + (a - c0), e - a, k_segments + b * Lk + a, q_segments[b * Lq + i]);
        if (dense)
          mask_dense_row(s + (a - c0), e - a, reinterpret_cast<const uint8_t*>(dense.row(b, h, i) + a));
      }
    }
    return fold_scale ? scale : 1.f;
  }

  std::pair<uint32_t, uint32_t> dropout_keys(int64_t b, int64_t h, int64_t i) const {
    return dropout.row_keys((b * H + h) * Lq + i);
  }
};

// Min and max id of every tile of `tile` ids along each batch row of a [B, L] segment-id array.
std::vector<int64_t> segment_ranges(const int64_t* seg, int64_t B, int64_t L, int64_t tile) {
  const int64_t nt = ceil_div(L, tile);
  std::vector<int64_t> r(2 * B * nt);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t* s = seg + b * L + t * tile;
      const auto [mn, mx] = std::minmax_element(s, s + std::min(tile, L - t * tile));
      r[2 * (b * nt + t)] = *mn;
      r[2 * (b * nt + t) + 1] = *mx;
    }
  return r;
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal,
                     int64_t window_left, int64_t window_right, const OptTensor& key_lengths,
                     const OptTensor& prefix_lengths, const OptTensor& q_segments, const OptTensor& k_segments,
                     const OptTensor& dense_mask, const OptTensor& bias, const OptTensor& toeplitz,
                     const OptTensor& block_map, int64_t block_m, int64_t block_n, double dropout_p,
                     int64_t seed) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "attention (cpu): tensors must be on the CPU");
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "attention (cpu): dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attention: q, k, v must have the same dtype");
  Problem P;
  P.dropout = Dropout(dropout_p, seed);
  P.B = q.size(0);
  P.H = q.size(1);
  P.Lq = q.size(2);
  P.D = q.size(3);
  P.Hk = k.size(1);
  P.Lk = k.size(2);
  TORCH_CHECK(k.size(0) == P.B && v.size(0) == P.B && v.size(1) == P.Hk && v.size(2) == P.Lk &&
                  k.size(3) == P.D && v.size(3) == P.D,
              "attention: k and v must be [B, Hk, Lk, D] with q's B and D");
  TORCH_CHECK(P.Hk > 0 && P.H % P.Hk == 0, "attention: q heads must be a multiple of k/v heads");
  P.nqt = ceil_div(P.Lq, kTileM);
  P.nkt = ceil_div(P.Lk, kTileN);
  P.scale = static_cast<float>(scale);
  P.causal = causal;
  P.window_left = window_left;
  P.window_right = window_right;
  P.key_lengths = long_ptr(key_lengths, P.keep_alive);
  P.prefix_lengths = long_ptr(prefix_lengths, P.keep_alive);
  P.q_segments = long_ptr(q_segments, P.keep_alive);
  P.k_segments = long_ptr(k_segments, P.keep_alive);
  TORCH_CHECK(!P.q_segments == !P.k_segments, "attention: q_segments and k_segments come together");
  if (P.q_segments) {
    P.q_seg_range = segment_ranges(P.q_segments, P.B, P.Lq, kTileM);
    P.k_seg_range = segment_ranges(P.k_segments, P.B, P.Lk, kTileN);
  }
  const std::vector<int64_t> score_shape{P.B, P.H, P.Lq, P.Lk};
  if (given(dense_mask)) {
    TORCH_CHECK(dense_mask->sizes() == score_shape && dense_mask->scalar_type() == at::kBool,
                "attention: dense_mask must be a bool [B, H, Lq, Lk] view");
    P.keep_alive.push_back(score_matrix_tensor(*dense_mask, at::kBool));
    P.dense = score_matrix<bool>(P.keep_alive.back());
  }
  if (given(bias)) {
    TORCH_CHECK(bias->sizes() == score_shape, "attention: bias must be a [B, H, Lq, Lk] view");
    P.keep_alive.push_back(score_matrix_tensor(*bias, at::kFloat));
    P.bias = score_matrix<float>(P.keep_alive.back());
  }
  if (given(toeplitz)) {
    TORCH_CHECK(toeplitz->dim() == 2 && toeplitz->size(0) == P.H && toeplitz->size(1) == P.Lq + P.Lk - 1,
                "attention: toeplitz must be [H, Lq + Lk - 1]");
    P.keep_alive.push_back(toeplitz->to(at::kFloat).flip({1}).contiguous());
    P.toeplitz_rev = P.keep_alive.back().data_ptr<float>();
  }
  // The block map is only usable when built at our tile size.
  if (given(block_map) && block_m == kTileM && block_n == kTileN) {
    const Tensor& bm = *block_map;
    TORCH_CHECK(bm.dim() == 4 && bm.size(0) == P.B && bm.size(1) == P.H && bm.size(2) == P.nqt &&
                    bm.size(3) == P.nkt,
                "attention: block_map must be [B, H, ceil(Lq / block_m), ceil(Lk / block_n)]");
    P.keep_alive.push_back(bm.to(at::kChar));
    const Tensor& c = P.keep_alive.back();
    P.block_map = c.data_ptr<int8_t>();
    for (int d = 0; d < 4; ++d) P.bm_stride[d] = c.stride(d);
  }
  return P;
}

// ---------------------------------------------------------------------------------------------- forward
struct ForwardWorkspace {
  std::vector<float> s, o, m, l;
  std::vector<int8_t> status;  // [kGroupTiles, nkt]: the key tiles' statuses of each query tile of a group
  ColumnRuns partial;
  explicit ForwardWorkspace(const Problem& P)
      : s(kGroupTiles * kTileM * kMaxChunkN),
        o(kGroupTiles * kTileM * P.D),
        m(kGroupTiles * kTileM),
        l(kGroupTiles * kTileM),
        status(kGroupTiles * P.nkt) {}
};

// Query rows [i0, i0 + rows) of head (b, h), whose key tiles in [kt_begin, kt_end) all have the statuses
// `status` (none visible outside): online softmax over runs of visible key tiles; writes out rows and lse.
void forward_rows(const Problem& P, const Heads& Q, const Heads& K, const Heads& V, const Heads& O, float* lse,
                  ForwardWorkspace& ws, int64_t b, int64_t h, int64_t i0, int64_t rows, const int8_t* status,
                  int64_t kt_begin, int64_t kt_end) {
  const int64_t D = P.D, kv = P.kv_head(h);
  float* o = ws.o.data();
  float* s = ws.s.data();
  std::fill(o, o + rows * D, 0.f);
  std::fill(ws.m.begin(), ws.m.end(), kNegInf);
  std::fill(ws.l.begin(), ws.l.end(), 0.f);

  const Tensor q_rows = mat(Q.row(b, h, i0), rows, D, Q.sl);
  const Tensor o_rows = mat(o, rows, D, D);
  for (int64_t kt = kt_begin; kt < kt_end;) {
    if (status[kt] == 0) {
      ++kt;
      continue;
    }
    // A run of visible tiles, one GEMM wide.
    const int64_t first = kt;
    ws.partial.clear();
    for (; kt < kt_end && status[kt] != 0 && (kt - first) * kTileN < kMaxChunkN; ++kt) {
      if (status[kt] != 1) continue;
      const int64_t j0 = kt * kTileN, j1 = std::min(j0 + kTileN, P.Lk);
      if (!ws.partial.empty() && ws.partial.back().second == j0)
        ws.partial.back().second = j1;
      else
        ws.partial.emplace_back(j0, j1);
    }
    const int64_t c0 = first * kTileN, c1 = std::min(kt * kTileN, P.Lk), n = c1 - c0;
    gemm(mat(s, rows, n, n), q_rows, mat_t(K.row(b, kv, c0), n, D, K.sl));
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s + r * n;
      const float a = P.score_row(sr, b, h, i0 + r, c0, c1, ws.partial);
      const float m_new = std::max(ws.m[r], max_row(sr, n) * a);
      if (m_new == kNegInf) {  // nothing visible in this row so far
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float alpha = std::exp(ws.m[r] - m_new);
      ws.l[r] = ws.l[r] * alpha + exp_sum_row(sr, n, a, m_new);
      ws.m[r] = m_new;
      if (alpha != 1.f) scale_row(o + r * D, D, alpha);
      if (P.dropout.on) {
        const auto [k1, k2] = P.dropout_keys(b, h, i0 + r);
        dropout_row(sr, n, k1, k2, static_cast<uint32_t>(c0), P.dropout.threshold, P.dropout.keep_scale);
      }
    }
    gemm_acc(o_rows, mat(s, rows, n, n), mat(V.row(b, kv, c0), n, D, V.sl));
  }

  // Normalise; rows with no visible key stay 0 with lse = -inf.
  for (int64_t r = 0; r < rows; ++r) {
    float* out_row = O.row(b, h, i0 + r);
    const float l = ws.l[r];
    if (l > 0) {
      const float inv = 1.f / l;
      for (int64_t d = 0; d < D; ++d) out_row[d] = o[r * D + d] * inv;
      lse[i0 + r] = ws.m[r] + std::log(l);
    } else {
      std::fill(out_row, out_row + D, 0.f);
      lse[i0 + r] = kNegInf;
    }
  }
}

// Query tiles [qt0, qt1) of head (b, h). Consecutive tiles whose key tiles have the same statuses (every
// tile without a mask, tiles of one packed document, ...) share their GEMMs: larger GEMMs run faster.
void forward_tiles(const Problem& P, const Heads& Q, const Heads& K, const Heads& V, const Heads& O, float* lse,
                   ForwardWorkspace& ws, int64_t b, int64_t h, int64_t qt0, int64_t qt1) {
  // Key tiles between the first row's first visible key and the last row's last one.
  int64_t lo, hi, lo_last, hi_last;
  P.row_range(b, qt0 * kTileM, lo, hi);
  P.row_range(b, std::min(qt1 * kTileM, P.Lq) - 1, lo_last, hi_last);
  const int64_t kt_begin = lo / kTileN, kt_end = hi_last > lo ? ceil_div(hi_last, kTileN) : kt_begin;
  int8_t* st = ws.status.data();
  for (int64_t g = 0; g < qt1 - qt0; ++g)
    for (int64_t kt = kt_begin; kt < kt_end; ++kt) st[g * P.nkt + kt] = P.tile_status(b, h, qt0 + g, kt);

  for (int64_t g = 0; g < qt1 - qt0;) {
    int64_t g_end = g + 1;
    while (g_end < qt1 - qt0 &&
           std::equal(st + g * P.nkt + kt_begin, st + g * P.nkt + kt_end, st + g_end * P.nkt + kt_begin))
      ++g_end;
    const int64_t i0 = (qt0 + g) * kTileM, i1 = std::min((qt0 + g_end) * kTileM, P.Lq);
    forward_rows(P, Q, K, V, O, lse, ws, b, h, i0, i1 - i0, st + g * P.nkt, kt_begin, kt_end);
    g = g_end;
  }
}

// --------------------------------------------------------------------------------------------- backward
struct BackwardWorkspace {
  std::vector<float> p, dp;
  std::vector<int> status;
  ColumnRuns all, none;
  explicit BackwardWorkspace(const Problem& P) : p(kMaxChunkM * kTileN), dp(kMaxChunkM * kTileN), status(P.nqt) {}
};

struct BackwardOutputs {
  Heads dq_parts;  // [parts * B, H, Lq, D]: partition `part` adds into batch part * B + b
  Heads dk, dv;    // [B, Hk, Lk, D]
  float* dbias;    // [B, H, Lq, Lk] or null
  float* dtoeplitz_rev;  // [parts * B, H, Lq + Lk - 1] (reversed like Problem::toeplitz_rev) or null
};

// Key tile kt of kv head (b, kv), against every visible query tile of every head of its group.
void backward_tile(const Problem& P, const Heads& Q, const Heads& K, const Heads& V, const Heads& dO,
                   const float* lse, const float* delta, const BackwardOutputs& G, BackwardWorkspace& ws,
                   int64_t b, int64_t kv, int64_t kt, int64_t part) {
  const int64_t j0 = kt * kTileN, j1 = std::min(j0 + kTileN, P.Lk), n = j1 - j0, D = P.D;
  const int64_t group = P.H / P.Hk;
  const Tensor k_tile = mat(K.row(b, kv, j0), n, D, K.sl);
  const Tensor kt_tile = mat_t(K.row(b, kv, j0), n, D, K.sl);
  const Tensor vt_tile = mat_t(V.row(b, kv, j0), n, D, V.sl);
  const Tensor dk_tile = mat(G.dk.row(b, kv, j0), n, D, G.dk.sl);
  const Tensor dv_tile = mat(G.dv.row(b, kv, j0), n, D, G.dv.sl);
  float* p = ws.p.data();
  float* dp = ws.dp.data();
  ws.all.assign(1, {j0, j1});

  for (int64_t h = kv * group; h < (kv + 1) * group; ++h) {
    for (int64_t qt = 0; qt < P.nqt; ++qt) ws.status[qt] = P.tile_status(b, h, qt, kt);
    const int64_t bh = b * P.H + h;
    for (int64_t qt = 0; qt < P.nqt;) {
      if (ws.status[qt] == 0) {
        ++qt;
        continue;
      }
      // A run of visible query tiles, one GEMM tall.
      const int64_t first = qt;
      while (qt < P.nqt && ws.status[qt] != 0 && (qt - first) * kTileM < kMaxChunkM) ++qt;
      const int64_t r0 = first * kTileM, r1 = std::min(qt * kTileM, P.Lq), rows = r1 - r0;
      const Tensor q_rows = mat(Q.row(b, h, r0), rows, D, Q.sl);
      const Tensor do_rows = mat(dO.row(b, h, r0), rows, D, dO.sl);

      // P = exp(S - lse)
      gemm(mat(p, rows, n, n), q_rows, kt_tile);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r0 + r;
        float* pr = p + r * n;
        const float a = P.score_row(pr, b, h, i, j0, j1, ws.status[i / kTileM] == 1 ? ws.all : ws.none);
        const float l = lse[bh * P.Lq + i];
        exp_row(pr, n, a, l == kNegInf ? kPosInf : l);  // a row with no visible key has P = 0
      }
      // dS = P * (dP - delta), dP = dO V^T (dropout: P and dP through the keep-mask)
      gemm(mat(dp, rows, n, n), do_rows, vt_tile);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = r0 + r;
        float* pr = p + r * n;
        float* dsr = dp + r * n;
        const float dl = delta[bh * P.Lq + i];
        if (P.dropout.on) {
          const auto [k1, k2] = P.dropout_keys(b, h, i);
          ds_row_dropout(pr, dsr, n, dl, k1, k2, static_cast<uint32_t>(j0), P.dropout.threshold,
                         P.dropout.keep_scale);
        } else {
          ds_row(pr, dsr, n, dl);
        }
        if (G.dbias) std::copy(dsr, dsr + n, G.dbias + (bh * P.Lq + i) * P.Lk + j0);
        if (G.dtoeplitz_rev) {
          const int64_t len = P.Lq + P.Lk - 1;
          add_row(G.dtoeplitz_rev + ((part * P.B + b) * P.H + h) * len + (P.Lq - 1 - i) + j0, dsr, n);
        }
      }
      gemm_acc(dv_tile, mat_t(p, rows, n, n), do_rows);
      gemm_acc(dk_tile, mat_t(dp, rows, n, n), q_rows, P.scale);
      gemm_acc(mat(G.dq_parts.row(part * P.B + b, h, r0), rows, D, G.dq_parts.sl), mat(dp, rows, n, n), k_tile,
               P.scale);
    }
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------ entry points
std::tuple<Tensor, Tensor> attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, double scale, bool causal, int64_t window_left,
    int64_t window_right, const OptTensor& key_lengths, const OptTensor& prefix_lengths,
    const OptTensor& q_segments, const OptTensor& k_segments, const OptTensor& dense_mask, const OptTensor& bias,
    const OptTensor& toeplitz, const OptTensor& block_map, int64_t block_m, int64_t block_n, double dropout_p,
    int64_t seed) {
  const Problem P = make_problem(q, k, v, scale, causal, window_left, window_right, key_lengths, prefix_lengths,
                                 q_segments, k_segments, dense_mask, bias, toeplitz, block_map, block_m, block_n,
                                 dropout_p, seed);
  const Tensor qf = as_float_rows(q), kf = as_float_rows(k), vf = as_float_rows(v);
  Tensor out = at::empty({P.B, P.H, P.Lq, P.D}, q.options().dtype(at::kFloat));
  Tensor lse = at::empty({P.B, P.H, P.Lq}, q.options().dtype(at::kFloat));
  const Heads Q(qf), K(kf), V(vf), O(out);
  float* lse_ptr = lse.data_ptr<float>();

  // Items: (b, h) major, then groups of kGroupTiles query tiles of a head from last to first (under causal
  // masks the last are the most expensive: taking them first balances the workers).
  const int64_t groups = ceil_div(P.nqt, kGroupTiles), n_items = P.B * P.H * groups;
  for_each_worker(n_items, [&](const auto& next) {
    ForwardWorkspace ws(P);
    for (int64_t it; (it = next()) < n_items;) {
      const int64_t bh = it / groups, qt0 = (groups - 1 - it % groups) * kGroupTiles;
      forward_tiles(P, Q, K, V, O, lse_ptr + bh * P.Lq, ws, bh / P.H, bh % P.H, qt0,
                    std::min(qt0 + kGroupTiles, P.nqt));
    }
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    double scale, bool causal, int64_t window_left, int64_t window_right, const OptTensor& key_lengths,
    const OptTensor& prefix_lengths, const OptTensor& q_segments, const OptTensor& k_segments,
    const OptTensor& dense_mask, const OptTensor& bias, const OptTensor& toeplitz, const OptTensor& block_map,
    int64_t block_m, int64_t block_n, double dropout_p, int64_t seed, bool bias_requires_grad,
    bool toeplitz_requires_grad) {
  const Problem P = make_problem(q, k, v, scale, causal, window_left, window_right, key_lengths, prefix_lengths,
                                 q_segments, k_segments, dense_mask, bias, toeplitz, block_map, block_m, block_n,
                                 dropout_p, seed);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "attention_bwd: dout/out must be q-shaped");
  TORCH_CHECK(lse.numel() == P.B * P.H * P.Lq, "attention_bwd: lse must be [B, H, Lq]");
  const auto f32 = q.options().dtype(at::kFloat);
  const Tensor qf = as_float_rows(q), kf = as_float_rows(k), vf = as_float_rows(v), dof = as_float_rows(dout);
  const Tensor lse_c = lse.to(at::kFloat).contiguous();
  const Tensor delta = (dof * out.to(at::kFloat)).sum(-1).contiguous();  // rowsum(dO * O)

  // Partitions of the key tiles when (b, kv head) pairs alone cannot keep the threads busy; each has its own
  // dQ buffer, so their number is capped (memory), at the price of idle threads for B * Hk < threads / 4.
  const int64_t pairs = P.B * P.Hk, threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min({P.nkt, ceil_div(2 * threads, pairs), int64_t(8)}));
  Tensor dq_parts = at::zeros({parts * P.B, P.H, P.Lq, P.D}, f32);
  Tensor dk = at::zeros({P.B, P.Hk, P.Lk, P.D}, f32), dv = at::zeros({P.B, P.Hk, P.Lk, P.D}, f32);
  Tensor dbias = bias_requires_grad ? at::zeros({P.B, P.H, P.Lq, P.Lk}, f32) : at::empty({0}, f32);
  Tensor dtoe_rev = toeplitz_requires_grad ? at::zeros({parts * P.B, P.H, P.Lq + P.Lk - 1}, f32)
                                           : at::empty({0}, f32);
  const BackwardOutputs G{Heads(dq_parts), Heads(dk), Heads(dv),
                          bias_requires_grad ? dbias.data_ptr<float>() : nullptr,
                          toeplitz_requires_grad ? dtoe_rev.data_ptr<float>() : nullptr};
  const Heads Q(qf), K(kf), V(vf), dO(dof);

  // Items: (b, kv head) major, then the partition; a partition takes every parts-th key tile (spreading
  // the cost of causal masks evenly).
  const int64_t n_items = pairs * parts;
  for_each_worker(n_items, [&](const auto& next) {
    BackwardWorkspace ws(P);
    for (int64_t it; (it = next()) < n_items;) {
      const int64_t pair = it / parts, part = it % parts;
      for (int64_t kt = part; kt < P.nkt; kt += parts)
        backward_tile(P, Q, K, V, dO, lse_c.data_ptr<float>(), delta.data_ptr<float>(), G, ws, pair / P.Hk,
                      pair % P.Hk, kt, part);
    }
  });

  // Partitions are summed in a fixed order: the result does not depend on the schedule.
  Tensor dq = (parts == 1 ? dq_parts : dq_parts.view({parts, P.B, P.H, P.Lq, P.D}).sum(0));
  Tensor dtoeplitz = toeplitz_requires_grad
                         ? dtoe_rev.view({parts * P.B, P.H, -1}).sum(0).flip({1}).contiguous()
                         : at::empty({0}, f32);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dbias, dtoeplitz};
}

Tensor attention_dropout_mask(int64_t seed, double dropout_p, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                              c10::Device device) {
  TORCH_CHECK(device.is_cpu(), "attention_dropout_mask (cpu): device must be the CPU");
  const Dropout drop(dropout_p, seed);
  Tensor keep = at::empty({B, H, Lq, Lk}, at::TensorOptions().dtype(at::kBool));
  bool* ptr = keep.data_ptr<bool>();
  at::parallel_for(0, B * H * Lq, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto [k1, k2] = drop.row_keys(r);
      dropout_keep_row(ptr + r * Lk, Lk, k1, k2, drop.on ? drop.threshold : 0);
    }
  });
  return keep;
}

}  // namespace ptm::cpu
