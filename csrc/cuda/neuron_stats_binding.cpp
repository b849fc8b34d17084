// CUDA implementation of xlkernels::neuron_stats_accum (schema in csrc/cpu/neuron_stats.cpp): checks the tensors
// and calls the torch-free launcher of csrc/cuda/neuron_stats.cu. Ids are range-checked in Python (one sync);
// the kernel skips ids outside [-1, G) rather than writing out of bounds.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "neuron_stats.h"

namespace {

int ns_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return xlk::kNsF32;
    case at::kHalf: return xlk::kNsF16;
    case at::kBFloat16: return xlk::kNsBF16;
    default: TORCH_CHECK(false, op, ": activations must be float32/float16/bfloat16, got ", t);
  }
  return -1;
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 132;
  }
  return n;
}

void check(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef shape, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, "neuron_stats_accum: ", name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, "neuron_stats_accum: ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "neuron_stats_accum: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "neuron_stats_accum: ", name, " must be contiguous");
}

void neuron_stats_accum_cuda(const at::Tensor& act, const at::Tensor& group_ids, const at::Tensor& tokens,
                             const at::Tensor& positive, const at::Tensor& sum, const at::Tensor& sum_sq,
                             const at::Tensor& max) {
  TORCH_CHECK(act.is_cuda() && act.dim() == 2 && act.is_contiguous(),
              "neuron_stats_accum: act must be a contiguous (N, I) CUDA tensor, got ", act.sizes());
  const int dt = ns_dtype(act.scalar_type(), "neuron_stats_accum");
  const int64_t n = act.size(0), nn = act.size(1), groups = tokens.numel();
  const at::Device dev = act.device();
  check(group_ids, "group_ids", at::kLong, {n}, dev);
  check(tokens, "tokens", at::kLong, {groups}, dev);
  check(positive, "positive", at::kLong, {groups, nn}, dev);
  check(sum, "sum", at::kDouble, {groups, nn}, dev);
  check(sum_sq, "sum_sq", at::kDouble, {groups, nn}, dev);
  check(max, "max", at::kFloat, {groups, nn}, dev);
  c10::cuda::CUDAGuard guard(dev);
  cudaError_t err = xlk::neuron_stats_accum(
      dt, act.const_data_ptr(), group_ids.const_data_ptr<int64_t>(), n, nn, groups,
      tokens.mutable_data_ptr<int64_t>(), positive.mutable_data_ptr<int64_t>(), sum.mutable_data_ptr<double>(),
      sum_sq.mutable_data_ptr<double>(), max.mutable_data_ptr<float>(), sm_count(dev.index()),
      c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "neuron_stats_accum: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CUDA, m) { m.impl("neuron_stats_accum", &neuron_stats_accum_cuda); }
