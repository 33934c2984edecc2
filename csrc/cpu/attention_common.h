// What the CPU attention kernels (attention.cpp, relative_attention.cpp) share on the host side: float32 views
// of [B, H, L, D] tensors and tile GEMMs on them, the work distribution, dropout's per-row keys, and the
// visibility parts of a mask (causal, window, key lengths, prefix-LM, segment ids, dense) evaluated per row and
// per tile without an [Lq, Lk] tensor. The element-wise row kernels are in attention_rows.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "attention.h"
#include "attention_rows.h"

namespace ptm::cpu::attn {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The tile both kernels classify (and skip) scores at: query rows x keys.
constexpr int64_t kTileM = kAttentionBlockM;
constexpr int64_t kTileN = kAttentionBlockN;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --------------------------------------------------------------------------------------- tensors, GEMMs
// A [B, H, L, D] float32 tensor with unit stride along D (any other strides, 0 on B included).
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
inline Tensor mat(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}
// Its transpose (cols x rows).
inline Tensor mat_t(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {cols, rows}, {1, ld}, at::TensorOptions().dtype(at::kFloat));
}

inline void gemm(Tensor c, const Tensor& a, const Tensor& b) { at::mm_out(c, a, b); }  // c = a @ b
inline void gemm_acc(Tensor c, const Tensor& a, const Tensor& b, float alpha = 1.f) {  // c += alpha a @ b
  c.addmm_(a, b, 1, alpha);
}

// Float32 with unit stride in the last dim (no copy when it already is). Dims broadcast with stride 0 (r
// shared by the batch) are converted once, not once per broadcast copy.
inline Tensor as_float_rows(const Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.stride(-1) == 1) return t;
  Tensor c = t;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (c.size(d) > 1 && c.stride(d) == 0) c = c.narrow(d, 0, 1);
  Tensor f = c.to(at::kFloat);
  if (f.stride(-1) != 1) f = f.contiguous();
  return f.expand(t.sizes());
}

// A [B, H, Lq, Lk] view (stride 0 on broadcast dims) in dtype `dt` with unit stride along Lk, copying
// only the non-broadcast part when a copy is needed.
inline Tensor score_matrix_tensor(const Tensor& t, at::ScalarType dt) {
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

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// An optional integer tensor as contiguous int64 (kept alive in keep_alive), or null.
inline const int64_t* long_ptr(const OptTensor& t, std::vector<Tensor>& keep_alive) {
  if (!given(t)) return nullptr;
  keep_alive.push_back(t->to(at::kLong).contiguous());
  return keep_alive.back().data_ptr<int64_t>();
}

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

// ------------------------------------------------------------------------------------- online softmax
// One step of a row's online softmax: s holds its next n scores (still to be multiplied by a > 0; -inf where
// hidden), (m, l) the row's running max (of the multiplied scores) and sum, o its D accumulated outputs. Turns
// s into exp(s * a - m') and rescales l and o to the new max m'. A row with nothing visible so far keeps zeros.
// Non-finite scores propagate as in torch's softmax: once a NaN score or a +inf one is seen (+inf - +inf is
// NaN), m or l is NaN and stays NaN, so does o, and the row's result is NaN.
inline void online_softmax_step(float* s, int64_t n, float a, float& m, float& l, float* o, int64_t D) {
  const float block_max = max_row(s, n) * a;
  const float m_new = (std::isnan(block_max) || std::isnan(m)) ? block_max + m : std::max(m, block_max);
  if (m_new == kNegInf) {
    std::fill(s, s + n, 0.f);
    return;
  }
  const float alpha = std::exp(m - m_new);
  l = l * alpha + exp_sum_row(s, n, a, m_new);
  m = m_new;
  if (alpha != 1.f) scale_row(o, D, alpha);
}

// The end of it: out = o / l, lse = m + log(l); a row with no visible key (l still exactly 0: a visible key
// adds exp(0) = 1 when it is the max) gives zeros and lse = -inf; a NaN l gives a NaN row and lse.
inline void online_softmax_finish(const float* o, float m, float l, int64_t D, float* out, float* lse) {
  if (l != 0.f) {
    const float inv = 1.f / l;
    for (int64_t d = 0; d < D; ++d) out[d] = o[d] * inv;
    *lse = m + std::log(l);
  } else {
    std::fill(out, out + D, 0.f);
    *lse = kNegInf;
  }
}

// ------------------------------------------------------------------------------------------------ dropout
// keep(b, h, i, j) depends only on (seed, row = (b * H + h) * Lq + i, j): a counter-based hash, so the
// backward regenerates the forward's mask without storing it. The row's keys come from splitmix64; the
// column's bits are attention_rows.cpp's.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

struct DropoutRng {
  bool on = false;
  uint64_t seed_key = 0;
  uint32_t threshold = 0;  // keep iff bits >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)

  DropoutRng() = default;
  explicit DropoutRng(const Dropout& d) : DropoutRng(d.p, d.seed) {}
  DropoutRng(double p, int64_t seed) {
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

// ------------------------------------------------------------------------------------- the mask parts
using ColumnRuns = std::vector<std::pair<int64_t, int64_t>>;  // [begin, end) key ranges

// The visible key intervals [lo, hi) of the rows of a query tile, summarised.
struct RowSpan {
  int64_t lo_min, lo_max, hi_min, hi_max;
};

// The visibility parts of a mask (a Visibility) over Lq query rows and Lk keys, ready to evaluate per row and per
// tile (reference_kernels.attention_mask_dense). The
// analytic parts (causal, window, prefix-LM) are evaluated at a row's position in key coordinates, which the
// caller gives: i + Lk - Lq for attention (bottom-right aligned), the row's own position for relative attention.
// Segment ids and the dense mask are indexed by the row i itself.
struct VisibleKeys {
  int64_t Lq = 0, Lk = 0, nqt = 0, nkt = 0;
  bool causal = false;
  int64_t window_left = -1, window_right = -1;
  const int64_t* key_lengths = nullptr;     // [B]
  const int64_t* prefix_lengths = nullptr;  // [B]
  const int64_t* q_segments = nullptr;      // [B, Lq]
  const int64_t* k_segments = nullptr;      // [B, Lk]
  std::vector<int64_t> q_seg_range, k_seg_range;  // per (b, tile): min, max id
  ScoreMatrix<bool> dense;
  std::vector<Tensor> keep_alive;  // converted copies the pointers above point into

  bool elementwise() const { return q_segments || dense; }

  // Visible keys of a row at position pos from the analytic parts: [lo, hi), lo == hi when none. Both ends
  // are non-decreasing in pos, which the tile classification of consecutive rows relies on.
  void row_range(int64_t b, int64_t pos, int64_t& lo, int64_t& hi) const {
    lo = 0;
    hi = Lk;
    if (causal) hi = std::min(hi, std::max(pos + 1, prefix_lengths ? prefix_lengths[b] : int64_t(0)));
    if (window_left >= 0) lo = std::max(lo, pos - window_left);
    if (window_right >= 0) hi = std::min(hi, pos + window_right + 1);
    if (key_lengths) hi = std::min(hi, key_lengths[b]);
    lo = std::min(lo, Lk);
    hi = std::max(hi, lo);
  }

  // 0: no key of tile kt visible to the rows of query tile qt (whose analytic intervals `span` summarises),
  // 1: some, 2: all, from the analytic parts and the segment ids. The dense mask is left to the caller (it
  // knows whether a block map classifies it).
  int tile_status(int64_t b, int64_t qt, int64_t kt, const RowSpan& span) const {
    const int64_t j0 = kt * kTileN, j1 = std::min(j0 + kTileN, Lk);
    if (j0 >= span.hi_max || j1 <= span.lo_min) return 0;
    int status = (j0 >= span.lo_max && j1 <= span.hi_min) ? 2 : 1;
    if (q_segments) {
      const int64_t* qr = &q_seg_range[2 * (b * nqt + qt)];
      const int64_t* kr = &k_seg_range[2 * (b * nkt + kt)];
      if (qr[1] < kr[0] || kr[1] < qr[0]) return 0;
      if (!(qr[0] == qr[1] && kr[0] == kr[1] && qr[0] == kr[0])) status = 1;
    }
    return status;
  }

  // s holds the scores of row i (at position pos) for the keys [c0, c1): sets the hidden ones to -inf. Keys
  // outside the row's interval by two fills; the element-wise parts only on the ranges in `partial`.
  void mask_row(float* s, int64_t b, int64_t h, int64_t i, int64_t pos, int64_t c0, int64_t c1,
                const ColumnRuns& partial) const {
    int64_t lo, hi;
    row_range(b, pos, lo, hi);
    lo = std::min(std::max(lo, c0), c1);
    hi = std::min(std::max(hi, lo), c1);
    std::fill(s, s + (lo - c0), kNegInf);
    std::fill(s + (hi - c0), s + (c1 - c0), kNegInf);
    if (!elementwise()) return;
    for (const auto& [r0, r1] : partial) {
      const int64_t a = std::max(r0, lo), e = std::min(r1, hi);
      if (a >= e) continue;
      if (q_segments) mask_segments_row(s + (a - c0), e - a, k_segments + b * Lk + a, q_segments[b * Lq + i]);
      if (dense) mask_dense_row(s + (a - c0), e - a, reinterpret_cast<const uint8_t*>(dense.row(b, h, i) + a));
    }
  }
};

// The runs of visible key tiles among [kt_begin, kt_end) (status[kt]: 0 nothing visible, 1 some, 2 all), each
// at most max_n keys wide: calls fn(c0, c1) for the keys [c0, c1) of each, with `partial` holding the key
// ranges of its partly visible tiles (where the element-wise mask parts apply).
template <typename Fn>
void for_each_key_run(const int8_t* status, int64_t kt_begin, int64_t kt_end, int64_t Lk, int64_t max_n,
                      ColumnRuns& partial, const Fn& fn) {
  for (int64_t kt = kt_begin; kt < kt_end;) {
    if (status[kt] == 0) {
      ++kt;
      continue;
    }
    const int64_t first = kt;
    partial.clear();
    for (; kt < kt_end && status[kt] != 0 && (kt - first) * kTileN < max_n; ++kt) {
      if (status[kt] != 1) continue;
      const int64_t j0 = kt * kTileN, j1 = std::min(j0 + kTileN, Lk);
      if (!partial.empty() && partial.back().second == j0)
        partial.back().second = j1;
      else
        partial.emplace_back(j0, j1);
    }
    fn(first * kTileN, std::min(kt * kTileN, Lk));
  }
}

// Min and max id of every tile of `tile` ids along each batch row of a [B, L] segment-id array.
inline std::vector<int64_t> segment_ranges(const int64_t* seg, int64_t B, int64_t L, int64_t tile) {
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

// `op` names the kernel in errors. The block map is the caller's (it knows its tile).
inline VisibleKeys make_visible_keys(const char* op, int64_t B, int64_t H, int64_t Lq, int64_t Lk,
                                     const Visibility& vis) {
  VisibleKeys V;
  V.Lq = Lq;
  V.Lk = Lk;
  V.nqt = ceil_div(Lq, kTileM);
  V.nkt = ceil_div(Lk, kTileN);
  V.causal = vis.causal;
  V.window_left = vis.window_left;
  V.window_right = vis.window_right;
  V.key_lengths = long_ptr(vis.key_lengths, V.keep_alive);
  V.prefix_lengths = long_ptr(vis.prefix_lengths, V.keep_alive);
  V.q_segments = long_ptr(vis.q_segments, V.keep_alive);
  V.k_segments = long_ptr(vis.k_segments, V.keep_alive);
  TORCH_CHECK(!V.q_segments == !V.k_segments, op, ": q_segments and k_segments come together");
  if (V.q_segments) {
    V.q_seg_range = segment_ranges(V.q_segments, B, Lq, kTileM);
    V.k_seg_range = segment_ranges(V.k_segments, B, Lk, kTileN);
  }
  if (given(vis.dense_mask)) {
    const Tensor& dense = *vis.dense_mask;
    TORCH_CHECK(dense.sizes() == at::IntArrayRef({B, H, Lq, Lk}) && dense.scalar_type() == at::kBool, op,
                ": dense_mask must be a bool [B, H, Lq, Lk] view");
    V.keep_alive.push_back(score_matrix_tensor(dense, at::kBool));
    V.dense = score_matrix<bool>(V.keep_alive.back());
  }
  return V;
}

}  // namespace ptm::cpu::attn
