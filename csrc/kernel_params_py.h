// pybind11 casters: the parameter objects of ptm_kernels/kernel_params.py -> the structs of
// csrc/cpu/kernel_params.h, attribute by attribute. The kernels bound in ops.cpp take the structs, so a Python
// call passes the objects themselves (Python -> C++ only: no kernel returns one).
#pragma once

#include <torch/extension.h>

#include "cpu/kernel_params.h"

namespace ptm::binding {

template <typename T>
void read(pybind11::handle obj, const char* name, T& field) {
  field = obj.attr(name).cast<T>();
}

inline void read_params(pybind11::handle o, cpu::Visibility& v) {
  read(o, "causal", v.causal);
  read(o, "window_left", v.window_left);
  read(o, "window_right", v.window_right);
  read(o, "key_lengths", v.key_lengths);
  read(o, "prefix_lengths", v.prefix_lengths);
  read(o, "q_segments", v.q_segments);
  read(o, "k_segments", v.k_segments);
  read(o, "dense_mask", v.dense_mask);
  read(o, "block_map", v.block_map);
  read(o, "block_m", v.block_m);
  read(o, "block_n", v.block_n);
}

inline void read_params(pybind11::handle o, cpu::Bias& b) {
  read(o, "dense", b.dense);
  read(o, "toeplitz", b.toeplitz);
  read(o, "dense_requires_grad", b.dense_requires_grad);
  read(o, "toeplitz_requires_grad", b.toeplitz_requires_grad);
}

inline void read_params(pybind11::handle o, cpu::Dropout& d) {
  read(o, "p", d.p);
  const auto seed = o.attr("seed").cast<cpu::OptTensor>();
  d.seed = seed.has_value() && seed->defined() ? seed->item<int64_t>() : 0;
}

inline void read_params(pybind11::handle o, cpu::AttentionParams& p) {
  read(o, "scale", p.scale);
  read_params(o.attr("vis"), p.vis);
  read_params(o.attr("bias"), p.bias);
  read_params(o.attr("dropout"), p.dropout);
}

inline void read_params(pybind11::handle o, cpu::RelativeParams& p) {
  read(o, "k_ids", p.k_ids);
  read(o, "scale", p.scale);
  read(o, "r_offset", p.r_offset);
  read(o, "q_len", p.q_len);
  read_params(o.attr("dropout"), p.dropout);
}

inline void read_params(pybind11::handle o, cpu::RelativeStream& s) {
  read(o, "qu", s.qu);
  read(o, "qv", s.qv);
  read(o, "seg", s.seg);
  read(o, "q_ids", s.q_ids);
  read(o, "positions", s.positions);
  read_params(o.attr("vis"), s.vis);
}

}  // namespace ptm::binding

// One caster per struct that a kernel takes, each calling the read_params above.
#define PTM_PARAMS_CASTER(T)                                                   \
  namespace pybind11::detail {                                                 \
  template <>                                                                  \
  struct type_caster<T> {                                                      \
    PYBIND11_TYPE_CASTER(T, const_name(#T));                                   \
    bool load(handle src, bool) {                                              \
      ptm::binding::read_params(src, value);                                   \
      return true;                                                             \
    }                                                                          \
    static handle cast(const T&, return_value_policy, handle) {                \
      throw cast_error(#T " is only passed from Python to C++");               \
    }                                                                          \
  };                                                                           \
  }

PTM_PARAMS_CASTER(ptm::cpu::AttentionParams)
PTM_PARAMS_CASTER(ptm::cpu::RelativeParams)
PTM_PARAMS_CASTER(ptm::cpu::RelativeStream)
