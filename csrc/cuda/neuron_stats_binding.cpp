// CUDA implementation of xlkernels::neuron_stats_accum (schema in csrc/cpu/neuron_stats.cpp): checks the tensors
// and calls the torch-free launcher of csrc/cuda/neuron_stats.cu. Ids are range-checked in Python (one sync);
// the kernel skips ids outside [-1, G) rather than writing out of bounds.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "neuron_stats.h"

namespace {

using xlk::sm_count;
static_assert(xlk::kNsF32 == 0 && xlk::kNsF16 == 1 && xlk::kNsBF16 == 2, "dtype codes");

void neuron_stats_accum_cuda(const at::Tensor& act, const at::Tensor& group_ids, const at::Tensor& tokens,
                             const at::Tensor& positive, const at::Tensor& sum, const at::Tensor& sum_sq,
                             const at::Tensor& max) {
  TORCH_CHECK(act.is_cuda() && act.dim() == 2 && act.is_contiguous(),
              "neuron_stats_accum: act must be a contiguous (N, I) CUDA tensor, got ", act.sizes());
  const int dt = xlk::float_dtype_code(act.scalar_type(), "neuron_stats_accum: activations");
  const int64_t n = act.size(0), nn = act.size(1), groups = tokens.numel();
  const at::Device dev = act.device();
  xlk::check_tensor(group_ids, "neuron_stats_accum", "group_ids", at::kLong, {n}, dev);
  xlk::check_tensor(tokens, "neuron_stats_accum", "tokens", at::kLong, {groups}, dev);
  xlk::check_tensor(positive, "neuron_stats_accum", "positive", at::kLong, {groups, nn}, dev);
  xlk::check_tensor(sum, "neuron_stats_accum", "sum", at::kDouble, {groups, nn}, dev);
  xlk::check_tensor(sum_sq, "neuron_stats_accum", "sum_sq", at::kDouble, {groups, nn}, dev);
  xlk::check_tensor(max, "neuron_stats_accum", "max", at::kFloat, {groups, nn}, dev);
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
