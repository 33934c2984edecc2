// The Python module ptm_kernels._C: one submodule per device, each exposing the kernel interface of
// ptm_kernels/reference_kernels.py. The torch.library ops themselves are defined in Python
// (ptm_kernels/ops/), so that the package imports and works without this extension.
#include <torch/extension.h>

#include "kernel_params_py.h"  // Python parameter objects -> C++ structs, for the attention kernels
#include "cpu/attention.h"
#include "cpu/kernels.h"
#include "cpu/relative_attention.h"
#ifdef PTM_WITH_CUDA
#include "cuda/kernels.h"
#endif

// The same list of kernels is bound for every device namespace.
#define PTM_BIND_KERNELS(mod, ns)                     \
  mod.def("rms_norm_fwd", &ns::rms_norm_fwd);         \
  mod.def("rms_norm_bwd", &ns::rms_norm_bwd);         \
  mod.def("layer_norm_fwd", &ns::layer_norm_fwd);     \
  mod.def("layer_norm_bwd", &ns::layer_norm_bwd);     \
  mod.def("act_fwd", &ns::act_fwd);                   \
  mod.def("act_bwd", &ns::act_bwd);                   \
  mod.def("glu_fwd", &ns::glu_fwd);                   \
  mod.def("glu_bwd", &ns::glu_bwd);                   \
  mod.def("rope_fwd", &ns::rope_fwd);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptm_kernels C++/CUDA kernels";
  auto cpu = m.def_submodule("cpu", "C++ CPU kernels (at::vec + at::parallel_for)");
  PTM_BIND_KERNELS(cpu, ptm::cpu)
  cpu.def("attention_fwd", &ptm::cpu::attention_fwd);
  cpu.def("attention_bwd", &ptm::cpu::attention_bwd);
  cpu.def("attention_dropout_mask", &ptm::cpu::attention_dropout_mask);
  cpu.def("relative_attention_fwd", &ptm::cpu::relative_attention_fwd);
  cpu.def("relative_attention_bwd", &ptm::cpu::relative_attention_bwd);
  cpu.def("two_stream_attention_fwd", &ptm::cpu::two_stream_attention_fwd);
  cpu.def("two_stream_attention_bwd", &ptm::cpu::two_stream_attention_bwd);
  cpu.def("cross_entropy_fwd", &ptm::cpu::cross_entropy_fwd);
  cpu.def("cross_entropy_bwd", &ptm::cpu::cross_entropy_bwd);
  cpu.def("linear_fwd", &ptm::cpu::linear_fwd);
  // The tile the CPU attention classifies (and skips) at, whatever the head dim, dtype and device.
  cpu.def("attention_tile", [](int64_t, pybind11::object, pybind11::object) {
    return std::make_tuple(ptm::cpu::kAttentionBlockM, ptm::cpu::kAttentionBlockN);
  });
  // The CPU attention classifies tiles for the analytic parts and segment ids itself: a block map only adds
  // the dense mask's knowledge, so the Python layer builds none without one (ops/attention.py, _tile).
  cpu.attr("attention_block_map_dense_only") = true;
  // Kernels that only exist on some devices are bound below their submodule.
#ifdef PTM_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels (torch-free .cu launchers)");
  PTM_BIND_KERNELS(cuda, ptm::cuda)
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
