// Helpers shared by the CUDA bindings (csrc/cuda/*_binding.cpp): SM count and the float dtype code.
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime.h>

#include "../xlk_checks.h"

namespace xlk {

// Multiprocessor count of `device` (132 when the query fails), to size persistent grids.
inline int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 132;
  }
  return n;
}

// Dtype code of the launchers (0 float32, 1 float16, 2 bfloat16; kNs*/kSteer* enums); what names the tensor.
inline int float_dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, what, " must be float32/float16/bfloat16, got ", t);
  }
  return -1;
}

}  // namespace xlk
