// neuron_stats CUDA kernel (torch-free). Block = 128 threads, each owning V consecutive neurons (16-byte loads);
// blockIdx.x picks the neuron slab, blockIdx.y a chunk of rows. A thread walks its chunk row by row (U rows of
// loads in flight), keeping the stats of the current run of equal group ids in registers (int counts, fp64
// sums, fp32 max + NaN flag); when the id changes it flushes with ONE atomic per (group, neuron): atomicAdd on
// unsigned long long and double, ordered-int atomicMax for max. Tokens are counted by one thread per chunk.
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "neuron_stats.h"

namespace xlk {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

template <typename T, int V>
__global__ void stats_kernel(const T* __restrict__ act, const int64_t* __restrict__ ids, int64_t n, int64_t nn,
                             int64_t groups, int64_t rows_per_chunk, int64_t* tokens, int64_t* positive,
                             double* sum, double* sum_sq, float* mx) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int width = c < nn ? static_cast<int>(nn - c < V ? nn - c : V) : 0;
  const bool count_tokens = blockIdx.x == 0 && threadIdx.x == 0;
  if (width == 0 && !count_tokens) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < n ? r0 + rows_per_chunk : n;
  ns::Acc<V> acc;
  acc.reset();
  int64_t cur = -1;
  for (int64_t r = r0; r < r1; r += kUnroll) {
    Pack<T, V> x[kUnroll];
    int64_t g[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      g[k] = r + k < r1 ? __ldg(ids + r + k) : -1;
      if (g[k] >= groups) g[k] = -1;
      if (g[k] >= 0 && width == V) {
        x[k] = load<T, V>(act + (r + k) * nn + c);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) x[k].v[j] = (g[k] >= 0 && j < width) ? act[(r + k) * nn + c + j] : from_f<T>(0.f);
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (g[k] != cur) {
        if (cur >= 0) acc.flush(cur, nn, c, width, count_tokens, tokens, positive, sum, sum_sq, mx);
        acc.reset();
        cur = g[k];
      }
      if (cur >= 0) {
        float f[V];
#pragma unroll
        for (int j = 0; j < V; ++j) f[j] = to_f<T>(x[k].v[j]);
        acc.add(f);
      }
    }
  }
  if (cur >= 0) acc.flush(cur, nn, c, width, count_tokens, tokens, positive, sum, sum_sq, mx);
}

template <typename T, int V>
cudaError_t stats_launch(const void* act, const int64_t* ids, int64_t n, int64_t nn, int64_t groups,
                         int64_t* tokens, int64_t* positive, double* sum, double* sum_sq, float* max, int num_sms,
                         cudaStream_t stream) {
  // ~8 blocks per SM, at least 16 rows per chunk
  const launch::RowGrid rg = launch::row_grid(n, nn, int64_t(kThreads) * V, int64_t(num_sms) * 8, 16);
  if (rg.x == 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rg.x), static_cast<unsigned>(rg.y));
  const int64_t rows = rg.rows;
  stats_kernel<T, V><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(act), ids, n, nn, groups, rows, tokens,
                                                    positive, sum, sum_sq, max);
  return cudaGetLastError();
}

template <typename T>
cudaError_t pick(const void* act, const int64_t* ids, int64_t n, int64_t nn, int64_t groups, int64_t* tokens,
                 int64_t* positive, double* sum, double* sum_sq, float* max, int num_sms, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  if (nn % V == 0 && reinterpret_cast<uintptr_t>(act) % 16 == 0)
    return stats_launch<T, V>(act, ids, n, nn, groups, tokens, positive, sum, sum_sq, max, num_sms, stream);
  return stats_launch<T, 1>(act, ids, n, nn, groups, tokens, positive, sum, sum_sq, max, num_sms, stream);
}

}  // namespace

cudaError_t neuron_stats_accum(int dtype, const void* act, const int64_t* ids, int64_t n, int64_t nn, int64_t groups,
                               int64_t* tokens, int64_t* positive, double* sum, double* sum_sq, float* max,
                               int num_sms, cudaStream_t stream) {
  if (n == 0 || nn == 0) return cudaSuccess;
  switch (dtype) {
    case kNsF32: return pick<float>(act, ids, n, nn, groups, tokens, positive, sum, sum_sq, max, num_sms, stream);
    case kNsF16: return pick<__half>(act, ids, n, nn, groups, tokens, positive, sum, sum_sq, max, num_sms, stream);
    case kNsBF16:
      return pick<__nv_bfloat16>(act, ids, n, nn, groups, tokens, positive, sum, sum_sq, max, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace xlk
