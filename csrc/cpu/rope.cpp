// Rotary position embedding: rotates pairs of x [B, H, L, D] by angles looked up per position.
// Semantics: rope_fwd in ptm_kernels/reference_kernels.py (inverse=True is the backward).
//
// Kernel half: one row x[b, h, l, :] at a time, over a range of rows; compiled once per instruction set (see
// common.h). Host half: checks, allocation, at::parallel_for over rows.
#include "common.h"
#include "vec_utils.h"

#include <cstring>

namespace ptm::cpu {

struct RopeArgs {
  const void* x;
  void* out;
  const int64_t* pos;      // positions[b, l] at pos[b * pos_sb + l * pos_sl]
  const float* cos;        // [P, R / 2] contiguous
  const float* sin;
  int64_t H, L, D, R;
  int64_t xs_b, xs_h, xs_l;  // x's strides (elements); the last is 1
  int64_t os_b, os_h, os_l;  // out's
  int64_t pos_sb, pos_sl;    // pos_sb = 0 when the batch shares one row of positions
  bool interleaved, inverse;
  DType dtype;
};

// Rows are numbered b * H * L + ..., with h or l varying fastest: whichever walks x's memory in order.
PTM_CPU_DECLARE_KERNEL(rope_rows, (const RopeArgs&, int64_t, int64_t))

// ---------------------------------------------------------------------------------------------- kernels
namespace PTM_CPU_ISA {
namespace {

// The block of cos/sin for a block of pairs of an interleaved row: kVec pairs (kBlock elements) per block.
inline Vec load_pairs(const float* p, Full) { return Vec::loadu(p); }
inline Vec load_pairs(const float* p, Part b) { return Vec::loadu(p, b.n / 2); }

template <typename T>
void rope_impl(const RopeArgs& a, int64_t begin, int64_t end) {
  const int64_t H = a.H, L = a.L, half = a.R / 2;
  const bool h_fastest = a.xs_h <= a.xs_l;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / (H * L), hl = i % (H * L);
    const int64_t h = h_fastest ? hl % H : hl / L, l = h_fastest ? hl / H : hl % L;
    const T* x = static_cast<const T*>(a.x) + b * a.xs_b + h * a.xs_h + l * a.xs_l;
    T* o = static_cast<T*>(a.out) + b * a.os_b + h * a.os_h + l * a.os_l;
    const int64_t p = a.pos[b * a.pos_sb + l * a.pos_sl];
    const float* c = a.cos + p * half;
    const float* s = a.sin + p * half;
    // o1 = x1 c - x2 s, o2 = x2 c + x1 s; the inverse rotation negates s.
    if (a.interleaved) {  // pairs (2k, 2k + 1)
      for_blocks(a.R, [&](int64_t j, auto blk) {
        const V2 v = load(x + j, blk);
        const auto [x1, x2] = at::vec::deinterleave2(v.lo, v.hi);
        const Vec cv = load_pairs(c + j / 2, blk);
        Vec sv = load_pairs(s + j / 2, blk);
        if (a.inverse) sv = sv.neg();
        const auto [lo, hi] = at::vec::interleave2(x1 * cv - x2 * sv, x2 * cv + x1 * sv);
        store(o + j, V2(lo, hi), blk);
      });
    } else {  // pairs (k, k + R/2)
      for_blocks(half, [&](int64_t j, auto blk) {
        const V2 x1 = load(x + j, blk), x2 = load(x + half + j, blk);
        const V2 cv = load(c + j, blk);
        V2 sv = load(s + j, blk);
        if (a.inverse) sv = -sv;
        store(o + j, x1 * cv - x2 * sv, blk);
        store(o + half + j, x2 * cv + x1 * sv, blk);
      });
    }
    if (a.R < a.D) std::memcpy(o + a.R, x + a.R, (a.D - a.R) * sizeof(T));  // the unrotated tail
  }
}

}  // namespace

void rope_rows(const RopeArgs& a, int64_t begin, int64_t end) {
  dispatch_dtype(a.dtype, [&](auto t) { rope_impl<typename decltype(t)::type>(a, begin, end); });
}

}  // namespace PTM_CPU_ISA

// ------------------------------------------------------------------------------------------------- host
#ifndef PTM_CPU_KERNELS_ONLY

Tensor rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                bool interleaved, int64_t rotary_dim, bool inverse) {
  TORCH_CHECK(x.device().is_cpu(), "ptm_kernels cpu: rope x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "ptm_kernels cpu: rope x must be 4-D [B, H, L, D], got shape ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1 || x.size(3) <= 1, "ptm_kernels cpu: rope x must have stride 1 in its last "
              "dimension, got strides ", x.strides());
  const DType dt = dtype_of(x, "rope x");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), R = rotary_dim;
  TORCH_CHECK(R >= 0 && R % 2 == 0 && R <= D, "ptm_kernels cpu: rotary_dim must be even and in [0, D = ", D,
              "], got ", R);
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(1) == R / 2,
                "ptm_kernels cpu: rope ", name, " must be a float32 CPU tensor of shape [P, rotary_dim / 2 = ",
                R / 2, "], got ", t.scalar_type(), " ", t.sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "ptm_kernels cpu: rope cos and sin must have the same shape, got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.dim() == 2 &&
                  (positions.size(0) == B || positions.size(0) == 1) && positions.size(1) == L,
              "ptm_kernels cpu: rope positions must be an int64 CPU tensor of shape [B, L] = [", B, ", ", L,
              "] or [1, L], got ", positions.scalar_type(), " ", positions.sizes());
  const Tensor c = cos.contiguous(), s = sin.contiguous(), pos = positions.contiguous();
  // Every position indexes a row of cos/sin.
  const int64_t P = c.size(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t k = 0; k < pos.numel(); ++k) {
    TORCH_CHECK(pp[k] >= 0 && pp[k] < P, "ptm_kernels cpu: rope positions must be in [0, ", P,
                ") (the rows of cos/sin), got ", pp[k], " at index ", k / L, ", ", k % L);
  }

  Tensor out = at::empty_like(x);
  TORCH_INTERNAL_ASSERT(out.stride(3) == 1 || D <= 1);
  const int64_t rows = B * H * L;
  if (rows == 0 || D == 0) return out;
  const RopeArgs a{x.data_ptr(), out.data_ptr(), pp, c.data_ptr<float>(), s.data_ptr<float>(), H, L, D, R,
                   x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
                   pos.size(0) == 1 ? 0 : L, 1, interleaved, inverse, dt};
  const auto kernel = PTM_CPU_KERNEL(rope_rows);
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return out;
}

#endif  // PTM_CPU_KERNELS_ONLY
}  // namespace ptm::cpu
