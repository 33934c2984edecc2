// Device helpers shared by the CUDA kernels: dtype conversion, vector loads/stores, row reductions, and
// host-side dispatch/launch helpers. CUDA headers and the standard library only (no torch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "launchers.h"

namespace ptm::cuda::launcher {

// ------------------------------------------------------------------------------------ dtype conversion
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch's .to(dtype).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// v rounded to T and back (the value a tensor of dtype T would hold).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ------------------------------------------------------------------------------------- vector access
// N consecutive elements, accessed in 16-byte pieces (or one smaller piece) when kPacked: the address must
// then be aligned to pack_bytes<T, N>() (the launchers check). Unpacked accesses are element by element.
template <typename T, int N>
constexpr int pack_bytes() { return sizeof(T) * N < 16 ? static_cast<int>(sizeof(T)) * N : 16; }

template <typename T, int N>
struct alignas(pack_bytes<T, N>()) Pack {
  T v[N];
};

template <int N, bool kPacked = true, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  if constexpr (kPacked) {
    const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(p[i]);
  }
}

template <int N, bool kPacked = true, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  if constexpr (kPacked) {
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Bit-exact copy of N elements (no float round trip).
template <int N, bool kPacked = true, typename T>
__device__ __forceinline__ void copy_vec(const T* src, T* dst) {
  if constexpr (kPacked) {
    *reinterpret_cast<Pack<T, N>*>(dst) = *reinterpret_cast<const Pack<T, N>*>(src);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// Loads/stores of a tensor whose dtype is only known at run time (weights, biases, gradients that may be
// float32 or the input's dtype). The switch is uniform across the block, so it costs a branch, not bandwidth.
template <int N>
__device__ __forceinline__ void load_any(const void* p, DType dt, int64_t i, float (&out)[N]) {
  switch (dt) {
    case DType::kFloat32: load_vec<N>(static_cast<const float*>(p) + i, out); break;
    case DType::kFloat16: load_vec<N>(static_cast<const __half*>(p) + i, out); break;
    default: load_vec<N>(static_cast<const __nv_bfloat16*>(p) + i, out); break;
  }
}

template <int N>
__device__ __forceinline__ void store_any(void* p, DType dt, int64_t i, const float (&in)[N]) {
  switch (dt) {
    case DType::kFloat32: store_vec<N>(static_cast<float*>(p) + i, in); break;
    case DType::kFloat16: store_vec<N>(static_cast<__half*>(p) + i, in); break;
    default: store_vec<N>(static_cast<__nv_bfloat16*>(p) + i, in); break;
  }
}

// ---------------------------------------------------------------------------------------- reductions
constexpr int kMaxRowThreads = 512;  // the row kernels' block size limit (their __launch_bounds__)

// Sums v over the threads of a row and gives every one of them the result. A row is either a group of
// blockDim.x <= 32 lanes (a power of two) inside a warp, with blockDim.y rows per block, or the whole block
// (blockDim.y == 1, blockDim.x a multiple of 32). Every thread of the block must call it (no early exit).
// The order of the additions is fixed, so the result is deterministic.
template <int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K]) {
  const int width = blockDim.x < 32 ? blockDim.x : 32;
  for (int off = width / 2; off > 0; off /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
  if (blockDim.x <= 32) return;
  __shared__ float partial[K][kMaxRowThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < nwarps; ++w) s += partial[k][w];
    v[k] = s;
  }
  __syncthreads();  // `partial` may be overwritten by the next call
}

// Visits this thread's vectors of a row: vector j = threadIdx.x + k * blockDim.x for k = 0, 1, ...
// With kCache > 0 the launcher guarantees that kCache steps cover the row; the loop is then unrolled so
// that per-step data (indexed by k) can stay in registers between passes over the row. kCache == 0 is the
// path for very long rows: k is always 0 and passes reload their data.
template <int kCache, typename F>
__device__ __forceinline__ void for_each_vec(int64_t nvec, F&& f) {
  if constexpr (kCache > 0) {
#pragma unroll
    for (int k = 0; k < kCache; ++k) {
      const int64_t j = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
      if (j < nvec) f(k, j);
    }
  } else {
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) f(0, j);
  }
}

// Deterministic second stage of the dweight/dbias reductions: out[c] = sum_p partial[p * C + c] for a
// float32 [P, C] buffer (defined in norms.cu; activations.cu uses it too). P == 0 writes zeros.
cudaError_t column_sum(const float* partial, int64_t P, int64_t C, float* out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------- host helpers
inline int dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// Whether p is aligned for a packed access of n elements of dtype dt (nullptr counts as aligned).
inline bool aligned_for(const void* p, DType dt, int n) {
  const int bytes = dtype_size(dt) * n < 16 ? dtype_size(dt) * n : 16;
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The smallest power of two >= v, capped at `cap` (a power of two).
inline int pow2_ceil(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p *= 2;
  return p;
}

// Number of SMs of the current device (1 if it cannot be queried: the launch itself will then report why).
inline int num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

// Calls f(T{}) with T the element type of dt.
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<int, V>{}) for the V in Vs equal to v.
template <int... Vs, typename F>
cudaError_t dispatch_int(int v, F&& f) {
  cudaError_t err = cudaErrorInvalidValue;
  (void)((v == Vs ? (err = f(std::integral_constant<int, Vs>{}), true) : false) || ...);
  return err;
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Calls f(std::integral_constant<int, V>{}) with V = kVec<T> (vec == kVec<T>) or V = 1 (vec == 1): kernels
// are instantiated for full 16-byte vectors and for the scalar fallback only.
template <typename T, typename F>
cudaError_t dispatch_vec(int vec, F&& f) {
  if (vec == kVec<T>) return f(std::integral_constant<int, kVec<T>>{});
  if (vec == 1) return f(std::integral_constant<int, 1>{});
  return cudaErrorInvalidValue;
}

// Every kernel launch goes through here, so that errors are reported in one way.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}

// Grid size for a grid-stride loop over `work` items with `threads` per block: enough blocks to fill the
// GPU a few times over, never more than there is work for.
inline unsigned grid_for(int64_t work, int threads, int blocks_per_sm = 8) {
  const int64_t want = ceil_div(work, threads);
  const int64_t cap = static_cast<int64_t>(num_sms()) * blocks_per_sm;
  const int64_t g = want < cap ? want : cap;
  return static_cast<unsigned>(g > 0 ? g : 1);
}

}  // namespace ptm::cuda::launcher
