// Rotary position embedding (spec: reference_kernels.rope_fwd), forward and (inverse=True) backward.
//
// A row is x[b, h, l, :] (D elements, unit stride). Its D elements split into "slots" of V elements:
// rotation slots (rotate-half: V pairs (i, i + R/2) read as two vectors; interleaved: V/2 pairs (2i, 2i+1)
// in one vector) and copy slots for the dimensions >= R. Threads x of a block walk the slots of a row,
// threads y are consecutive positions l; grid (L blocks, batches, head groups), and each block loops over
// its heads, so the position and the cos/sin rows of (b, l) are shared by all heads (they stay in L1).
#include "common.cuh"

#include <climits>

namespace ptm::cuda::launcher {
namespace {

constexpr int kThreads = 256;

// kPacked: 16-byte accesses (V = kVec<T>); otherwise V is 1 (rotate-half) or 2 (interleaved: one pair),
// copy slots are single elements, and every element is accessed on its own: any strides and alignments.
template <typename T, int V, bool kInterleaved, bool kPacked>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeArgs a) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (l >= a.L) return;  // no block-wide synchronization below
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t R = a.rotary_dim, half = R / 2;
  constexpr int kCs = kInterleaved ? V / 2 : V;  // cos/sin entries per rotation slot
  constexpr int kCopy = kPacked ? V : 1;          // elements per copy slot (D - R may be odd)
  const int64_t rot_slots = kInterleaved ? R / V : half / V;
  const int64_t slots = rot_slots + (a.D - R) / kCopy;

  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    int64_t pos = a.positions[b * a.pos_sb + l * a.pos_sl];
    if (pos < 0) pos += a.P;  // torch indexing semantics
    const bool pos_ok = pos >= 0 && pos < a.P;
    const float* cos_row = a.cos + (pos_ok ? pos : 0) * a.cs_stride;
    const float* sin_row = a.sin + (pos_ok ? pos : 0) * a.cs_stride;
    for (int64_t h = blockIdx.z; h < a.H; h += gridDim.z) {
      const T* xr = x + b * a.x_sb + h * a.x_sh + l * a.x_sl;
      T* orow = out + b * a.out_sb + h * a.out_sh + l * a.out_sl;
      for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
        if (s >= rot_slots) {  // dimensions >= R: copied unchanged
          const int64_t d = R + (s - rot_slots) * kCopy;
          copy_vec<kCopy, kPacked>(xr + d, orow + d);
          continue;
        }
        float c[kCs], sn[kCs];
        const int64_t ci = s * kCs;  // first cos/sin column of the slot
        if (pos_ok) {
          load_vec<kCs, kPacked>(cos_row + ci, c);
          load_vec<kCs, kPacked>(sin_row + ci, sn);
        } else {  // out-of-range position: poison the rotated outputs instead of reading out of bounds
#pragma unroll
          for (int t = 0; t < kCs; ++t) c[t] = sn[t] = __int_as_float(0x7fc00000);
        }
        if (a.inverse) {
#pragma unroll
          for (int t = 0; t < kCs; ++t) sn[t] = -sn[t];
        }
        if constexpr (kInterleaved) {
          float v[V], o[V];
          load_vec<V, kPacked>(xr + s * V, v);
#pragma unroll
          for (int t = 0; t < kCs; ++t) {
            const float x1 = v[2 * t], x2 = v[2 * t + 1];
            o[2 * t] = x1 * c[t] - x2 * sn[t];
            o[2 * t + 1] = x2 * c[t] + x1 * sn[t];
          }
          store_vec<V, kPacked>(orow + s * V, o);
        } else {
          float x1[V], x2[V], o1[V], o2[V];
          load_vec<V, kPacked>(xr + ci, x1);
          load_vec<V, kPacked>(xr + half + ci, x2);
#pragma unroll
          for (int t = 0; t < V; ++t) {
            o1[t] = x1[t] * c[t] - x2[t] * sn[t];
            o2[t] = x2[t] * c[t] + x1[t] * sn[t];
          }
          store_vec<V, kPacked>(orow + ci, o1);
          store_vec<V, kPacked>(orow + half + ci, o2);
        }
      }
    }
  }
}

// Whether 16-byte accesses of V = kVec<T> elements are possible: every vector must start at a multiple of
// V elements from a 16-byte aligned base (a stride of a size-1 dimension never matters).
template <typename T>
bool can_pack(const RopeArgs& a) {
  constexpr int V = kVec<T>;
  const int64_t R = a.rotary_dim;
  if (a.D % V != 0) return false;
  if (a.interleaved ? R % V != 0 : (R / 2) % V != 0) return false;
  const int cs = a.interleaved ? V / 2 : V;  // cos/sin floats per slot
  if (a.cs_stride % cs != 0 || !aligned_for(a.cos, DType::kFloat32, cs) || !aligned_for(a.sin, DType::kFloat32, cs)) {
    return false;
  }
  if (!aligned_for(a.x, a.dtype, V) || !aligned_for(a.out, a.dtype, V)) return false;
  const int64_t sizes[3] = {a.B, a.H, a.L};
  const int64_t xs[3] = {a.x_sb, a.x_sh, a.x_sl}, os[3] = {a.out_sb, a.out_sh, a.out_sl};
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] > 1 && (xs[i] % V != 0 || os[i] % V != 0)) return false;
  }
  return true;
}

template <typename T, int V, bool kInterleaved, bool kPacked>
cudaError_t launch_rope(const RopeArgs& a, cudaStream_t stream) {
  const int64_t R = a.rotary_dim;
  const int64_t slots = (kInterleaved ? R / V : R / 2 / V) + (a.D - R) / (kPacked ? V : 1);
  const int bx = pow2_ceil(slots, 32);
  const int by = pow2_ceil(a.L, kThreads / bx);  // short sequences (decoding): fewer idle rows per block
  const int64_t gx = ceil_div(a.L, by);
  const int64_t gy = a.B < 65535 ? a.B : 65535;
  if (gx > INT_MAX) return cudaErrorInvalidValue;
  // Split the heads over blocks until the GPU has a few blocks per SM.
  const int64_t target = static_cast<int64_t>(num_sms()) * 4;
  int64_t gz = ceil_div(target, gx * gy);
  if (gz > a.H) gz = a.H;
  if (gz > 65535) gz = 65535;
  if (gz < 1) gz = 1;
  return launch(rope_kernel<T, V, kInterleaved, kPacked>,
                dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)), dim3(bx, by),
                stream, a);
}

}  // namespace

cudaError_t rope_fwd(const RopeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.H == 0 || a.L == 0 || a.D == 0) return cudaSuccess;
  if (a.rotary_dim < 0 || a.rotary_dim > a.D || a.rotary_dim % 2 != 0) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool packed = can_pack<T>(a);
    if (a.interleaved) {
      return packed ? launch_rope<T, kVec<T>, true, true>(a, stream) : launch_rope<T, 2, true, false>(a, stream);
    }
    return packed ? launch_rope<T, kVec<T>, false, true>(a, stream) : launch_rope<T, 1, false, false>(a, stream);
  });
}

}  // namespace ptm::cuda::launcher
