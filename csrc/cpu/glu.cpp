// xlkernels::glu_fwd / glu_fwd_stats / glu_bwd: out = (act(gate) * mul + add) * up with optional fused neuron
// stats of act(gate) (pre-intervention) and a dense intervention mul/add of shape (I,) or (G, I) (per group;
// rows with id -1 are left untouched by a per-group one). act = silu | gelu_tanh, computed in fp32.
// CPU: the stats variant gives each task a disjoint neuron block over all rows (no atomics); the others split rows.
// Inner loops live in glu_kernels.h (baseline + AVX2/FMA copies, dispatched at run time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include "../xlk_checks.h"
#include "nan.h"

TORCH_LIBRARY_FRAGMENT(xlkernels, m) {
  m.def("glu_fwd(Tensor gate, Tensor up, str activation, Tensor? group_ids, Tensor? mul, Tensor? add) -> Tensor");
  m.def(
      "glu_fwd_stats(Tensor gate, Tensor up, str activation, Tensor group_ids, Tensor? mul, Tensor? add, "
      "Tensor(a!) tokens, Tensor(b!) positive, Tensor(c!) sum, Tensor(d!) sum_sq, Tensor(e!) max) -> Tensor");
  m.def(
      "glu_bwd(Tensor grad_out, Tensor gate, Tensor up, str activation, Tensor? group_ids, Tensor? mul, "
      "Tensor? add) -> (Tensor, Tensor)");
}

// Let GCC if-convert the clamps/selects of the inner loops (no FP traps are used) so they vectorize.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace {

constexpr int64_t kBlock = 256;
constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluC = 0.044715f;

struct Args {
  int64_t n = 0, nn = 0;
  const int64_t* ids = nullptr;
  const float* mul = nullptr;
  const float* add = nullptr;
  bool per_group = false;
  int64_t* pos = nullptr;
  double* sum = nullptr;
  double* sq = nullptr;
  float* mx = nullptr;
  // mul/add rows for group g (nullptr: identity)
  const float* mrow(int64_t g) const { return !mul ? nullptr : per_group ? (g >= 0 ? mul + g * nn : nullptr) : mul; }
  const float* arow(int64_t g) const { return !mul ? nullptr : per_group ? (g >= 0 ? add + g * nn : nullptr) : add; }
};

// The inner loops, compiled for the baseline ISA and (x86-64 GCC) for AVX2+FMA+F16C, picked at run time.
namespace base {
#include "glu_kernels.h"
}  // namespace base

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define XLK_GLU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define XLK_GLU_F16C 1
namespace avx2 {
#include "glu_kernels.h"
}  // namespace avx2
#undef XLK_GLU_F16C
#pragma GCC pop_options
#endif

bool use_avx2() {
#ifdef XLK_GLU_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                               __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

template <typename T, int ACT, bool STATS>
void fwd_rows(const T* gate, const T* up, T* out, const Args& a, int64_t r0, int64_t r1, int64_t j0, int64_t w) {
#ifdef XLK_GLU_AVX2
  if (use_avx2()) return avx2::fwd_rows<T, ACT, STATS>(gate, up, out, a, r0, r1, j0, w);
#endif
  base::fwd_rows<T, ACT, STATS>(gate, up, out, a, r0, r1, j0, w);
}

template <typename T, int ACT, bool IV>
void bwd_row(const T* o, const T* x, const T* u, T* dx, T* dy, const float* mm, const float* ad, int64_t w) {
#ifdef XLK_GLU_AVX2
  if (use_avx2()) return avx2::bwd_row<T, ACT, IV>(o, x, u, dx, dy, mm, ad, w);
#endif
  base::bwd_row<T, ACT, IV>(o, x, u, dx, dy, mm, ad, w);
}

template <typename T, int ACT, bool STATS>
void fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out, const Args& a) {
  const T* g = reinterpret_cast<const T*>(gate.const_data_ptr());
  const T* u = reinterpret_cast<const T*>(up.const_data_ptr());
  T* y = reinterpret_cast<T*>(out.mutable_data_ptr());
  const int64_t blocks = (a.nn + kBlock - 1) / kBlock;
  if (STATS) {  // neuron blocks own their stats: no atomics
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        fwd_rows<T, ACT, true>(g, u, y, a, 0, a.n, b * kBlock, std::min(kBlock, a.nn - b * kBlock));
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / a.nn);
    at::parallel_for(0, a.n, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)  // rows in memory order
        for (int64_t b = 0; b < blocks; ++b)
          fwd_rows<T, ACT, false>(g, u, y, a, r, r + 1, b * kBlock, std::min(kBlock, a.nn - b * kBlock));
    });
  }
}

template <typename T, int ACT>
void bwd(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& dgate,
         const at::Tensor& dup, const Args& a) {
  const T* go = reinterpret_cast<const T*>(dout.const_data_ptr());
  const T* gp = reinterpret_cast<const T*>(gate.const_data_ptr());
  const T* up_ = reinterpret_cast<const T*>(up.const_data_ptr());
  T* dg = reinterpret_cast<T*>(dgate.mutable_data_ptr());
  T* du = reinterpret_cast<T*>(dup.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, 32768 / a.nn);
  at::parallel_for(0, a.n, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = a.ids ? a.ids[r] : -1, off = r * a.nn;
      const float* mm = a.mrow(g);
      if (mm) bwd_row<T, ACT, true>(go + off, gp + off, up_ + off, dg + off, du + off, mm, a.arow(g), a.nn);
      else bwd_row<T, ACT, false>(go + off, gp + off, up_ + off, dg + off, du + off, nullptr, nullptr, a.nn);
    }
  });
}

int parse_act(const std::string& s) {
  if (s == "silu") return 0;
  if (s == "gelu_tanh") return 1;
  TORCH_CHECK(false, "glu: activation must be 'silu' or 'gelu_tanh', got '", s, "'");
  return -1;
}

Args make_args(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& group_ids,
               const std::optional<at::Tensor>& mul, const std::optional<at::Tensor>& add, int64_t groups) {
  TORCH_CHECK(gate.dim() == 2, "glu: gate must be (N, I), got ", gate.sizes());
  TORCH_CHECK(gate.device().is_cpu() && gate.is_contiguous(), "glu: gate must be a contiguous CPU tensor");
  const auto st = gate.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "glu: gate must be float32/float16/bfloat16, got ", st);
  xlk::check_same(up, gate, "glu", "up");
  Args a;
  a.n = gate.size(0);
  a.nn = gate.size(1);
  if (group_ids.has_value()) {
    const at::Tensor& ids = *group_ids;
    TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == a.n &&
                    ids.is_contiguous(),
                "glu: group_ids must be a contiguous int64 CPU tensor of shape (", a.n, ",)");
    a.ids = ids.const_data_ptr<int64_t>();
  }
  TORCH_CHECK(mul.has_value() == add.has_value(), "glu: mul and add must be given together");
  if (mul.has_value()) {
    const at::Tensor &m = *mul, &b = *add;
    TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat && m.is_contiguous() &&
                    (m.dim() == 1 || m.dim() == 2) && m.size(-1) == a.nn,
                "glu: mul must be a contiguous float32 CPU tensor of shape (I,) or (G, I) with I = ", a.nn);
    TORCH_CHECK(b.sizes() == m.sizes() && b.scalar_type() == at::kFloat && b.is_contiguous() && b.device().is_cpu(),
                "glu: add must match mul (float32, contiguous, shape ", m.sizes(), ")");
    a.mul = m.const_data_ptr<float>();
    a.add = b.const_data_ptr<float>();
    a.per_group = m.dim() == 2;
    if (a.per_group) {
      TORCH_CHECK(a.ids, "glu: group_ids is required for a per-group (G, I) intervention");
      groups = groups < 0 ? m.size(0) : groups;
      TORCH_CHECK(m.size(0) == groups, "glu: mul has ", m.size(0), " groups, stats have ", groups);
    }
  }
  if (a.ids && groups >= 0) {
    for (int64_t r = 0; r < a.n; ++r)
      TORCH_CHECK(a.ids[r] >= -1 && a.ids[r] < groups, "glu: group_ids holds ", a.ids[r], ", outside [-1, ", groups,
                  ")");
  }
  return a;
}

template <bool STATS>
void dispatch_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out, int act, const Args& a) {
  if (a.n == 0 || a.nn == 0) return;
  const auto st = gate.scalar_type();
#define XLK_GLU_FWD(T)                                 \
  if (act == 0) fwd<T, 0, STATS>(gate, up, out, a);    \
  else fwd<T, 1, STATS>(gate, up, out, a);
  if (st == at::kFloat) {
    XLK_GLU_FWD(float)
  } else if (st == at::kHalf) {
    XLK_GLU_FWD(c10::Half)
  } else {
    XLK_GLU_FWD(c10::BFloat16)
  }
#undef XLK_GLU_FWD
}

at::Tensor glu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                       const std::optional<at::Tensor>& group_ids, const std::optional<at::Tensor>& mul,
                       const std::optional<at::Tensor>& add) {
  const int act = parse_act(std::string(activation));
  Args a = make_args(gate, up, group_ids, mul, add, -1);
  at::Tensor out = at::empty_like(gate);
  dispatch_fwd<false>(gate, up, out, act, a);
  return out;
}

at::Tensor glu_fwd_stats_cpu(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation,
                             const at::Tensor& group_ids, const std::optional<at::Tensor>& mul,
                             const std::optional<at::Tensor>& add, const at::Tensor& tokens,
                             const at::Tensor& positive, const at::Tensor& sum, const at::Tensor& sum_sq,
                             const at::Tensor& max) {
  const int act = parse_act(std::string(activation));
  const int64_t groups = tokens.numel();
  Args a = make_args(gate, up, group_ids, mul, add, groups);
  xlk::check_tensor(tokens, "glu", "tokens", at::kLong, {groups});
  xlk::check_tensor(positive, "glu", "positive", at::kLong, {groups, a.nn});
  xlk::check_tensor(sum, "glu", "sum", at::kDouble, {groups, a.nn});
  xlk::check_tensor(sum_sq, "glu", "sum_sq", at::kDouble, {groups, a.nn});
  xlk::check_tensor(max, "glu", "max", at::kFloat, {groups, a.nn});
  int64_t* tok = tokens.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < a.n; ++r)
    if (a.ids[r] >= 0) tok[a.ids[r]] += 1;
  a.pos = positive.mutable_data_ptr<int64_t>();
  a.sum = sum.mutable_data_ptr<double>();
  a.sq = sum_sq.mutable_data_ptr<double>();
  a.mx = max.mutable_data_ptr<float>();
  at::Tensor out = at::empty_like(gate);
  dispatch_fwd<true>(gate, up, out, act, a);
  return out;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                               const at::Tensor& up, c10::string_view activation,
                                               const std::optional<at::Tensor>& group_ids,
                                               const std::optional<at::Tensor>& mul,
                                               const std::optional<at::Tensor>& add) {
  const int act = parse_act(std::string(activation));
  Args a = make_args(gate, up, group_ids, mul, add, -1);
  xlk::check_same(grad_out, gate, "glu", "grad_out");
  at::Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  if (a.n == 0 || a.nn == 0) return {dgate, dup};
  const auto st = gate.scalar_type();
#define XLK_GLU_BWD(T)                                      \
  if (act == 0) bwd<T, 0>(grad_out, gate, up, dgate, dup, a); \
  else bwd<T, 1>(grad_out, gate, up, dgate, dup, a);
  if (st == at::kFloat) {
    XLK_GLU_BWD(float)
  } else if (st == at::kHalf) {
    XLK_GLU_BWD(c10::Half)
  } else {
    XLK_GLU_BWD(c10::BFloat16)
  }
#undef XLK_GLU_BWD
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CPU, m) {
  m.impl("glu_fwd", &glu_fwd_cpu);
  m.impl("glu_fwd_stats", &glu_fwd_stats_cpu);
  m.impl("glu_bwd", &glu_bwd_cpu);
}
