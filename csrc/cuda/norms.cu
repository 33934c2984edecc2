// RMSNorm and LayerNorm, forward and backward (spec: ptm_kernels/reference_kernels.py).
//
// Layout: each row of C elements is handled by a group of blockDim.x threads (a sub-warp of <= 32 lanes
// for short rows, with blockDim.y rows per block, or the whole block for long rows). Thread x of a row owns
// vectors j = x, x + blockDim.x, ... of VEC elements (16 bytes of the input dtype, or 1 element when the
// row length or the pointers do not allow 16-byte accesses). Rows short enough keep their values in
// registers between the passes (kCache steps); longer rows re-read them (kCache == 0, L2-resident).
// Backward kernels loop over rows with a grid sized to the GPU, accumulate dweight/dbias for their own
// columns, and write one float32 partial row per row group; column_sum then adds the partial rows in a
// fixed order (deterministic, no atomics).
#include "common.cuh"

#include <climits>

namespace ptm::cuda::launcher {
namespace {

// h = x, or x + residual rounded to T (the value eager `x + residual` holds); stored to h_out if asked.
template <int V, typename T>
__device__ __forceinline__ void load_h(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ h_out,
                                       int64_t i, bool store, float (&v)[V]) {
  load_vec<V>(x + i, v);
  if (res != nullptr) {
    float r[V];
    load_vec<V>(res + i, r);
#pragma unroll
    for (int t = 0; t < V; ++t) v[t] = round_to<T>(v[t] + r[t]);
    if (store) store_vec<V>(h_out + i, v);
  }
}

template <int V>
__device__ __forceinline__ void copy_arr(const float (&src)[V], float (&dst)[V]) {
#pragma unroll
  for (int t = 0; t < V; ++t) dst[t] = src[t];
}

// The forward kernels cache h in its own dtype (exact: h holds T values), which halves the registers the
// cache takes for 16-bit inputs and so leaves room for more rows in flight per SM.
template <typename T, int V>
__device__ __forceinline__ void cache_put(const float (&src)[V], T (&dst)[V]) {
#pragma unroll
  for (int t = 0; t < V; ++t) dst[t] = from_float<T>(src[t]);
}

template <typename T, int V>
__device__ __forceinline__ void cache_get(const T (&src)[V], float (&dst)[V]) {
#pragma unroll
  for (int t = 0; t < V; ++t) dst[t] = to_float(src[t]);
}

// v *= p[c .. c + V) when the parameter p exists.
template <int V>
__device__ __forceinline__ void mul_param(const void* p, DType dt, int64_t c, float (&v)[V]) {
  if (p == nullptr) return;
  float w[V];
  load_any<V>(p, dt, c, w);
#pragma unroll
  for (int t = 0; t < V; ++t) v[t] *= w[t];
}

// -------------------------------------------------------------------------------------------- forward
template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kMaxRowThreads) rms_norm_fwd_kernel(const RmsNormFwdArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* h_out = static_cast<T*>(a.h);
  const int64_t C = a.C, nvec = C / V;
  constexpr int KC = kCache > 0 ? kCache : 1;

  // Grid-stride loop over row groups; every thread runs the same iterations (the row reductions need
  // all of them), `valid` tells whether its row exists.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < a.N;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < a.N;
    const int64_t base = row * C;
    T hc[KC][V];
    float ss[1] = {0.f};
    if (valid) {
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
        float v[V];
        load_h<V>(x, res, h_out, base + j * V, true, v);
#pragma unroll
        for (int t = 0; t < V; ++t) ss[0] += v[t] * v[t];
        if constexpr (kCache > 0) cache_put(v, hc[k]);
      });
    }
    row_allreduce(ss);
    const float rstd = rsqrtf(ss[0] / static_cast<float>(C) + a.eps);
    if (!valid) continue;
    if (threadIdx.x == 0) a.rstd[row] = rstd;
    for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
      float v[V];
      if constexpr (kCache > 0) {
        cache_get(hc[k], v);
      } else {
        load_h<V>(x, res, h_out, base + j * V, false, v);
      }
#pragma unroll
      for (int t = 0; t < V; ++t) {
        v[t] *= rstd;
        if (a.round_normed) v[t] = round_to<T>(v[t]);
      }
      mul_param<V>(a.weight, a.w_dtype, j * V, v);
      store_any<V>(a.y, a.y_dtype, base + j * V, v);
    });
  }
}

template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kMaxRowThreads) layer_norm_fwd_kernel(const LayerNormFwdArgs a) {
  const T* x = static_cast<const T*>(a.x);
  const T* res = static_cast<const T*>(a.residual);
  T* h_out = static_cast<T*>(a.h);
  T* y = static_cast<T*>(a.y);
  const int64_t C = a.C, nvec = C / V;
  constexpr int KC = kCache > 0 ? kCache : 1;

  // Grid-stride loop over row groups; every thread runs the same iterations (the row reductions need
  // all of them), `valid` tells whether its row exists.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < a.N;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < a.N;
    const int64_t base = row * C;
    T hc[KC][V];
    // Pass 1: mean (and h stored when there is a residual).
    float sum[1] = {0.f};
    if (valid) {
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
        float v[V];
        load_h<V>(x, res, h_out, base + j * V, true, v);
#pragma unroll
        for (int t = 0; t < V; ++t) sum[0] += v[t];
        if constexpr (kCache > 0) cache_put(v, hc[k]);
      });
    }
    row_allreduce(sum);
    const float mean = sum[0] / static_cast<float>(C);
    // Pass 2: variance around the mean (two-pass, as the reference).
    float sq[1] = {0.f};
    if (valid) {
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
        float v[V];
        if constexpr (kCache > 0) {
          cache_get(hc[k], v);
        } else {
          load_h<V>(x, res, h_out, base + j * V, false, v);
        }
#pragma unroll
        for (int t = 0; t < V; ++t) sq[0] += (v[t] - mean) * (v[t] - mean);
      });
    }
    row_allreduce(sq);
    const float rstd = rsqrtf(sq[0] / static_cast<float>(C) + a.eps);
    if (!valid) continue;
    if (threadIdx.x == 0) {
      a.mean[row] = mean;
      a.rstd[row] = rstd;
    }
    // Pass 3: y = ((h - mean) * rstd) * weight + bias.
    for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
      float v[V];
      if constexpr (kCache > 0) {
        cache_get(hc[k], v);
      } else {
        load_h<V>(x, res, h_out, base + j * V, false, v);
      }
#pragma unroll
      for (int t = 0; t < V; ++t) v[t] = (v[t] - mean) * rstd;
      mul_param<V>(a.weight, a.w_dtype, j * V, v);
      if (a.bias != nullptr) {
        float b[V];
        load_any<V>(a.bias, a.b_dtype, j * V, b);
#pragma unroll
        for (int t = 0; t < V; ++t) v[t] += b[t];
      }
      store_vec<V>(y + base + j * V, v);
    });
  }
}

// ------------------------------------------------------------------------------------------- backward
// Accumulator of one [C] parameter gradient for this thread's columns: registers when the row is cached,
// else the row group's partial row in global memory (read-modify-write; only this thread touches it).
template <int V, int kCache>
struct ColumnAcc {
  static constexpr int KC = kCache > 0 ? kCache : 1;
  float acc[KC][V];
  float* part;  // this row group's partial row [C], or nullptr when this gradient is not wanted

  __device__ __forceinline__ void init(float* p, int64_t nvec) {
    part = p;
#pragma unroll
    for (int k = 0; k < KC; ++k)
#pragma unroll
      for (int t = 0; t < V; ++t) acc[k][t] = 0.f;
    if (kCache == 0 && part != nullptr) {
      for_each_vec<0>(nvec, [&](int, int64_t j) { store_vec<V>(part + j * V, acc[0]); });
    }
  }
  // acc[columns of vector j] += a * b (b == nullptr: += a).
  __device__ __forceinline__ void add(int k, int64_t j, const float (&a)[V], const float* b) {
    if (part == nullptr) return;
    if constexpr (kCache > 0) {
#pragma unroll
      for (int t = 0; t < V; ++t) acc[k][t] += b ? a[t] * b[t] : a[t];
    } else {
      float p[V];
      load_vec<V>(part + j * V, p);
#pragma unroll
      for (int t = 0; t < V; ++t) p[t] += b ? a[t] * b[t] : a[t];
      store_vec<V>(part + j * V, p);
    }
  }
  __device__ __forceinline__ void flush(int64_t nvec) {
    if constexpr (kCache > 0) {
      if (part == nullptr) return;
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) { store_vec<V>(part + j * V, acc[k]); });
    }
  }
};

template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kMaxRowThreads) rms_norm_bwd_kernel(const RmsNormBwdArgs a) {
  const T* h = static_cast<const T*>(a.h);
  T* dh = static_cast<T*>(a.dh);
  const int64_t C = a.C, nvec = C / V;
  constexpr int KC = kCache > 0 ? kCache : 1;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;

  ColumnAcc<V, kCache> dw;
  dw.init(a.weight != nullptr ? a.workspace + group * C : nullptr, nvec);

  // Grid-stride loop over row groups; every thread runs the same iterations (the row reductions need
  // all of them), `valid` tells whether its row exists.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < a.N;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < a.N;
    const int64_t base = row * C;
    const float r = valid ? a.rstd[row] : 0.f;
    // n = h * rstd; d = dy (before the weight multiply, for dweight).
    auto load_nd = [&](int64_t j, float (&n)[V], float (&d)[V]) {
      load_vec<V>(h + base + j * V, n);
#pragma unroll
      for (int t = 0; t < V; ++t) n[t] *= r;
      load_any<V>(a.dy, a.dy_dtype, base + j * V, d);
    };
    float nc[KC][V], gc[KC][V];
    float dot[1] = {0.f};  // sum(g * n), g = dy * weight
    if (valid) {
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
        float n[V], g[V];
        load_nd(j, n, g);
        dw.add(k, j, g, n);
        mul_param<V>(a.weight, a.w_dtype, j * V, g);
#pragma unroll
        for (int t = 0; t < V; ++t) dot[0] += g[t] * n[t];
        if constexpr (kCache > 0) {
          copy_arr(n, nc[k]);
          copy_arr(g, gc[k]);
        }
      });
    }
    row_allreduce(dot);
    const float mean_gn = dot[0] / static_cast<float>(C);
    if (!valid) continue;
    for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
      float n[V], g[V];
      if constexpr (kCache > 0) {
        copy_arr(nc[k], n);
        copy_arr(gc[k], g);
      } else {
        load_nd(j, n, g);
        mul_param<V>(a.weight, a.w_dtype, j * V, g);
      }
      float o[V];
#pragma unroll
      for (int t = 0; t < V; ++t) o[t] = r * (g[t] - n[t] * mean_gn);
      if (a.dh_out != nullptr) {
        float d[V];
        load_any<V>(a.dh_out, a.dh_out_dtype, base + j * V, d);
#pragma unroll
        for (int t = 0; t < V; ++t) o[t] += d[t];
      }
      store_vec<V>(dh + base + j * V, o);
    });
  }
  dw.flush(nvec);
}

// minBlocks = 1 stated: left unstated, ptxas held the float32 two-step variant (<float, 4, 2>: n, g and the
// dweight/dbias accumulators, 32 live floats) to 64 registers and spilled 36 bytes; with it, 78 registers
// and no spill (tests/compile/test_sm90_properties.py). Same code and plan, so the same results.
template <typename T, int V, int kCache>
__global__ void __launch_bounds__(kMaxRowThreads, 1) layer_norm_bwd_kernel(const LayerNormBwdArgs a) {
  const T* h = static_cast<const T*>(a.h);
  T* dh = static_cast<T*>(a.dh);
  const int64_t C = a.C, nvec = C / V;
  constexpr int KC = kCache > 0 ? kCache : 1;
  const int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t groups = static_cast<int64_t>(gridDim.x) * blockDim.y;

  // Workspace: dweight partials [groups, C], then dbias partials [groups, C].
  ColumnAcc<V, kCache> dw, db;
  dw.init(a.weight != nullptr ? a.workspace + group * C : nullptr, nvec);
  db.init(a.dbias != nullptr ? a.workspace + (groups + group) * C : nullptr, nvec);

  // Grid-stride loop over row groups; every thread runs the same iterations (the row reductions need
  // all of them), `valid` tells whether its row exists.
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < a.N;
       row0 += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = row0 + threadIdx.y;
    const bool valid = row < a.N;
    const int64_t base = row * C;
    const float mu = valid ? a.mean[row] : 0.f;
    const float r = valid ? a.rstd[row] : 0.f;
    auto load_nd = [&](int64_t j, float (&n)[V], float (&d)[V]) {
      load_vec<V>(h + base + j * V, n);
#pragma unroll
      for (int t = 0; t < V; ++t) n[t] = (n[t] - mu) * r;
      load_any<V>(a.dy, a.dy_dtype, base + j * V, d);
    };
    float nc[KC][V], gc[KC][V];
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * n)
    if (valid) {
      for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
        float n[V], g[V];
        load_nd(j, n, g);
        dw.add(k, j, g, n);
        db.add(k, j, g, nullptr);
        mul_param<V>(a.weight, a.w_dtype, j * V, g);
#pragma unroll
        for (int t = 0; t < V; ++t) {
          sums[0] += g[t];
          sums[1] += g[t] * n[t];
        }
        if constexpr (kCache > 0) {
          copy_arr(n, nc[k]);
          copy_arr(g, gc[k]);
        }
      });
    }
    row_allreduce(sums);
    const float mean_g = sums[0] / static_cast<float>(C), mean_gn = sums[1] / static_cast<float>(C);
    if (!valid) continue;
    for_each_vec<kCache>(nvec, [&](int k, int64_t j) {
      float n[V], g[V];
      if constexpr (kCache > 0) {
        copy_arr(nc[k], n);
        copy_arr(gc[k], g);
      } else {
        load_nd(j, n, g);
        mul_param<V>(a.weight, a.w_dtype, j * V, g);
      }
      float o[V];
#pragma unroll
      for (int t = 0; t < V; ++t) o[t] = r * (g[t] - mean_g - n[t] * mean_gn);
      if (a.dh_out != nullptr) {
        float d[V];
        load_any<V>(a.dh_out, a.dh_out_dtype, base + j * V, d);
#pragma unroll
        for (int t = 0; t < V; ++t) o[t] += d[t];
      }
      store_vec<V>(dh + base + j * V, o);
    });
  }
  dw.flush(nvec);
  db.flush(nvec);
}

// Block (32, kColSumRows): x over columns (coalesced reads), y over slices of the partial rows; the slices
// are combined in a fixed order.
constexpr int kColSumRows = 8;
__global__ void __launch_bounds__(32 * kColSumRows)
    column_sum_kernel(const float* __restrict__ partial, int64_t P, int64_t C, float* __restrict__ out) {
  __shared__ float s[kColSumRows][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float acc = 0.f;
  if (c < C) {
    for (int64_t p = threadIdx.y; p < P; p += kColSumRows) acc += partial[p * C + c];
  }
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.f;
#pragma unroll
    for (int y = 0; y < kColSumRows; ++y) total += s[y][threadIdx.x];
    out[c] = total;
  }
}

// ------------------------------------------------------------------------------------------- planning
// How the rows of nvec vectors map to threads (see the top of this file).
struct RowPlan {
  int vec = 1;    // elements per vector
  int cache = 0;  // register-cache steps (0: uncached)
  int tpr = 32;   // threads per row (blockDim.x)
  int rpb = 1;    // rows per block (blockDim.y)
};

constexpr int kFwdMaxCache = 4;  // up to 4 * 512 cached vectors per row (16K bf16 / 8K fp32 elements)
constexpr int kBwdMaxCache = 2;  // backward keeps n, g and the gradient accumulators: fewer registers left

// Register-cache variants are instantiated for 16-byte vectors only: the scalar fallback (odd C or
// unaligned pointers) always reloads, which keeps the number of kernels (and the build time) down.
template <int V, int... Ks, typename F>
cudaError_t dispatch_cache(int cache, F&& f) {
  if constexpr (V == 1) {
    return dispatch_int<0>(cache, std::forward<F>(f));
  } else {
    return dispatch_int<Ks...>(cache, std::forward<F>(f));
  }
}

RowPlan plan_rows_cached(int64_t C, int vec, int max_cache) {
  RowPlan p;
  p.vec = vec;
  const int64_t nvec = C / vec;
  const int sub_max_cache = max_cache < 4 ? max_cache : 4;
  if (nvec <= 32 * sub_max_cache) {  // short rows: a sub-warp per row, several rows per block
    p.tpr = pow2_ceil(nvec, 32);
    p.cache = pow2_ceil(ceil_div(nvec, p.tpr), 4);
    p.rpb = 256 / p.tpr;
    return p;
  }
  auto threads_for = [&](int cache) { return static_cast<int>(ceil_div(ceil_div(nvec, cache), 32) * 32); };
  // Prefer <= 256 threads with a few vectors each (loads in flight per thread, several blocks per SM).
  for (int k = 1; k <= max_cache; k *= 2) {
    if (nvec <= 256 * k) {
      p.cache = k;
      p.tpr = threads_for(k);
      return p;
    }
  }
  if (nvec <= static_cast<int64_t>(kMaxRowThreads) * max_cache) {
    p.cache = max_cache;
    p.tpr = threads_for(max_cache);
    return p;
  }
  p.cache = 0;
  p.tpr = kMaxRowThreads;
  return p;
}

RowPlan plan_rows(int64_t C, int vec, int max_cache) {
  RowPlan p = plan_rows_cached(C, vec, max_cache);
  if (vec == 1) p.cache = 0;
  return p;
}

// 16-byte vectors when C allows them and every given pointer is aligned for them, else scalars.
template <typename T>
int choose_vec(int64_t C, std::initializer_list<std::pair<const void*, DType>> ptrs) {
  if (C % kVec<T> != 0) return 1;
  for (const auto& [p, dt] : ptrs) {
    if (!aligned_for(p, dt, kVec<T>)) return 1;
  }
  return kVec<T>;
}

unsigned fwd_grid(int64_t N, const RowPlan& p) {
  const int64_t g = ceil_div(N, p.rpb);
  return static_cast<unsigned>(g < INT_MAX ? g : INT_MAX);
}

// Backward: as many blocks as can be resident (they loop over the rows), so that the partial buffer has
// few rows. `groups` (blocks * rows per block) is the number of partial rows.
struct BwdPlan {
  RowPlan rows;
  unsigned grid = 1;
  int64_t groups = 0;
  const void* kernel = nullptr;
};

template <typename Kernel>
void finish_bwd_plan(BwdPlan& plan, int64_t N, Kernel kernel) {
  plan.kernel = reinterpret_cast<const void*>(kernel);
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.rows.tpr * plan.rows.rpb, 0) !=
      cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: clear it so that the launch reports its own status
    per_sm = 1;
  }
  if (per_sm < 1) per_sm = 1;
  const int64_t want = ceil_div(N, plan.rows.rpb);
  const int64_t cap = static_cast<int64_t>(num_sms()) * per_sm;
  plan.grid = static_cast<unsigned>(want < cap ? want : cap);
  plan.groups = static_cast<int64_t>(plan.grid) * plan.rows.rpb;
}

BwdPlan plan_rms_bwd(const RmsNormBwdArgs& a) {
  BwdPlan plan;
  dispatch_dtype(a.h_dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = choose_vec<T>(a.C, {{a.dy, a.dy_dtype}, {a.h, a.h_dtype}, {a.weight, a.w_dtype},
                                        {a.dh_out, a.dh_out_dtype}, {a.dh, a.h_dtype}});
    plan.rows = plan_rows(a.C, vec, kBwdMaxCache);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_cache<decltype(v)::value, 0, 1, 2>(plan.rows.cache, [&](auto k) {
        finish_bwd_plan(plan, a.N, rms_norm_bwd_kernel<T, decltype(v)::value, decltype(k)::value>);
        return cudaSuccess;
      });
    });
  });
  return plan;
}

BwdPlan plan_ln_bwd(const LayerNormBwdArgs& a) {
  BwdPlan plan;
  dispatch_dtype(a.h_dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = choose_vec<T>(a.C, {{a.dy, a.dy_dtype}, {a.h, a.h_dtype}, {a.weight, a.w_dtype},
                                        {a.dh_out, a.dh_out_dtype}, {a.dh, a.h_dtype}});
    plan.rows = plan_rows(a.C, vec, kBwdMaxCache);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_cache<decltype(v)::value, 0, 1, 2>(plan.rows.cache, [&](auto k) {
        finish_bwd_plan(plan, a.N, layer_norm_bwd_kernel<T, decltype(v)::value, decltype(k)::value>);
        return cudaSuccess;
      });
    });
  });
  return plan;
}

// The partial rows are stored with vector stores: the workspace must be 16-byte aligned.
bool workspace_ok(const float* ws, int64_t have, int64_t need) {
  if (need == 0) return true;
  return ws != nullptr && have >= need && reinterpret_cast<uintptr_t>(ws) % 16 == 0;
}

}  // namespace

cudaError_t column_sum(const float* partial, int64_t P, int64_t C, float* out, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(C, 32);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  return launch(column_sum_kernel, dim3(static_cast<unsigned>(blocks)), dim3(32, kColSumRows), stream, partial, P,
                C, out);
}

// ------------------------------------------------------------------------------------------ launchers
cudaError_t rms_norm_fwd(const RmsNormFwdArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.C < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(a.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = choose_vec<T>(a.C, {{a.x, a.x_dtype}, {a.residual, a.x_dtype}, {a.h, a.x_dtype},
                                        {a.weight, a.w_dtype}, {a.y, a.y_dtype}});
    const RowPlan p = plan_rows(a.C, vec, kFwdMaxCache);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_cache<decltype(v)::value, 0, 1, 2, 4>(p.cache, [&](auto k) {
        return launch(rms_norm_fwd_kernel<T, decltype(v)::value, decltype(k)::value>, dim3(fwd_grid(a.N, p)),
                      dim3(p.tpr, p.rpb), stream, a);
      });
    });
  });
}

cudaError_t layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.C < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(a.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = choose_vec<T>(a.C, {{a.x, a.x_dtype}, {a.residual, a.x_dtype}, {a.h, a.x_dtype},
                                        {a.weight, a.w_dtype}, {a.bias, a.b_dtype}, {a.y, a.x_dtype}});
    const RowPlan p = plan_rows(a.C, vec, kFwdMaxCache);
    return dispatch_vec<T>(vec, [&](auto v) {
      return dispatch_cache<decltype(v)::value, 0, 1, 2, 4>(p.cache, [&](auto k) {
        return launch(layer_norm_fwd_kernel<T, decltype(v)::value, decltype(k)::value>, dim3(fwd_grid(a.N, p)),
                      dim3(p.tpr, p.rpb), stream, a);
      });
    });
  });
}

int64_t rms_norm_bwd_workspace(const RmsNormBwdArgs& a) {
  if (a.N == 0 || a.weight == nullptr) return 0;
  return plan_rms_bwd(a).groups * a.C;
}

int64_t layer_norm_bwd_workspace(const LayerNormBwdArgs& a) {
  if (a.N == 0 || (a.weight == nullptr && a.dbias == nullptr)) return 0;
  return 2 * plan_ln_bwd(a).groups * a.C;  // dweight and dbias partials (the unused half is never touched)
}

cudaError_t rms_norm_bwd(const RmsNormBwdArgs& a, cudaStream_t stream) {
  if (a.C < 1 || (a.weight != nullptr && a.dweight == nullptr)) return cudaErrorInvalidValue;
  if (a.N == 0) {  // dweight = sum over no rows
    return a.weight != nullptr ? cudaMemsetAsync(a.dweight, 0, sizeof(float) * a.C, stream) : cudaSuccess;
  }
  const BwdPlan plan = plan_rms_bwd(a);
  if (plan.kernel == nullptr) return cudaErrorInvalidValue;
  if (!workspace_ok(a.workspace, a.workspace_floats, rms_norm_bwd_workspace(a))) return cudaErrorInvalidValue;
  auto kernel = reinterpret_cast<void (*)(RmsNormBwdArgs)>(const_cast<void*>(plan.kernel));
  cudaError_t err = launch(kernel, dim3(plan.grid), dim3(plan.rows.tpr, plan.rows.rpb), stream, a);
  if (err != cudaSuccess || a.weight == nullptr) return err;
  return column_sum(a.workspace, plan.groups, a.C, a.dweight, stream);
}

cudaError_t layer_norm_bwd(const LayerNormBwdArgs& a, cudaStream_t stream) {
  if (a.C < 1 || (a.weight != nullptr && a.dweight == nullptr)) return cudaErrorInvalidValue;
  if (a.N == 0) {
    cudaError_t err = cudaSuccess;
    if (a.weight != nullptr) err = cudaMemsetAsync(a.dweight, 0, sizeof(float) * a.C, stream);
    if (err == cudaSuccess && a.dbias != nullptr) err = cudaMemsetAsync(a.dbias, 0, sizeof(float) * a.C, stream);
    return err;
  }
  const BwdPlan plan = plan_ln_bwd(a);
  if (plan.kernel == nullptr) return cudaErrorInvalidValue;
  if (!workspace_ok(a.workspace, a.workspace_floats, layer_norm_bwd_workspace(a))) return cudaErrorInvalidValue;
  auto kernel = reinterpret_cast<void (*)(LayerNormBwdArgs)>(const_cast<void*>(plan.kernel));
  cudaError_t err = launch(kernel, dim3(plan.grid), dim3(plan.rows.tpr, plan.rows.rpb), stream, a);
  if (err == cudaSuccess && a.weight != nullptr) err = column_sum(a.workspace, plan.groups, a.C, a.dweight, stream);
  if (err == cudaSuccess && a.dbias != nullptr) {
    err = column_sum(a.workspace + plan.groups * a.C, plan.groups, a.C, a.dbias, stream);
  }
  return err;
}

}  // namespace ptm::cuda::launcher
