// Argument checks and preparation shared by the CPU and CUDA implementations of xlkernels::head_steer.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace xlk {

struct SteerArgs {
  int64_t B, T, H, D;
  int64_t sb, st, sh;        // strides of o (elements); o.stride(3) == 1
  at::Tensor gate, shift;    // fp32 contiguous (H)|(B,H) and (H,D)|(B,H,D), or undefined
                             // (shift also when only its shape was wanted: shift_values=false)
  int64_t gate_bs, shift_bs; // batch strides of gate / shift (0 when unbatched)
};

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}
// gate / shift may also be float64 (read as float32).
inline bool is_param_type(at::ScalarType t) { return is_float_type(t) || t == at::kDouble; }

inline SteerArgs steer_args(const at::Tensor& o, const std::optional<at::Tensor>& gate,
                            const std::optional<at::Tensor>& shift, bool shift_values = true) {
  TORCH_CHECK(o.dim() == 4, "head_steer: o must be (B, T, H, D), got ", o.sizes());
  TORCH_CHECK(is_float_type(o.scalar_type()), "head_steer: o must be float32/float16/bfloat16, got ",
              o.scalar_type());
  TORCH_CHECK(o.size(3) <= 1 || o.stride(3) == 1, "head_steer: o must have a contiguous last dim");
  SteerArgs a;
  a.B = o.size(0); a.T = o.size(1); a.H = o.size(2); a.D = o.size(3);
  a.sb = o.stride(0); a.st = o.stride(1); a.sh = o.stride(2);
  a.gate_bs = 0; a.shift_bs = 0;
  if (gate.has_value() && gate->defined()) {
    const at::Tensor& g = *gate;
    TORCH_CHECK(g.device() == o.device(), "head_steer: gate is on ", g.device(), " but o is on ", o.device());
    TORCH_CHECK(is_param_type(g.scalar_type()), "head_steer: gate must be a float tensor, got ", g.scalar_type());
    bool ok = (g.dim() == 1 && g.size(0) == a.H) || (g.dim() == 2 && g.size(0) == a.B && g.size(1) == a.H);
    TORCH_CHECK(ok, "head_steer: gate must be (H,) or (B, H) = (", a.B, ", ", a.H, "), got ", g.sizes());
    a.gate = g.to(at::kFloat).contiguous();
    a.gate_bs = g.dim() == 2 ? a.H : 0;
  }
  if (shift.has_value() && shift->defined()) {
    const at::Tensor& s = *shift;
    TORCH_CHECK(s.device() == o.device(), "head_steer: shift is on ", s.device(), " but o is on ", o.device());
    TORCH_CHECK(is_param_type(s.scalar_type()), "head_steer: shift must be a float tensor, got ", s.scalar_type());
    bool ok = (s.dim() == 2 && s.size(0) == a.H && s.size(1) == a.D) ||
              (s.dim() == 3 && s.size(0) == a.B && s.size(1) == a.H && s.size(2) == a.D);
    TORCH_CHECK(ok, "head_steer: shift must be (H, D) or (B, H, D) = (", a.B, ", ", a.H, ", ", a.D, "), got ",
                s.sizes());
    if (shift_values) a.shift = s.to(at::kFloat).contiguous();
    a.shift_bs = s.dim() == 3 ? a.H * a.D : 0;
  }
  return a;
}

// grad of a (possibly unbatched) parameter from its batched fp32 version: sum over B when the
// parameter had no batch dim, then cast to the parameter's dtype.
inline at::Tensor reduce_like(const at::Tensor& batched, const at::Tensor& param) {
  at::Tensor r = batched.dim() > param.dim() ? batched.sum(0) : batched;
  return r.to(param.scalar_type());
}

}  // namespace xlk
