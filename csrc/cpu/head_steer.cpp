// xlkernels::head_steer: out[b,t,h,:] = gate[b,h] * o[b,t,h,:] + shift[b,h,:] (fp32 math), the per-head
// epilogue of attention. Where gate == 0 the output is exactly shift (a select, so NaN/inf in o there is
// ignored). Schemas live here; the CPU kernels follow; CUDA is in csrc/cuda/head_steer*.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

namespace {

// Element loads/stores as float; the bf16 ones are plain bit operations so that the loops vectorise.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float ld(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void st(c10::BFloat16* p, int64_t i, float v) {  // round to nearest even, NaN -> 0x7fc0 (as c10)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = v != v ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u >> 16);
}

template <typename scalar_t>
void fwd_rows(const scalar_t* o, scalar_t* out, const float* gate, const float* shift, const xlk::SteerArgs& a) {
  const int64_t rows = a.B * a.T * a.H, D = a.D;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r % a.H, bt = r / a.H, t = bt % a.T, b = bt / a.T;
      const scalar_t* __restrict__ x = o + b * a.sb + t * a.st + h * a.sh;
      scalar_t* __restrict__ y = out + r * D;
      const float g = gate ? gate[b * a.gate_bs + h] : 1.f;
      const float* __restrict__ s = shift ? shift + b * a.shift_bs + h * D : nullptr;
      if (g == 0.f) {
        if (s) {
          for (int64_t d = 0; d < D; ++d) st(y, d, s[d]);
        } else {
          for (int64_t d = 0; d < D; ++d) st(y, d, 0.f);
        }
      } else if (s) {
        for (int64_t d = 0; d < D; ++d) st(y, d, g * ld(x, d) + s[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) st(y, d, g * ld(x, d));
      }
    }
  });
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

// One task = one (b, h) and a chunk of t. Writes grad_o rows and fp32 partial sums (per chunk) of
// dO*o over (t, d) [gate] and of dO over t [shift]; the chunks are summed afterwards.
template <typename scalar_t>
void bwd_tasks(const scalar_t* dout, const scalar_t* o, const float* gate, scalar_t* grad_o, float* part_gate,
               float* part_shift, int64_t chunks, int64_t chunk_len, const xlk::SteerArgs& a) {
  const int64_t D = a.D, tasks = a.B * a.H * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> accg(D), accs(D);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = k % chunks, bh = k / chunks, h = bh % a.H, b = bh / a.H;
      const int64_t t0 = c * chunk_len, t1 = std::min(a.T, t0 + chunk_len);
      const float g = gate ? gate[b * a.gate_bs + h] : 1.f;
      std::fill(accg.begin(), accg.end(), 0.f);
      std::fill(accs.begin(), accs.end(), 0.f);
      float* __restrict__ ag = accg.data();
      float* __restrict__ as = accs.data();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = (b * a.T + t) * a.H + h;
        const scalar_t* __restrict__ dy = dout + r * D;
        if (grad_o) {
          scalar_t* __restrict__ dx = grad_o + r * D;
          for (int64_t d = 0; d < D; ++d) st(dx, d, g == 0.f ? 0.f : g * ld(dy, d));
        }
        if (part_shift) {
          for (int64_t d = 0; d < D; ++d) as[d] += ld(dy, d);
        }
        if (part_gate) {
          const scalar_t* __restrict__ x = o + b * a.sb + t * a.st + h * a.sh;
          if (g == 0.f) {  // o may be garbage at skipped heads: non-finite values count as 0
            for (int64_t d = 0; d < D; ++d) {
              const float xv = ld(x, d);
              ag[d] += std::isfinite(xv) ? ld(dy, d) * xv : 0.f;
            }
          } else {
            for (int64_t d = 0; d < D; ++d) ag[d] += ld(dy, d) * ld(x, d);
          }
        }
      }
      if (part_gate) {
        float sum = 0.f;
        for (int64_t d = 0; d < D; ++d) sum += ag[d];
        part_gate[k] = sum;
      }
      if (part_shift) std::copy(as, as + D, part_shift + k * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_steer_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& o_in, const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& shift, bool need_o, bool need_gate, bool need_shift) {
  TORCH_CHECK(o_in.dim() == 4, "head_steer_backward: o must be (B, T, H, D), got ", o_in.sizes());
  at::Tensor o = o_in.size(3) > 1 && o_in.stride(3) != 1 ? o_in.contiguous() : o_in;
  xlk::SteerArgs a = xlk::steer_args(o, gate, shift);
  TORCH_CHECK(grad_in.sizes() == o.sizes() && grad_in.scalar_type() == o.scalar_type(),
              "head_steer_backward: grad_out must match o in shape and dtype, got ", grad_in.sizes(), " ",
              grad_in.scalar_type());
  need_gate = need_gate && a.gate.defined();
  need_shift = need_shift && a.shift.defined();
  at::Tensor dout = grad_in.contiguous();
  at::Tensor grad_o = need_o ? at::empty({a.B, a.T, a.H, a.D}, o.options()) : at::empty({0}, o.options());
  at::Tensor grad_gate = at::empty({0}, o.options().dtype(at::kFloat));
  at::Tensor grad_shift = at::empty({0}, o.options().dtype(at::kFloat));
  if (!need_o && !need_gate && !need_shift) return {grad_o, grad_gate, grad_shift};

  // Split T so that there are a few tasks per thread even when B*H is small.
  const int64_t bh = a.B * a.H;
  const int64_t want = std::max<int64_t>(1, (4 * at::get_num_threads() + bh - 1) / std::max<int64_t>(bh, 1));
  const int64_t chunk_len = std::max<int64_t>(1, (a.T + want - 1) / want);
  const int64_t chunks = std::max<int64_t>(1, (a.T + chunk_len - 1) / chunk_len);
  at::Tensor part_gate = at::zeros({a.B, a.H, chunks}, o.options().dtype(at::kFloat));
  at::Tensor part_shift = at::zeros({a.B, a.H, chunks, a.D}, o.options().dtype(at::kFloat));
  if (bh > 0 && a.T > 0 && a.D > 0) {
    const float* gp = a.gate.defined() ? a.gate.data_ptr<float>() : nullptr;
    XLK_DISPATCH_STEER(o.scalar_type(), "head_steer_backward_cpu", [&] {
      bwd_tasks<scalar_t>(dout.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(), gp,
                          need_o ? grad_o.mutable_data_ptr<scalar_t>() : nullptr,
                          need_gate ? part_gate.mutable_data_ptr<float>() : nullptr,
                          need_shift ? part_shift.mutable_data_ptr<float>() : nullptr, chunks, chunk_len, a);
    });
  }
  if (need_gate) grad_gate = xlk::reduce_like(part_gate.sum(2), *gate);
  if (need_shift) grad_shift = xlk::reduce_like(part_shift.sum(2), *shift);
  return {grad_o, grad_gate, grad_shift};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CPU, m) {
  m.impl("head_steer", &head_steer_cpu);
  m.impl("head_steer_backward", &head_steer_backward_cpu);
}
