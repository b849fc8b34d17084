// Torch-free launcher of the neuron_stats CUDA kernel (csrc/cuda/neuron_stats.cu), plus (under nvcc) the device
// helpers shared with the fused glu kernel (csrc/cuda/glu.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace xlk {

enum NsDtype : int { kNsF32 = 0, kNsF16 = 1, kNsBF16 = 2 };

// act (n, nn) contiguous; ids (n,) int64, -1 = skip (ids outside [-1, groups) are skipped too);
// tokens (groups,), positive/sum/sum_sq/max (groups, nn) contiguous, accumulated in place (max: NaN sticks).
// num_sms sizes the grid.
cudaError_t neuron_stats_accum(int dtype, const void* act, const int64_t* ids, int64_t n, int64_t nn, int64_t groups,
                               int64_t* tokens, int64_t* positive, double* sum, double* sum_sq, float* max,
                               int num_sms, cudaStream_t stream);

}  // namespace xlk

#ifdef __CUDACC__
#include "common.cuh"

namespace xlk {
namespace ns {

// Float max as ordered-int atomics: signed max for values >= 0 (and canonical +NaN, which then wins), unsigned
// min for negatives. A NaN stored once stays.
__device__ __forceinline__ void atomic_max_f(float* addr, float v) {
  if (v != v) v = __int_as_float(0x7fc00000);
  const int b = __float_as_int(v);
  if (b >= 0) atomicMax(reinterpret_cast<int*>(addr), b);
  else atomicMin(reinterpret_cast<unsigned int*>(addr), static_cast<unsigned int>(b));
}

// Per-thread running stats of V neurons over a run of rows with one group id.
template <int V>
struct Acc {
  unsigned int pos[V];
  double sum[V], sq[V];
  float mx[V];
  bool nan[V];
  int64_t rows;

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      pos[j] = 0;
      sum[j] = 0.0;
      sq[j] = 0.0;
      mx[j] = -INFINITY;
      nan[j] = false;
    }
    rows = 0;
  }

  __device__ __forceinline__ void add(const float (&x)[V]) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const double d = static_cast<double>(x[j]);
      pos[j] += x[j] > 0.f ? 1u : 0u;
      sum[j] += d;
      sq[j] = fma(d, d, sq[j]);
      mx[j] = fmaxf(mx[j], x[j]);  // fmaxf ignores NaN; tracked separately
      nan[j] = nan[j] || (x[j] != x[j]);
    }
    rows += 1;
  }

  // One atomic per (group, neuron) for the whole run. Thread (0, 0) also counts the run's tokens.
  __device__ __forceinline__ void flush(int64_t g, int64_t nn, int64_t c, int width, bool count_tokens,
                                        int64_t* tokens, int64_t* positive, double* s, double* q, float* m) {
    if (rows == 0) return;
    if (count_tokens) atomicAdd(reinterpret_cast<unsigned long long*>(tokens + g), static_cast<unsigned long long>(rows));
    const int64_t o = g * nn + c;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < width) {
        if (pos[j]) atomicAdd(reinterpret_cast<unsigned long long*>(positive + o + j), static_cast<unsigned long long>(pos[j]));
        atomicAdd(s + o + j, sum[j]);
        atomicAdd(q + o + j, sq[j]);
        atomic_max_f(m + o + j, nan[j] ? __int_as_float(0x7fc00000) : mx[j]);
      }
    }
  }
};

}  // namespace ns
}  // namespace xlk
#endif
