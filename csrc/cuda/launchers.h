// CUDA launchers of ptm_kernels: torch-free declarations (CUDA runtime + standard library only), so that the
// .cu files compile with any nvcc, without torch's CUDA headers. csrc/cuda/bindings.cpp turns tensors into
// these argument structs. Semantics: the function of the same name in ptm_kernels/reference_kernels.py.
//
// Conventions shared by every launcher:
// - pointers are device pointers; an optional input or output is nullptr when absent;
// - norm and activation tensors are row-major contiguous [N, C] (row stride C); weights/biases are [C];
// - a DType field gives the element type of the pointer(s) it follows; everything is computed in float32;
// - N (or numel) may be 0 (nothing is launched); C >= 1; all offsets are 64-bit;
// - launchers enqueue on `stream` and return the launch error (cudaSuccess when all went well).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ptm::cuda::launcher {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The activations of reference_kernels._act: "gelu" (erf), "gelu_tanh", "silu".
enum class Act : int { kGelu = 0, kGeluTanh = 1, kSilu = 2 };

// ------------------------------------------------------------------------------------------------ norms
struct RmsNormFwdArgs {
  const void* x = nullptr;         // [N, C] x_dtype
  const void* residual = nullptr;  // [N, C] x_dtype, optional
  const void* weight = nullptr;    // [C] w_dtype, optional
  void* y = nullptr;               // [N, C] y_dtype (promote(x, weight): x_dtype, or float32 for a float32 weight)
  void* h = nullptr;               // [N, C] x_dtype: x + residual; written only when residual != nullptr
  float* rstd = nullptr;           // [N]
  DType x_dtype = DType::kFloat32, w_dtype = DType::kFloat32, y_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
  float eps = 0.f;
  bool round_normed = false;  // round n = h * rstd to x_dtype before the weight multiply (LLaMA)
};

struct RmsNormBwdArgs {
  const void* dy = nullptr;      // [N, C] dy_dtype
  const void* h = nullptr;       // [N, C] h_dtype
  const void* weight = nullptr;  // [C] w_dtype, optional
  const float* rstd = nullptr;   // [N]
  const void* dh_out = nullptr;  // [N, C] dh_out_dtype, optional
  void* dh = nullptr;            // [N, C] h_dtype
  float* dweight = nullptr;      // [C]; required iff weight != nullptr
  float* workspace = nullptr;    // rms_norm_bwd_workspace(args) floats, 16-byte aligned (nullptr if 0)
  int64_t workspace_floats = 0;  // its size, checked by the launcher
  DType dy_dtype = DType::kFloat32, h_dtype = DType::kFloat32, w_dtype = DType::kFloat32,
        dh_out_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
};

struct LayerNormFwdArgs {
  const void* x = nullptr;         // [N, C] x_dtype
  const void* residual = nullptr;  // [N, C] x_dtype, optional
  const void* weight = nullptr;    // [C] w_dtype, optional
  const void* bias = nullptr;      // [C] b_dtype, optional
  void* y = nullptr;               // [N, C] x_dtype
  void* h = nullptr;               // [N, C] x_dtype, written only when residual != nullptr
  float* mean = nullptr;           // [N]
  float* rstd = nullptr;           // [N]
  DType x_dtype = DType::kFloat32, w_dtype = DType::kFloat32, b_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
  float eps = 0.f;
};

struct LayerNormBwdArgs {
  const void* dy = nullptr;      // [N, C] dy_dtype
  const void* h = nullptr;       // [N, C] h_dtype
  const void* weight = nullptr;  // [C] w_dtype, optional
  const float* mean = nullptr;   // [N]
  const float* rstd = nullptr;   // [N]
  const void* dh_out = nullptr;  // [N, C] dh_out_dtype, optional
  void* dh = nullptr;            // [N, C] h_dtype
  float* dweight = nullptr;      // [C]; required iff weight != nullptr
  float* dbias = nullptr;        // [C]; optional (has_bias)
  float* workspace = nullptr;    // layer_norm_bwd_workspace(args) floats, 16-byte aligned
  int64_t workspace_floats = 0;
  DType dy_dtype = DType::kFloat32, h_dtype = DType::kFloat32, w_dtype = DType::kFloat32,
        dh_out_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
};

// Workspace sizes, in floats, for the deterministic two-stage dweight/dbias reductions: per-block partial
// sums [P, C] (P = number of row groups in flight), then a column sum. They depend on the current device
// (its SM count and occupancy) and on the arguments, so fill in every field but the workspace, select the
// device, query, allocate, then launch with the same arguments; a launch with a smaller workspace fails with
// cudaErrorInvalidValue.
int64_t rms_norm_bwd_workspace(const RmsNormBwdArgs& args);
int64_t layer_norm_bwd_workspace(const LayerNormBwdArgs& args);

cudaError_t rms_norm_fwd(const RmsNormFwdArgs& args, cudaStream_t stream);
cudaError_t rms_norm_bwd(const RmsNormBwdArgs& args, cudaStream_t stream);
cudaError_t layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);
cudaError_t layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ activations
struct ActFwdArgs {
  const void* x = nullptr;     // [N, C] dtype
  const void* bias = nullptr;  // [C] b_dtype, optional (broadcast over rows; x + bias is not rounded)
  void* y = nullptr;           // [N, C] dtype
  DType dtype = DType::kFloat32, b_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
  Act act = Act::kGelu;
};

struct ActBwdArgs {
  const void* dy = nullptr;    // [N, C] dtype
  const void* x = nullptr;     // [N, C] dtype
  const void* bias = nullptr;  // [C] b_dtype, optional
  void* dx = nullptr;          // [N, C] dtype
  float* dbias = nullptr;      // [C]; required iff bias != nullptr (sum over rows of the unrounded dx)
  float* workspace = nullptr;  // act_bwd_workspace(args) floats, 16-byte aligned
  int64_t workspace_floats = 0;
  DType dtype = DType::kFloat32, b_dtype = DType::kFloat32;
  int64_t N = 0, C = 0;
  Act act = Act::kGelu;
};

// gate, up, dy and the outputs share one dtype and one contiguous layout of numel elements.
struct GluFwdArgs {
  const void* gate = nullptr;
  const void* up = nullptr;
  void* y = nullptr;
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  Act act = Act::kSilu;
};

struct GluBwdArgs {
  const void* dy = nullptr;
  const void* gate = nullptr;
  const void* up = nullptr;
  void* dgate = nullptr;
  void* dup = nullptr;
  DType dtype = DType::kFloat32;
  int64_t numel = 0;
  Act act = Act::kSilu;
};

int64_t act_bwd_workspace(const ActBwdArgs& args);

cudaError_t act_fwd(const ActFwdArgs& args, cudaStream_t stream);
cudaError_t act_bwd(const ActBwdArgs& args, cudaStream_t stream);
cudaError_t glu_fwd(const GluFwdArgs& args, cudaStream_t stream);
cudaError_t glu_bwd(const GluBwdArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------- rope
struct RopeArgs {
  const void* x = nullptr;  // [B, H, L, D] dtype, strides (x_sb, x_sh, x_sl, 1), in elements
  void* out = nullptr;      // [B, H, L, D] dtype, strides (out_sb, out_sh, out_sl, 1)
  int64_t x_sb = 0, x_sh = 0, x_sl = 0;
  int64_t out_sb = 0, out_sh = 0, out_sl = 0;
  const int64_t* positions = nullptr;  // positions[b * pos_sb + l * pos_sl]; pos_sb = 0 for a [1, L] tensor
  int64_t pos_sb = 0, pos_sl = 0;
  const float* cos = nullptr;  // [P, rotary_dim / 2], row stride cs_stride, unit column stride
  const float* sin = nullptr;  // same shape and strides as cos
  int64_t cs_stride = 0;
  int64_t P = 0;  // rows of cos/sin; a position p < 0 means p + P (torch indexing); out of range -> NaN
  DType dtype = DType::kFloat32;
  int64_t B = 0, H = 0, L = 0, D = 0;
  int64_t rotary_dim = 0;  // even, 0 <= rotary_dim <= D; dimensions >= rotary_dim are copied
  bool interleaved = false;
  bool inverse = false;  // rotate by minus the angle (the backward)
};

cudaError_t rope_fwd(const RopeArgs& args, cudaStream_t stream);

}  // namespace ptm::cuda::launcher
