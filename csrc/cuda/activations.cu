// Activations (gelu, gelu_tanh, silu) with optional bias, and gated units (act(gate) * up), forward and
// backward (spec: ptm_kernels/reference_kernels.py).
//
// Elementwise kernels are grid-stride loops over 16-byte vectors (plus a scalar tail), falling back to
// scalars when a pointer is not 16-byte aligned (or, with a bias, when C is not a multiple of the vector).
// act_bwd with a bias also reduces dbias over the rows: a tiled kernel where each block owns a strip of
// columns and a slice of the rows and writes one float32 partial row, then column_sum (deterministic).
#include "common.cuh"

#include <climits>

namespace ptm::cuda::launcher {
namespace {

constexpr float kSqrt1_2 = 0.70710678118654752440f;     // 1 / sqrt(2)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1 / sqrt(2 pi)
constexpr float kGeluTanhCoef = 0.044715f;

template <Act A>
__device__ __forceinline__ float act_fn(float z) {
  if constexpr (A == Act::kGelu) {
    return 0.5f * z * (1.f + erff(z * kSqrt1_2));
  } else if constexpr (A == Act::kGeluTanh) {
    return 0.5f * z * (1.f + tanhf(kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z)));
  } else {
    return z / (1.f + expf(-z));  // z * sigmoid(z)
  }
}

// d act(z) / dz
template <Act A>
__device__ __forceinline__ float act_grad(float z) {
  if constexpr (A == Act::kGelu) {
    const float cdf = 0.5f * (1.f + erff(z * kSqrt1_2));
    const float pdf = expf(-0.5f * z * z) * kInvSqrt2Pi;
    return cdf + z * pdf;
  } else if constexpr (A == Act::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (z + kGeluTanhCoef * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCoef * z * z);
  } else {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
  }
}

constexpr int kThreads = 256;

// Grid-stride loop over the vectors [0, nvec) of V elements, then over the tail elements
// [nvec * V, numel) one by one: vec(i) and scalar(i) get the index of the first element.
template <int V, typename FV, typename FS>
__device__ __forceinline__ void grid_stride(int64_t numel, FV&& vec, FS&& scalar) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = numel / V;
  for (int64_t j = start; j < nvec; j += stride) vec(j * V);
  for (int64_t i = nvec * V + start; i < numel; i += stride) scalar(i);
}

// ----------------------------------------------------------------------------------------- act_fwd
template <typename T, int V, Act A>
__global__ void __launch_bounds__(kThreads) act_fwd_kernel(const ActFwdArgs a) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  const int64_t numel = a.N * a.C;
  if (a.bias == nullptr) {
    auto body = [&](auto n, int64_t i) {
      constexpr int kN = decltype(n)::value;
      float v[kN];
      load_vec<kN>(x + i, v);
#pragma unroll
      for (int t = 0; t < kN; ++t) v[t] = act_fn<A>(v[t]);
      store_vec<kN>(y + i, v);
    };
    grid_stride<V>(
        numel, [&](int64_t i) { body(std::integral_constant<int, V>{}, i); },
        [&](int64_t i) { body(std::integral_constant<int, 1>{}, i); });
    return;
  }
  // With a bias, C % V == 0 (the launcher checks), so a vector never straddles two rows and there is no
  // tail. The column advances by a fixed step per iteration: no 64-bit division in the loop.
  const int64_t C = a.C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  const int64_t step = stride % C;
  int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  int64_t col = i % C;
  for (; i < numel; i += stride) {
    float v[V], b[V];
    load_vec<V>(x + i, v);
    load_any<V>(a.bias, a.b_dtype, col, b);
#pragma unroll
    for (int t = 0; t < V; ++t) v[t] = act_fn<A>(v[t] + b[t]);
    store_vec<V>(y + i, v);
    col += step;
    if (col >= C) col -= C;
  }
}

// ------------------------------------------------------------------------------- act_bwd, no bias
template <typename T, int V, Act A>
__global__ void __launch_bounds__(kThreads) act_bwd_kernel(const ActBwdArgs a) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.dx);
  auto body = [&](auto n, int64_t i) {
    constexpr int kN = decltype(n)::value;
    float d[kN], v[kN];
    load_vec<kN>(dy + i, d);
    load_vec<kN>(x + i, v);
#pragma unroll
    for (int t = 0; t < kN; ++t) d[t] *= act_grad<A>(v[t]);
    store_vec<kN>(dx + i, d);
  };
  grid_stride<V>(
      a.N * a.C, [&](int64_t i) { body(std::integral_constant<int, V>{}, i); },
      [&](int64_t i) { body(std::integral_constant<int, 1>{}, i); });
}

// ----------------------------------------------------------------------------- act_bwd with dbias
// Block (bx, by), bx * by = kThreads: x over a strip of bx column vectors, y over rows. Block (cx, ry)
// handles strip cx and rows ry * by + threadIdx.y, stepping by gridDim.y * by; its per-column sums go to
// partial row ry of the workspace [gridDim.y, C].
template <typename T, int V, Act A>
__global__ void __launch_bounds__(kThreads) act_bwd_bias_kernel(const ActBwdArgs a) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* x = static_cast<const T*>(a.x);
  T* dx = static_cast<T*>(a.dx);
  const int64_t C = a.C, nvec = C / V;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // column vector
  float acc[V];
#pragma unroll
  for (int t = 0; t < V; ++t) acc[t] = 0.f;
  if (cv < nvec) {
    float b[V];
    load_any<V>(a.bias, a.b_dtype, cv * V, b);
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < a.N;
         r += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const int64_t i = r * C + cv * V;
      float d[V], v[V];
      load_vec<V>(dy + i, d);
      load_vec<V>(x + i, v);
#pragma unroll
      for (int t = 0; t < V; ++t) {
        d[t] *= act_grad<A>(v[t] + b[t]);
        acc[t] += d[t];  // dbias sums the unrounded dz
      }
      store_vec<V>(dx + i, d);
    }
  }
  // Combine the rows of the block in a fixed order (deterministic).
  __shared__ float s[kThreads * V];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int t = 0; t < V; ++t) s[tid * V + t] = acc[t];
  __syncthreads();
  if (threadIdx.y == 0 && cv < nvec) {
    for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
      for (int t = 0; t < V; ++t) acc[t] += s[(y * blockDim.x + threadIdx.x) * V + t];
    }
    store_vec<V>(a.workspace + static_cast<int64_t>(blockIdx.y) * C + cv * V, acc);
  }
}

// Tiling of act_bwd_bias_kernel, shared by the workspace query and the launch.
struct BiasTiling {
  int vec = 1;
  dim3 block, grid;
};

template <typename T>
BiasTiling bias_tiling(const ActBwdArgs& a, int vec) {
  BiasTiling t;
  t.vec = vec;
  const int64_t nvec = a.C / vec;
  const int bx = pow2_ceil(nvec, 32);
  const int by = kThreads / bx;
  const int64_t strips = ceil_div(nvec, bx);
  // Enough row slices to give every SM several blocks; never more slices than row groups.
  const int64_t target = static_cast<int64_t>(num_sms()) * 8;
  int64_t slices = ceil_div(target, strips);
  const int64_t max_slices = ceil_div(a.N, by);
  if (slices > max_slices) slices = max_slices;
  if (slices > 65535) slices = 65535;
  if (slices < 1) slices = 1;
  t.block = dim3(bx, by);
  t.grid = dim3(static_cast<unsigned>(strips), static_cast<unsigned>(slices));
  return t;
}

template <typename T>
int act_vec(const ActBwdArgs& a) {
  const bool ok = (a.bias == nullptr || a.C % kVec<T> == 0) && aligned_for(a.dy, a.dtype, kVec<T>) &&
                  aligned_for(a.x, a.dtype, kVec<T>) && aligned_for(a.dx, a.dtype, kVec<T>) &&
                  aligned_for(a.bias, a.b_dtype, kVec<T>);
  return ok ? kVec<T> : 1;
}

template <typename F>
cudaError_t dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------- glu
template <typename T, int V, Act A>
__global__ void __launch_bounds__(kThreads) glu_fwd_kernel(const GluFwdArgs a) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* y = static_cast<T*>(a.y);
  auto body = [&](auto n, int64_t i) {
    constexpr int kN = decltype(n)::value;
    float g[kN], u[kN];
    load_vec<kN>(gate + i, g);
    load_vec<kN>(up + i, u);
#pragma unroll
    for (int t = 0; t < kN; ++t) g[t] = act_fn<A>(g[t]) * u[t];
    store_vec<kN>(y + i, g);
  };
  grid_stride<V>(
      a.numel, [&](int64_t i) { body(std::integral_constant<int, V>{}, i); },
      [&](int64_t i) { body(std::integral_constant<int, 1>{}, i); });
}

template <typename T, int V, Act A>
__global__ void __launch_bounds__(kThreads) glu_bwd_kernel(const GluBwdArgs a) {
  const T* dy = static_cast<const T*>(a.dy);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* dgate = static_cast<T*>(a.dgate);
  T* dup = static_cast<T*>(a.dup);
  auto body = [&](auto n, int64_t i) {
    constexpr int kN = decltype(n)::value;
    float d[kN], g[kN], u[kN], dg[kN], du[kN];
    load_vec<kN>(dy + i, d);
    load_vec<kN>(gate + i, g);
    load_vec<kN>(up + i, u);
#pragma unroll
    for (int t = 0; t < kN; ++t) {
      dg[t] = d[t] * u[t] * act_grad<A>(g[t]);
      du[t] = d[t] * act_fn<A>(g[t]);
    }
    store_vec<kN>(dgate + i, dg);
    store_vec<kN>(dup + i, du);
  };
  grid_stride<V>(
      a.numel, [&](int64_t i) { body(std::integral_constant<int, V>{}, i); },
      [&](int64_t i) { body(std::integral_constant<int, 1>{}, i); });
}

template <typename T>
int elementwise_vec(DType dt, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (!aligned_for(p, dt, kVec<T>)) return 1;
  }
  return kVec<T>;
}

}  // namespace

// ------------------------------------------------------------------------------------------ launchers
cudaError_t act_fwd(const ActFwdArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.C < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    int vec = elementwise_vec<T>(a.dtype, {a.x, a.y});
    if (a.bias != nullptr && (a.C % kVec<T> != 0 || !aligned_for(a.bias, a.b_dtype, kVec<T>))) vec = 1;
    const unsigned grid = grid_for(ceil_div(a.N * a.C, vec), kThreads);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_act(a.act, [&](auto act) {
        return launch(act_fwd_kernel<T, decltype(v)::value, decltype(act)::value>, dim3(grid), dim3(kThreads),
                      stream, a);
      });
    });
  });
}

int64_t act_bwd_workspace(const ActBwdArgs& a) {
  if (a.N == 0 || a.bias == nullptr) return 0;
  int64_t floats = 0;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    floats = static_cast<int64_t>(bias_tiling<T>(a, act_vec<T>(a)).grid.y) * a.C;
    return cudaSuccess;
  });
  return floats;
}

cudaError_t act_bwd(const ActBwdArgs& a, cudaStream_t stream) {
  if (a.C < 1 || (a.bias != nullptr && a.dbias == nullptr)) return cudaErrorInvalidValue;
  if (a.N == 0) {  // dbias = sum over no rows
    return a.bias != nullptr ? cudaMemsetAsync(a.dbias, 0, sizeof(float) * a.C, stream) : cudaSuccess;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = act_vec<T>(a);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int V = decltype(v)::value;
      return dispatch_act(a.act, [&](auto act) {
        constexpr Act A = decltype(act)::value;
        if (a.bias == nullptr) {
          return launch(act_bwd_kernel<T, V, A>, dim3(grid_for(ceil_div(a.N * a.C, V), kThreads)), dim3(kThreads),
                        stream, a);
        }
        const BiasTiling t = bias_tiling<T>(a, V);
        const int64_t need = static_cast<int64_t>(t.grid.y) * a.C;
        if (a.workspace == nullptr || a.workspace_floats < need ||
            reinterpret_cast<uintptr_t>(a.workspace) % 16 != 0) {
          return cudaErrorInvalidValue;
        }
        if (ceil_div(a.C / V, t.block.x) > INT_MAX) return cudaErrorInvalidValue;
        cudaError_t err = launch(act_bwd_bias_kernel<T, V, A>, t.grid, t.block, stream, a);
        if (err != cudaSuccess) return err;
        return column_sum(a.workspace, t.grid.y, a.C, a.dbias, stream);
      });
    });
  });
}

cudaError_t glu_fwd(const GluFwdArgs& a, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = elementwise_vec<T>(a.dtype, {a.gate, a.up, a.y});
    const unsigned grid = grid_for(ceil_div(a.numel, vec), kThreads);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_act(a.act, [&](auto act) {
        return launch(glu_fwd_kernel<T, decltype(v)::value, decltype(act)::value>, dim3(grid), dim3(kThreads),
                      stream, a);
      });
    });
  });
}

cudaError_t glu_bwd(const GluBwdArgs& a, cudaStream_t stream) {
  if (a.numel == 0) return cudaSuccess;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = elementwise_vec<T>(a.dtype, {a.dy, a.gate, a.up, a.dgate, a.dup});
    const unsigned grid = grid_for(ceil_div(a.numel, vec), kThreads);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_act(a.act, [&](auto act) {
        return launch(glu_bwd_kernel<T, decltype(v)::value, decltype(act)::value>, dim3(grid), dim3(kThreads),
                      stream, a);
      });
    });
  });
}

}  // namespace ptm::cuda::launcher
