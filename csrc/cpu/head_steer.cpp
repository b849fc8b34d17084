// xlkernels::head_steer: out[b,t,h,:] = gate[b,h] * o[b,t,h,:] + shift[b,h,:] (fp32 math), the per-head
// epilogue of attention. Where gate == 0 the output is exactly shift (a select, so NaN/inf in o there is
// ignored). Schemas live here; the CPU loops are in head_steer_kernels.h (built plain and with AVX2, picked at
// run time); CUDA is in csrc/cuda/head_steer*.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "head_steer_args.h"

TORCH_LIBRARY_FRAGMENT(xlkernels, m) {
  m.def("head_steer(Tensor o, Tensor? gate, Tensor? shift) -> Tensor");
  // Returns (grad_o, grad_gate, grad_shift); a gradient not asked for is an empty tensor.
  m.def(
      "head_steer_backward(Tensor grad_out, Tensor o, Tensor? gate, Tensor? shift, bool need_o, "
      "bool need_gate, bool need_shift) -> (Tensor, Tensor, Tensor)");
}

#define XLK_DISPATCH_STEER(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                     \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace xlk_hs_base {
#include "head_steer_kernels.h"
}  // namespace xlk_hs_base

#if defined(__GNUC__) && defined(__x86_64__)
#define XLK_HS_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace xlk_hs_avx2 {
#include "head_steer_kernels.h"
}  // namespace xlk_hs_avx2
#pragma GCC pop_options
#endif

namespace {

bool use_avx2() {
#ifdef XLK_HS_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

template <typename scalar_t>
void fwd_rows(const scalar_t* o, scalar_t* out, const float* gate, const float* shift, const xlk::SteerArgs& a) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.D, 1));
#ifdef XLK_HS_AVX2
  if (use_avx2()) return xlk_hs_avx2::fwd_rows<scalar_t>(o, out, gate, shift, a, grain);
#endif
  xlk_hs_base::fwd_rows<scalar_t>(o, out, gate, shift, a, grain);
}

template <typename scalar_t>
void bwd_tasks(const scalar_t* dout, const scalar_t* o, const float* gate, scalar_t* grad_o, float* part_gate,
               float* part_shift, int64_t chunks, int64_t chunk_len, const xlk::SteerArgs& a) {
#ifdef XLK_HS_AVX2
  if (use_avx2())
    return xlk_hs_avx2::bwd_tasks<scalar_t>(dout, o, gate, grad_o, part_gate, part_shift, chunks, chunk_len, a);
#endif
  xlk_hs_base::bwd_tasks<scalar_t>(dout, o, gate, grad_o, part_gate, part_shift, chunks, chunk_len, a);
}

at::Tensor head_steer_cpu(const at::Tensor& o_in, const std::optional<at::Tensor>& gate,
                          const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(o_in.dim() == 4, "head_steer: o must be (B, T, H, D), got ", o_in.sizes());
  at::Tensor o = o_in.size(3) > 1 && o_in.stride(3) != 1 ? o_in.contiguous() : o_in;
  xlk::SteerArgs a = xlk::steer_args(o, gate, shift);
  at::Tensor out = at::empty({a.B, a.T, a.H, a.D}, o.options());
  if (out.numel() == 0) return out;
  const float* gp = a.gate.defined() ? a.gate.data_ptr<float>() : nullptr;
  const float* sp = a.shift.defined() ? a.shift.data_ptr<float>() : nullptr;
  XLK_DISPATCH_STEER(o.scalar_type(), "head_steer_cpu", [&] {
    fwd_rows<scalar_t>(o.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), gp, sp, a);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_steer_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& o_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, bool need_o, bool need_gate, bool need_shift) {
  TORCH_CHECK(o_in.dim() == 4, "head_steer_backward: o must be (B, T, H, D), got ", o_in.sizes());
  at::Tensor o = o_in.size(3) > 1 && o_in.stride(3) != 1 ? o_in.contiguous() : o_in;
  xlk::SteerArgs a = xlk::steer_args(o, gate, shift, /*shift_values=*/false);
  TORCH_CHECK(grad_in.sizes() == o.sizes() && grad_in.scalar_type() == o.scalar_type(),
              "head_steer_backward: grad_out must match o in shape and dtype, got ", grad_in.sizes(), " ",
              grad_in.scalar_type());
  need_gate = need_gate && a.gate.defined();
  need_shift = need_shift && shift.has_value() && shift->defined();
  at::Tensor dout = grad_in.contiguous();
  at::Tensor grad_o = need_o ? at::empty({a.B, a.T, a.H, a.D}, o.options()) : at::empty({0}, o.options());
  at::Tensor grad_gate = at::empty({0}, o.options().dtype(at::kFloat));
  at::Tensor grad_shift = at::empty({0}, o.options().dtype(at::kFloat));
  if (!need_o && !need_gate && !need_shift) return {grad_o, grad_gate, grad_shift};

  // Split T so that there are a few tasks per thread even when B is small (but not tiny tasks).
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + a.B - 1) / std::max<int64_t>(a.B, 1));
  const int64_t min_len = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.H * a.D, 1));
  const int64_t chunk_len = std::max<int64_t>(min_len, (a.T + want - 1) / want);
  const int64_t chunks = std::max<int64_t>(1, (a.T + chunk_len - 1) / chunk_len);
  auto f32 = o.options().dtype(at::kFloat);
  at::Tensor part_gate = need_gate ? at::empty({a.B, chunks, a.H}, f32) : at::empty({0}, f32);
  at::Tensor part_shift = need_shift ? at::empty({a.B, chunks, a.H, a.D}, f32) : at::empty({0}, f32);
  if (a.B * a.H > 0 && a.T > 0 && a.D > 0) {
    const float* gp = a.gate.defined() ? a.gate.data_ptr<float>() : nullptr;
    XLK_DISPATCH_STEER(o.scalar_type(), "head_steer_backward_cpu", [&] {
      bwd_tasks<scalar_t>(dout.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), gp,
                          need_o ? grad_o.mutable_data_ptr<scalar_t>() : nullptr,
                          need_gate ? part_gate.mutable_data_ptr<float>() : nullptr,
                          need_shift ? part_shift.mutable_data_ptr<float>() : nullptr, chunks, chunk_len, a);
    });
  } else {  // nothing to sum (T == 0 or D == 0)
    part_gate.zero_();
    part_shift.zero_();
  }
  // Sum the tasks' chunks (a plain view when there is one chunk per batch entry).
  if (need_gate) grad_gate = xlk::reduce_like(chunks == 1 ? part_gate.select(1, 0) : part_gate.sum(1), *gate);
  if (need_shift) grad_shift = xlk::reduce_like(chunks == 1 ? part_shift.select(1, 0) : part_shift.sum(1), *shift);
  return {grad_o, grad_gate, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CPU, m) {
  m.impl("head_steer", &head_steer_cpu);
  m.impl("head_steer_backward", &head_steer_backward_cpu);
}
