// Tensor argument checks shared by the CPU kernels and the CUDA bindings (torch headers only, no CUDA).
// dev: the device the tensor must be on; nullopt = a CPU tensor. Messages read "op: name must ...".
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace xlk {

inline void check_device(const at::Tensor& t, const char* op, const char* name, const std::optional<at::Device>& dev) {
  if (dev.has_value()) {
    TORCH_CHECK(t.device() == *dev, op, ": ", name, " must be on ", *dev, ", got ", t.device());
  } else {
    TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  }
}

// t must have dtype dt, shape `shape` and be contiguous.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dt,
                         at::IntArrayRef shape, const std::optional<at::Device>& dev = std::nullopt) {
  check_device(t, op, name, dev);
  TORCH_CHECK(t.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// t must match ref in shape and dtype and be contiguous.
inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const std::optional<at::Device>& dev = std::nullopt) {
  check_device(t, op, name, dev);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace xlk
