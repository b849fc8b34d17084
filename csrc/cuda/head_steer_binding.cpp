// CUDA implementations of xlkernels::head_steer / head_steer_backward (schemas in csrc/cpu/head_steer.cpp).
// Checks the tensors and calls the torch-free launchers of csrc/cuda/head_steer.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../cpu/head_steer_args.h"
#include "binding_utils.h"
#include "head_steer.h"

namespace {

static_assert(xlk::kSteerF32 == 0 && xlk::kSteerF16 == 1 && xlk::kSteerBF16 == 2, "dtype codes");

int steer_dtype(at::ScalarType t) { return xlk::float_dtype_code(t, "head_steer: o"); }

xlk::SteerShape shape_of(const xlk::SteerArgs& a) {
  return xlk::SteerShape{a.B, a.T, a.H, a.D, a.sb, a.st, a.sh, a.gate_bs, a.shift_bs};
}

at::Tensor head_steer_cuda(const at::Tensor& o_in, const std::optional<at::Tensor>& gate,
                           const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(o_in.is_cuda(), "head_steer: o must be a CUDA tensor");
  TORCH_CHECK(o_in.dim() == 4, "head_steer: o must be (B, T, H, D), got ", o_in.sizes());
  at::Tensor o = o_in.size(3) > 1 && o_in.stride(3) != 1 ? o_in.contiguous() : o_in;
  c10::cuda::CUDAGuard guard(o.device());
  xlk::SteerArgs a = xlk::steer_args(o, gate, shift);
  at::Tensor out = at::empty({a.B, a.T, a.H, a.D}, o.options());
  if (out.numel() == 0) return out;
  cudaError_t err = xlk::head_steer_forward(
      steer_dtype(o.scalar_type()), o.const_data_ptr(), out.mutable_data_ptr(),
      a.gate.defined() ? a.gate.const_data_ptr<float>() : nullptr,
      a.shift.defined() ? a.shift.const_data_ptr<float>() : nullptr, shape_of(a),
      c10::cuda::getCurrentCUDAStream(o.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "head_steer: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_steer_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& o_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, bool need_o, bool need_gate, bool need_shift) {
  TORCH_CHECK(o_in.is_cuda() && grad_in.is_cuda(), "head_steer_backward: o and grad_out must be CUDA tensors");
  TORCH_CHECK(o_in.dim() == 4, "head_steer_backward: o must be (B, T, H, D), got ", o_in.sizes());
  at::Tensor o = o_in.size(3) > 1 && o_in.stride(3) != 1 ? o_in.contiguous() : o_in;
  c10::cuda::CUDAGuard guard(o.device());
  xlk::SteerArgs a = xlk::steer_args(o, gate, shift, /*shift_values=*/false);
  TORCH_CHECK(grad_in.sizes() == o.sizes() && grad_in.scalar_type() == o.scalar_type() &&
                  grad_in.device() == o.device(),
              "head_steer_backward: grad_out must match o in shape, dtype and device, got ", grad_in.sizes(), " ",
              grad_in.scalar_type(), " ", grad_in.device());
  need_gate = need_gate && a.gate.defined();
  need_shift = need_shift && shift.has_value() && shift->defined();
  at::Tensor dout = grad_in.contiguous();
  auto f32 = o.options().dtype(at::kFloat);
  at::Tensor grad_o = need_o ? at::empty({a.B, a.T, a.H, a.D}, o.options()) : at::empty({0}, o.options());
  // fp32 accumulators: batched (B,H)/(B,H,D), or (H,)/(H,D) with batch stride 0 when the parameter is not.
  const bool gate_b = need_gate && gate->dim() == 2, shift_b = need_shift && shift->dim() == 3;
  at::Tensor acc_gate = need_gate ? (gate_b ? at::zeros({a.B, a.H}, f32) : at::zeros({a.H}, f32)) : at::empty({0}, f32);
  at::Tensor acc_shift = need_shift ? (shift_b ? at::zeros({a.B, a.H, a.D}, f32) : at::zeros({a.H, a.D}, f32))
                                    : at::empty({0}, f32);
  if (need_o || need_gate || need_shift) {
    cudaError_t err = xlk::head_steer_backward(
        steer_dtype(o.scalar_type()), dout.const_data_ptr(), o.const_data_ptr(),
        a.gate.defined() ? a.gate.const_data_ptr<float>() : nullptr, need_o ? grad_o.mutable_data_ptr() : nullptr,
        need_gate ? acc_gate.mutable_data_ptr<float>() : nullptr, gate_b ? a.H : 0,
        need_shift ? acc_shift.mutable_data_ptr<float>() : nullptr, shift_b ? a.H * a.D : 0, shape_of(a),
        xlk::sm_count(o.device().index()), c10::cuda::getCurrentCUDAStream(o.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "head_steer_backward: CUDA launch failed: ", cudaGetErrorString(err));
  }
  at::Tensor grad_gate = need_gate ? acc_gate.to(gate->scalar_type()) : acc_gate;
  at::Tensor grad_shift = need_shift ? acc_shift.to(shift->scalar_type()) : acc_shift;
  return {grad_o, grad_gate, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CUDA, m) {
  m.impl("head_steer", &head_steer_cuda);
  m.impl("head_steer_backward", &head_steer_backward_cuda);
}
