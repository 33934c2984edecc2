// Torch-facing side of the CUDA kernels: checks the tensors, allocates the results, and calls the torch-free
// launchers of launchers.h on the current stream. Compiled only when torch has CUDA (PTM_WITH_CUDA).
// What a kernel may rely on (and so what is checked here) is listed in ptm_kernels/reference_kernels.py.
#include "kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include "launchers.h"

namespace ptm::cuda {
namespace {

namespace L = launcher;

// The tensor inside an optional argument, or nullptr when it is absent (None or undefined).
const Tensor* get(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

const void* ptr_or_null(const Tensor* t) { return t != nullptr ? t->data_ptr() : nullptr; }

L::DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return L::DType::kFloat32;
    case at::kHalf: return L::DType::kFloat16;
    case at::kBFloat16: return L::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "ptm_kernels CUDA ", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// t is a CUDA tensor on the same device as ref (the tensor whose device the kernel runs on).
void check_device(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "ptm_kernels CUDA ", op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), "ptm_kernels CUDA ", op, ": ", name, " is on ", t.device(),
              " but the input is on ", ref.device());
}

// A row-major contiguous [N, C] input with C >= 1.
void check_rows(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  check_device(t, ref, op, name);
  TORCH_CHECK(t.dim() == 2, "ptm_kernels CUDA ", op, ": ", name, " must be 2-D [N, C], got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "ptm_kernels CUDA ", op, ": ", name, " must be contiguous, got strides ",
              t.strides());
  TORCH_CHECK(t.size(1) >= 1, "ptm_kernels CUDA ", op, ": ", name, " must have C >= 1 columns, got shape ",
              t.sizes());
  (void)dtype_of(t, op, name);
}

// A tensor of the same shape (and, when same_dtype, the same dtype) as ref, contiguous, on its device.
void check_like(const Tensor& t, const Tensor& ref, bool same_dtype, const char* op, const char* name,
                const char* ref_name) {
  check_device(t, ref, op, name);
  TORCH_CHECK(t.sizes() == ref.sizes(), "ptm_kernels CUDA ", op, ": ", name, " has shape ", t.sizes(), " but ",
              ref_name, " has shape ", ref.sizes());
  TORCH_CHECK(t.is_contiguous(), "ptm_kernels CUDA ", op, ": ", name, " must be contiguous, got strides ",
              t.strides());
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "ptm_kernels CUDA ", op, ": ", name, " has dtype ",
                t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  } else {
    (void)dtype_of(t, op, name);
  }
}

// A [C] weight or bias: contiguous, of x's dtype or float32.
void check_param(const Tensor* p, const Tensor& x, const char* op, const char* name) {
  if (p == nullptr) return;
  check_device(*p, x, op, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(1), "ptm_kernels CUDA ", op, ": ", name, " must have shape [",
              x.size(1), "], got ", p->sizes());
  TORCH_CHECK(p->is_contiguous(), "ptm_kernels CUDA ", op, ": ", name, " must be contiguous");
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, "ptm_kernels CUDA ", op, ": ",
              name, " must have the input's dtype (", x.scalar_type(), ") or float32, got ", p->scalar_type());
}

// A float32 [N] statistic (mean, rstd).
void check_stat(const Tensor& s, const Tensor& x, const char* op, const char* name) {
  check_device(s, x, op, name);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 1 && s.size(0) == x.size(0) && s.is_contiguous(),
              "ptm_kernels CUDA ", op, ": ", name, " must be a contiguous float32 tensor of shape [", x.size(0),
              "], got ", s.scalar_type(), " ", s.sizes());
}

L::Act act_of(const std::string& act, const char* op) {
  if (act == "gelu") return L::Act::kGelu;
  if (act == "gelu_tanh") return L::Act::kGeluTanh;
  if (act == "silu") return L::Act::kSilu;
  TORCH_CHECK(false, "ptm_kernels CUDA ", op, ": unknown activation '", act, "' (gelu, gelu_tanh or silu)");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "ptm_kernels CUDA ", op, ": kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

cudaStream_t current_stream(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// The float32 workspace of a two-stage reduction, or an undefined tensor when none is needed.
Tensor workspace(int64_t floats, const Tensor& like) {
  return floats > 0 ? at::empty({floats}, like.options().dtype(at::kFloat)) : Tensor();
}

}  // namespace

// ----------------------------------------------------------------------------------------------- norms
std::tuple<Tensor, Tensor, Tensor> rms_norm_fwd(const Tensor& x, const OptTensor& weight,
                                               const OptTensor& residual, double eps, bool round_normed) {
  constexpr const char* op = "rms_norm_fwd";
  check_rows(x, x, op, "x");
  const Tensor* w = get(weight);
  const Tensor* r = get(residual);
  check_param(w, x, op, "weight");
  if (r != nullptr) check_like(*r, x, true, op, "residual", "x");
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), C = x.size(1);
  const auto y_type = w != nullptr ? c10::promoteTypes(x.scalar_type(), w->scalar_type()) : x.scalar_type();
  Tensor y = at::empty({N, C}, x.options().dtype(y_type));
  Tensor h = r != nullptr ? at::empty({N, C}, x.options()) : x.new_empty({0});
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));

  L::RmsNormFwdArgs a;
  a.x = x.data_ptr();
  a.residual = ptr_or_null(r);
  a.weight = ptr_or_null(w);
  a.y = y.data_ptr();
  a.h = r != nullptr ? h.data_ptr() : nullptr;
  a.rstd = rstd.data_ptr<float>();
  a.x_dtype = dtype_of(x, op, "x");
  a.w_dtype = w != nullptr ? dtype_of(*w, op, "weight") : a.x_dtype;
  a.y_dtype = dtype_of(y, op, "y");
  a.N = N;
  a.C = C;
  a.eps = static_cast<float>(eps);
  a.round_normed = round_normed;
  check_launch(L::rms_norm_fwd(a, current_stream(x)), op);
  return {y, h, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                        const Tensor& rstd, const OptTensor& dh_out) {
  constexpr const char* op = "rms_norm_bwd";
  check_rows(h, h, op, "h");
  check_like(dy, h, false, op, "dy", "h");
  const Tensor* w = get(weight);
  const Tensor* dho = get(dh_out);
  check_param(w, h, op, "weight");
  check_stat(rstd, h, op, "rstd");
  if (dho != nullptr) check_like(*dho, h, false, op, "dh_out", "h");
  const c10::cuda::CUDAGuard guard(h.device());

  const int64_t N = h.size(0), C = h.size(1);
  Tensor dh = at::empty({N, C}, h.options());
  Tensor dweight = w != nullptr ? at::empty({C}, h.options().dtype(at::kFloat)) : h.new_empty({0});

  L::RmsNormBwdArgs a;
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.weight = ptr_or_null(w);
  a.rstd = rstd.data_ptr<float>();
  a.dh_out = ptr_or_null(dho);
  a.dh = dh.data_ptr();
  a.dweight = w != nullptr ? dweight.data_ptr<float>() : nullptr;
  a.dy_dtype = dtype_of(dy, op, "dy");
  a.h_dtype = dtype_of(h, op, "h");
  a.w_dtype = w != nullptr ? dtype_of(*w, op, "weight") : a.h_dtype;
  a.dh_out_dtype = dho != nullptr ? dtype_of(*dho, op, "dh_out") : a.h_dtype;
  a.N = N;
  a.C = C;
  // Sized for these exact arguments on this device; must stay alive until the launches are enqueued
  // (the caching allocator keeps it valid for the stream afterwards).
  const Tensor ws = workspace(L::rms_norm_bwd_workspace(a), h);
  a.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  a.workspace_floats = ws.defined() ? ws.numel() : 0;
  check_launch(L::rms_norm_bwd(a, current_stream(h)), op);
  return {dh, dweight};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight,
                                                          const OptTensor& bias, const OptTensor& residual,
                                                          double eps) {
  constexpr const char* op = "layer_norm_fwd";
  check_rows(x, x, op, "x");
  const Tensor* w = get(weight);
  const Tensor* b = get(bias);
  const Tensor* r = get(residual);
  check_param(w, x, op, "weight");
  check_param(b, x, op, "bias");
  if (r != nullptr) check_like(*r, x, true, op, "residual", "x");
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), C = x.size(1);
  Tensor y = at::empty({N, C}, x.options());
  Tensor h = r != nullptr ? at::empty({N, C}, x.options()) : x.new_empty({0});
  Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));

  L::LayerNormFwdArgs a;
  a.x = x.data_ptr();
  a.residual = ptr_or_null(r);
  a.weight = ptr_or_null(w);
  a.bias = ptr_or_null(b);
  a.y = y.data_ptr();
  a.h = r != nullptr ? h.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.x_dtype = dtype_of(x, op, "x");
  a.w_dtype = w != nullptr ? dtype_of(*w, op, "weight") : a.x_dtype;
  a.b_dtype = b != nullptr ? dtype_of(*b, op, "bias") : a.x_dtype;
  a.N = N;
  a.C = C;
  a.eps = static_cast<float>(eps);
  check_launch(L::layer_norm_fwd(a, current_stream(x)), op);
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& h, const OptTensor& weight,
                                                  const Tensor& mean, const Tensor& rstd,
                                                  const OptTensor& dh_out, bool has_bias) {
  constexpr const char* op = "layer_norm_bwd";
  check_rows(h, h, op, "h");
  check_like(dy, h, false, op, "dy", "h");
  const Tensor* w = get(weight);
  const Tensor* dho = get(dh_out);
  check_param(w, h, op, "weight");
  check_stat(mean, h, op, "mean");
  check_stat(rstd, h, op, "rstd");
  if (dho != nullptr) check_like(*dho, h, false, op, "dh_out", "h");
  const c10::cuda::CUDAGuard guard(h.device());

  const int64_t N = h.size(0), C = h.size(1);
  Tensor dh = at::empty({N, C}, h.options());
  Tensor dweight = w != nullptr ? at::empty({C}, h.options().dtype(at::kFloat)) : h.new_empty({0});
  Tensor dbias = has_bias ? at::empty({C}, h.options().dtype(at::kFloat)) : h.new_empty({0});

  L::LayerNormBwdArgs a;
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.weight = ptr_or_null(w);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dh_out = ptr_or_null(dho);
  a.dh = dh.data_ptr();
  a.dweight = w != nullptr ? dweight.data_ptr<float>() : nullptr;
  a.dbias = has_bias ? dbias.data_ptr<float>() : nullptr;
  a.dy_dtype = dtype_of(dy, op, "dy");
  a.h_dtype = dtype_of(h, op, "h");
  a.w_dtype = w != nullptr ? dtype_of(*w, op, "weight") : a.h_dtype;
  a.dh_out_dtype = dho != nullptr ? dtype_of(*dho, op, "dh_out") : a.h_dtype;
  a.N = N;
  a.C = C;
  const Tensor ws = workspace(L::layer_norm_bwd_workspace(a), h);
  a.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  a.workspace_floats = ws.defined() ? ws.numel() : 0;
  check_launch(L::layer_norm_bwd(a, current_stream(h)), op);
  return {dh, dweight, dbias};
}

// ----------------------------------------------------------------------------------------- activations
Tensor act_fwd(const Tensor& x, const OptTensor& bias, const std::string& act) {
  constexpr const char* op = "act_fwd";
  check_rows(x, x, op, "x");
  const Tensor* b = get(bias);
  check_param(b, x, op, "bias");
  const L::Act kind = act_of(act, op);
  const c10::cuda::CUDAGuard guard(x.device());

  Tensor y = at::empty(x.sizes(), x.options());
  L::ActFwdArgs a;
  a.x = x.data_ptr();
  a.bias = ptr_or_null(b);
  a.y = y.data_ptr();
  a.dtype = dtype_of(x, op, "x");
  a.b_dtype = b != nullptr ? dtype_of(*b, op, "bias") : a.dtype;
  a.N = x.size(0);
  a.C = x.size(1);
  a.act = kind;
  check_launch(L::act_fwd(a, current_stream(x)), op);
  return y;
}

std::tuple<Tensor, Tensor> act_bwd(const Tensor& dy, const Tensor& x, const OptTensor& bias,
                                   const std::string& act) {
  constexpr const char* op = "act_bwd";
  check_rows(x, x, op, "x");
  check_like(dy, x, true, op, "dy", "x");
  const Tensor* b = get(bias);
  check_param(b, x, op, "bias");
  const L::Act kind = act_of(act, op);
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t C = x.size(1);
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dbias = b != nullptr ? at::empty({C}, x.options().dtype(at::kFloat)) : x.new_empty({0});
  L::ActBwdArgs a;
  a.dy = dy.data_ptr();
  a.x = x.data_ptr();
  a.bias = ptr_or_null(b);
  a.dx = dx.data_ptr();
  a.dbias = b != nullptr ? dbias.data_ptr<float>() : nullptr;
  a.dtype = dtype_of(x, op, "x");
  a.b_dtype = b != nullptr ? dtype_of(*b, op, "bias") : a.dtype;
  a.N = x.size(0);
  a.C = C;
  a.act = kind;
  const Tensor ws = workspace(L::act_bwd_workspace(a), x);
  a.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  a.workspace_floats = ws.defined() ? ws.numel() : 0;
  check_launch(L::act_bwd(a, current_stream(x)), op);
  return {dx, dbias};
}

Tensor glu_fwd(const Tensor& gate, const Tensor& up, const std::string& act) {
  constexpr const char* op = "glu_fwd";
  check_rows(gate, gate, op, "gate");
  check_like(up, gate, true, op, "up", "gate");
  const L::Act kind = act_of(act, op);
  const c10::cuda::CUDAGuard guard(gate.device());

  Tensor y = at::empty(gate.sizes(), gate.options());
  L::GluFwdArgs a;
  a.gate = gate.data_ptr();
  a.up = up.data_ptr();
  a.y = y.data_ptr();
  a.dtype = dtype_of(gate, op, "gate");
  a.numel = gate.numel();
  a.act = kind;
  check_launch(L::glu_fwd(a, current_stream(gate)), op);
  return y;
}

std::tuple<Tensor, Tensor> glu_bwd(const Tensor& dy, const Tensor& gate, const Tensor& up,
                                   const std::string& act) {
  constexpr const char* op = "glu_bwd";
  check_rows(gate, gate, op, "gate");
  check_like(up, gate, true, op, "up", "gate");
  check_like(dy, gate, true, op, "dy", "gate");
  const L::Act kind = act_of(act, op);
  const c10::cuda::CUDAGuard guard(gate.device());

  Tensor dgate = at::empty(gate.sizes(), gate.options());
  Tensor dup = at::empty(up.sizes(), up.options());
  L::GluBwdArgs a;
  a.dy = dy.data_ptr();
  a.gate = gate.data_ptr();
  a.up = up.data_ptr();
  a.dgate = dgate.data_ptr();
  a.dup = dup.data_ptr();
  a.dtype = dtype_of(gate, op, "gate");
  a.numel = gate.numel();
  a.act = kind;
  check_launch(L::glu_bwd(a, current_stream(gate)), op);
  return {dgate, dup};
}

// ------------------------------------------------------------------------------------------------ rope
Tensor rope_fwd(const Tensor& x, const Tensor& cos, const Tensor& sin, const Tensor& positions,
                bool interleaved, int64_t rotary_dim, bool inverse) {
  constexpr const char* op = "rope_fwd";
  check_device(x, x, op, "x");
  TORCH_CHECK(x.dim() == 4, "ptm_kernels CUDA ", op, ": x must be 4-D [B, H, L, D], got shape ", x.sizes());
  TORCH_CHECK(x.size(3) <= 1 || x.stride(3) == 1, "ptm_kernels CUDA ", op,
              ": x must have stride 1 in its last dimension, got strides ", x.strides());
  const L::DType dtype = dtype_of(x, op, "x");
  const int64_t B = x.size(0), H = x.size(1), seq = x.size(2), D = x.size(3);
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim <= D && rotary_dim % 2 == 0, "ptm_kernels CUDA ", op,
              ": rotary_dim must be even and in [0, ", D, "], got ", rotary_dim);
  check_device(cos, x, op, "cos");
  check_device(sin, x, op, "sin");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "ptm_kernels CUDA ", op,
              ": cos and sin must be float32, got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == rotary_dim / 2 && sin.sizes() == cos.sizes(), "ptm_kernels CUDA ",
              op, ": cos and sin must have shape [P, rotary_dim / 2 = ", rotary_dim / 2, "], got ", cos.sizes(),
              " and ", sin.sizes());
  check_device(positions, x, op, "positions");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "ptm_kernels CUDA ", op, ": positions must be int64, got ",
              positions.scalar_type());
  TORCH_CHECK(positions.dim() == 2 && (positions.size(0) == B || positions.size(0) == 1) &&
                  positions.size(1) == seq,
              "ptm_kernels CUDA ", op, ": positions must have shape [", B, ", ", seq, "] or [1, ", seq, "], got ",
              positions.sizes());
  const c10::cuda::CUDAGuard guard(x.device());

  Tensor out = at::empty_like(x);  // x's strides when x is dense, else contiguous (as the reference)
  TORCH_CHECK(D <= 1 || out.stride(3) == 1, "ptm_kernels CUDA ", op, ": unexpected output strides ", out.strides());
  if (out.numel() == 0) return out;
  // The kernel reads cos/sin rows with unit column stride.
  const Tensor c = cos.contiguous();
  const Tensor s = sin.contiguous();

  L::RopeArgs a;
  a.x = x.data_ptr();
  a.out = out.data_ptr();
  a.x_sb = x.stride(0);
  a.x_sh = x.stride(1);
  a.x_sl = x.stride(2);
  a.out_sb = out.stride(0);
  a.out_sh = out.stride(1);
  a.out_sl = out.stride(2);
  a.positions = positions.data_ptr<int64_t>();
  a.pos_sb = positions.size(0) == 1 ? 0 : positions.stride(0);
  a.pos_sl = positions.stride(1);
  a.cos = c.data_ptr<float>();
  a.sin = s.data_ptr<float>();
  a.cs_stride = c.size(1) > 0 ? c.stride(0) : 0;
  a.P = c.size(0);
  a.dtype = dtype;
  a.B = B;
  a.H = H;
  a.L = seq;
  a.D = D;
  a.rotary_dim = rotary_dim;
  a.interleaved = interleaved;
  a.inverse = inverse;
  check_launch(L::rope_fwd(a, current_stream(x)), op);
  return out;
}

}  // namespace ptm::cuda
