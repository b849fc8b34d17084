// CUDA implementations of xlkernels::glu_fwd / glu_fwd_stats / glu_bwd (schemas in csrc/cpu/glu.cpp): check the
// tensors and call the torch-free launchers of csrc/cuda/glu.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "binding_utils.h"
#include "glu.h"
#include "neuron_stats.h"

namespace {

using xlk::sm_count;
static_assert(xlk::kNsF32 == 0 && xlk::kNsF16 == 1 && xlk::kNsBF16 == 2, "dtype codes");

int dtype_of(at::ScalarType t) { return xlk::float_dtype_code(t, "glu: gate"); }

int act_of(c10::string_view s) {
  const std::string a(s);
  if (a == "silu") return xlk::kGluSilu;
  if (a == "gelu_tanh") return xlk::kGluGeluTanh;
  TORCH_CHECK(false, "glu: activation must be 'silu' or 'gelu_tanh', got '", a, "'");
  return -1;
}

// Fills n, nn, ids, mode, mul, add, groups (groups: from the stats when >= 0, else from mul (G, I)).
xlk::GluArgs make_args(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& group_ids,
                       const std::optional<at::Tensor>& mul, const std::optional<at::Tensor>& add, int64_t groups) {
  TORCH_CHECK(gate.is_cuda() && gate.dim() == 2 && gate.is_contiguous(),
              "glu: gate must be a contiguous (N, I) CUDA tensor, got ", gate.sizes());
  xlk::check_same(up, gate, "glu", "up", gate.device());
  xlk::GluArgs a;
  a.n = gate.size(0);
  a.nn = gate.size(1);
  if (group_ids.has_value()) {
    const at::Tensor& ids = *group_ids;
    TORCH_CHECK(ids.device() == gate.device() && ids.scalar_type() == at::kLong && ids.dim() == 1 &&
                    ids.size(0) == a.n && ids.is_contiguous(),
                "glu: group_ids must be a contiguous int64 tensor of shape (", a.n, ",) on ", gate.device());
    a.ids = ids.const_data_ptr<int64_t>();
  }
  TORCH_CHECK(mul.has_value() == add.has_value(), "glu: mul and add must be given together");
  if (mul.has_value()) {
    const at::Tensor &m = *mul, &b = *add;
    TORCH_CHECK(m.device() == gate.device() && m.scalar_type() == at::kFloat && m.is_contiguous() &&
                    (m.dim() == 1 || m.dim() == 2) && m.size(-1) == a.nn,
                "glu: mul must be a contiguous float32 tensor of shape (I,) or (G, I) with I = ", a.nn, " on ",
                gate.device());
    TORCH_CHECK(b.sizes() == m.sizes() && b.scalar_type() == at::kFloat && b.is_contiguous() &&
                    b.device() == gate.device(),
                "glu: add must match mul (float32, contiguous, shape ", m.sizes(), ")");
    a.mul = m.const_data_ptr<float>();
    a.add = b.const_data_ptr<float>();
    a.mode = m.dim() == 1 ? xlk::kGluPerNeuron : xlk::kGluPerGroup;
    if (m.dim() == 2) {
      TORCH_CHECK(a.ids, "glu: group_ids is required for a per-group (G, I) intervention");
      TORCH_CHECK(groups < 0 || m.size(0) == groups, "glu: mul has ", m.size(0), " groups, stats have ", groups);
      groups = m.size(0);
    }
  }
  a.groups = groups < 0 ? 0 : groups;  // 0: every id acts as -1 (only used by stats / per-group intervention)
  return a;
}

at::Tensor glu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                        const std::optional<at::Tensor>& group_ids, const std::optional<at::Tensor>& mul,
                        const std::optional<at::Tensor>& add) {
  const int act = act_of(activation);
  xlk::GluArgs a = make_args(gate, up, group_ids, mul, add, -1);
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor out = at::empty_like(gate);
  cudaError_t err = xlk::glu_forward(dtype_of(gate.scalar_type()), act, gate.const_data_ptr(), up.const_data_ptr(),
                                     out.mutable_data_ptr(), a, sm_count(gate.device().index()),
                                     c10::cuda::getCurrentCUDAStream(gate.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "glu_fwd: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor glu_fwd_stats_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                              const at::Tensor& group_ids, const std::optional<at::Tensor>& mul,
                              const std::optional<at::Tensor>& add, const at::Tensor& tokens,
                              const at::Tensor& positive, const at::Tensor& sum, const at::Tensor& sum_sq,
                              const at::Tensor& max) {
  const int act = act_of(activation);
  const int64_t groups = tokens.numel();
  xlk::GluArgs a = make_args(gate, up, group_ids, mul, add, groups);
  const at::Device dev = gate.device();
  xlk::check_tensor(tokens, "glu", "tokens", at::kLong, {groups}, dev);
  xlk::check_tensor(positive, "glu", "positive", at::kLong, {groups, a.nn}, dev);
  xlk::check_tensor(sum, "glu", "sum", at::kDouble, {groups, a.nn}, dev);
  xlk::check_tensor(sum_sq, "glu", "sum_sq", at::kDouble, {groups, a.nn}, dev);
  xlk::check_tensor(max, "glu", "max", at::kFloat, {groups, a.nn}, dev);
  a.groups = groups;
  a.tokens = tokens.mutable_data_ptr<int64_t>();
  a.positive = positive.mutable_data_ptr<int64_t>();
  a.sum = sum.mutable_data_ptr<double>();
  a.sum_sq = sum_sq.mutable_data_ptr<double>();
  a.max = max.mutable_data_ptr<float>();
  c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty_like(gate);
  cudaError_t err = xlk::glu_forward(dtype_of(gate.scalar_type()), act, gate.const_data_ptr(), up.const_data_ptr(),
                                     out.mutable_data_ptr(), a, sm_count(dev.index()),
                                     c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "glu_fwd_stats: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& gate,
                                                const at::Tensor& up, c10::string_view activation,
                                                const std::optional<at::Tensor>& group_ids,
                                                const std::optional<at::Tensor>& mul,
                                                const std::optional<at::Tensor>& add) {
  const int act = act_of(activation);
  xlk::GluArgs a = make_args(gate, up, group_ids, mul, add, -1);
  xlk::check_same(grad_out, gate, "glu", "grad_out", gate.device());
  c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  cudaError_t err = xlk::glu_backward(dtype_of(gate.scalar_type()), act, grad_out.const_data_ptr(),
                                      gate.const_data_ptr(), up.const_data_ptr(), dgate.mutable_data_ptr(),
                                      dup.mutable_data_ptr(), a, sm_count(gate.device().index()),
                                      c10::cuda::getCurrentCUDAStream(gate.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "glu_bwd: CUDA launch failed: ", cudaGetErrorString(err));
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CUDA, m) {
  m.impl("glu_fwd", &glu_fwd_cuda);
  m.impl("glu_fwd_stats", &glu_fwd_stats_cuda);
  m.impl("glu_bwd", &glu_bwd_cuda);
}
