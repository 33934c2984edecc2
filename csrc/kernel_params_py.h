// pybind11 casters: the parameter objects of ptm_kernels/kernel_params.py -> the structs of
// csrc/cpu/kernel_params.h, attribute by attribute. The kernels bound in ops.cpp take the structs, so a Python
// call passes the objects themselves (Python -> C++ only: no kernel returns one).
//
// Each struct has one caster (PTM_PARAMS_CASTER, below) that calls its read_params; a read_params lists the
// struct's (attribute name, field) pairs once, and a nested parameter object is read through its own caster.
#pragma once

#include <torch/extension.h>

#include "cpu/kernel_params.h"

namespace ptm::binding {

inline void read_params(pybind11::handle o, cpu::Visibility& v);
inline void read_params(pybind11::handle o, cpu::Bias& b);
inline void read_params(pybind11::handle o, cpu::Dropout& d);
inline void read_params(pybind11::handle o, cpu::AttentionParams& p);
inline void read_params(pybind11::handle o, cpu::RelativeParams& p);
inline void read_params(pybind11::handle o, cpu::RelativeStream& s);

}  // namespace ptm::binding

// The caster of one struct: loads it with ptm::binding::read_params.
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

PTM_PARAMS_CASTER(ptm::cpu::Visibility)
PTM_PARAMS_CASTER(ptm::cpu::Bias)
PTM_PARAMS_CASTER(ptm::cpu::Dropout)
PTM_PARAMS_CASTER(ptm::cpu::AttentionParams)
PTM_PARAMS_CASTER(ptm::cpu::RelativeParams)
PTM_PARAMS_CASTER(ptm::cpu::RelativeStream)

namespace ptm::binding {

// read(o, "a", s.a, "b", s.b, ...): each field from the attribute of that name (a parameter object through its
// caster above).
template <typename T, typename... Rest>
void read(pybind11::handle o, const char* name, T& field, Rest&&... rest) {
  field = o.attr(name).cast<T>();
  if constexpr (sizeof...(Rest) > 0) read(o, std::forward<Rest>(rest)...);
}

inline void read_params(pybind11::handle o, cpu::Visibility& v) {
  read(o, "causal", v.causal, "window_left", v.window_left, "window_right", v.window_right, "key_lengths",
       v.key_lengths, "prefix_lengths", v.prefix_lengths, "q_segments", v.q_segments, "k_segments", v.k_segments,
       "dense_mask", v.dense_mask, "block_map", v.block_map, "block_m", v.block_m, "block_n", v.block_n);
}

inline void read_params(pybind11::handle o, cpu::Bias& b) {
  read(o, "dense", b.dense, "toeplitz", b.toeplitz, "dense_requires_grad", b.dense_requires_grad,
       "toeplitz_requires_grad", b.toeplitz_requires_grad);
}

inline void read_params(pybind11::handle o, cpu::Dropout& d) {
  read(o, "p", d.p);
  const auto seed = o.attr("seed").cast<cpu::OptTensor>();  // a tensor in Python, its value here
  d.seed = seed.has_value() && seed->defined() ? seed->item<int64_t>() : 0;
}

inline void read_params(pybind11::handle o, cpu::AttentionParams& p) {
  read(o, "scale", p.scale, "vis", p.vis, "bias", p.bias, "dropout", p.dropout);
}

inline void read_params(pybind11::handle o, cpu::RelativeParams& p) {
  read(o, "k_ids", p.k_ids, "scale", p.scale, "r_offset", p.r_offset, "q_len", p.q_len, "dropout", p.dropout);
}

inline void read_params(pybind11::handle o, cpu::RelativeStream& s) {
  read(o, "q", s.q, "u", s.u, "v_bias", s.v_bias, "seg", s.seg, "q_ids", s.q_ids, "positions", s.positions, "vis",
       s.vis);
  // the biased queries as Python forms them (one definition of the rounding to q's dtype)
  const auto biased = o.attr("biased")().cast<std::tuple<at::Tensor, at::Tensor>>();
  s.qu = std::get<0>(biased);
  s.qv = std::get<1>(biased);
}

}  // namespace ptm::binding
