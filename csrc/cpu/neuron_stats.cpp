// xlkernels::neuron_stats_accum: per-group FFN neuron statistics accumulated in place in one pass.
//   act (N, I) float/half/bf16 contiguous, group_ids (N,) int64 (-1 = skip), tokens (G,) int64,
//   positive (G, I) int64, sum/sum_sq (G, I) float64, max (G, I) float32.
// Each activation is widened to double before summing. NaN: not positive, propagates into sum/sum_sq/max.
// CPU: tasks own disjoint neuron blocks and walk every row, so no atomics; the (group, block) accumulators of
// a run of equal ids stay in L1 and the inner loops over the block vectorize.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../xlk_checks.h"
#include "nan.h"

TORCH_LIBRARY_FRAGMENT(xlkernels, m) {
  m.def(
      "neuron_stats_accum(Tensor act, Tensor group_ids, Tensor(a!) tokens, Tensor(b!) positive, "
      "Tensor(c!) sum, Tensor(d!) sum_sq, Tensor(e!) max) -> ()");
}

// Let GCC if-convert the clamps/selects of the inner loops (no FP traps are used) so they vectorize.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace {

constexpr int64_t kBlock = 256;  // neurons per task: 1 KiB of fp32 per row

template <typename T>
void accum_block(const T* __restrict__ act, const int64_t* __restrict__ ids, int64_t n, int64_t nn, int64_t j0,
                 int64_t w, int64_t* __restrict__ pos, double* __restrict__ sum, double* __restrict__ sq,
                 float* __restrict__ mx) {
  float v[kBlock];
  for (int64_t r = 0; r < n; ++r) {
    const int64_t g = ids[r];
    if (g < 0) continue;
    const T* __restrict__ x = act + r * nn + j0;
    const int64_t o = g * nn + j0;
    int64_t* __restrict__ p = pos + o;
    double* __restrict__ s = sum + o;
    double* __restrict__ q = sq + o;
    float* __restrict__ m = mx + o;
    for (int64_t j = 0; j < w; ++j) v[j] = static_cast<float>(x[j]);
    for (int64_t j = 0; j < w; ++j) p[j] += v[j] > 0.f ? 1 : 0;
    for (int64_t j = 0; j < w; ++j) {
      const double d = v[j];
      s[j] += d;
      q[j] += d * d;
    }
    for (int64_t j = 0; j < w; ++j) m[j] = xlk::max_keep_nan(m[j], v[j]);
  }
}

template <typename T>
void accum(const at::Tensor& act, const int64_t* ids, int64_t n, int64_t nn, int64_t* pos, double* sum, double* sq,
           float* mx) {
  const T* a = reinterpret_cast<const T*>(act.const_data_ptr());
  const int64_t blocks = (nn + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kBlock;
      accum_block<T>(a, ids, n, nn, j0, std::min(kBlock, nn - j0), pos, sum, sq, mx);
    }
  });
}

void neuron_stats_accum_cpu(const at::Tensor& act, const at::Tensor& group_ids, const at::Tensor& tokens,
                            const at::Tensor& positive, const at::Tensor& sum, const at::Tensor& sum_sq,
                            const at::Tensor& max) {
  TORCH_CHECK(act.dim() == 2, "neuron_stats_accum: act must be (N, I), got ", act.sizes());
  TORCH_CHECK(act.device().is_cpu() && act.is_contiguous(), "neuron_stats_accum: act must be a contiguous CPU tensor");
  const auto st = act.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "neuron_stats_accum: act must be float32/float16/bfloat16, got ", st);
  const int64_t n = act.size(0), nn = act.size(1), groups = tokens.numel();
  xlk::check_tensor(group_ids, "neuron_stats_accum", "group_ids", at::kLong, {n});
  xlk::check_tensor(tokens, "neuron_stats_accum", "tokens", at::kLong, {groups});
  xlk::check_tensor(positive, "neuron_stats_accum", "positive", at::kLong, {groups, nn});
  xlk::check_tensor(sum, "neuron_stats_accum", "sum", at::kDouble, {groups, nn});
  xlk::check_tensor(sum_sq, "neuron_stats_accum", "sum_sq", at::kDouble, {groups, nn});
  xlk::check_tensor(max, "neuron_stats_accum", "max", at::kFloat, {groups, nn});
  const int64_t* ids = group_ids.const_data_ptr<int64_t>();
  int64_t* tok = tokens.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(ids[r] >= -1 && ids[r] < groups, "neuron_stats_accum: group_ids holds ", ids[r],
                ", outside [-1, ", groups, ")");
  }
  for (int64_t r = 0; r < n; ++r) {
    if (ids[r] >= 0) tok[ids[r]] += 1;
  }
  if (n == 0 || nn == 0) return;
  int64_t* p = positive.mutable_data_ptr<int64_t>();
  double* s = sum.mutable_data_ptr<double>();
  double* q = sum_sq.mutable_data_ptr<double>();
  float* m = max.mutable_data_ptr<float>();
  if (st == at::kFloat) accum<float>(act, ids, n, nn, p, s, q, m);
  else if (st == at::kHalf) accum<c10::Half>(act, ids, n, nn, p, s, q, m);
  else accum<c10::BFloat16>(act, ids, n, nn, p, s, q, m);
}

}  // namespace

TORCH_LIBRARY_IMPL(xlkernels, CPU, m) { m.impl("neuron_stats_accum", &neuron_stats_accum_cpu); }
