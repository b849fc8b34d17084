// glu CUDA kernels (torch-free). Forward: the neuron_stats layout (a thread owns V neurons with 16-byte loads,
// walks a chunk of rows; blockIdx.y = row chunk), computing act in fp32, accumulating the run stats of act in
// registers (one atomic per (group, neuron) per run, see neuron_stats.h), applying the intervention (the
// per-group mul/add of the current run are held in registers) and storing (act*mul+add)*up.
// Backward: element-wise, grid-stride over 16-byte vectors.
#include <cuda_runtime.h>

#include <cstdint>

#include "glu.h"
#include "launch.h"
#include "neuron_stats.h"

namespace xlk {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;

// act(x) = x * s; silu: s = sigmoid(x); gelu_tanh: s = sigmoid(2u), u = k(x + c x^3) (= 0.5(1 + tanh u)).
template <int ACT>
__device__ __forceinline__ float sig(float x) {
  if (ACT == kGluSilu) return 1.f / (1.f + __expf(-x));
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 1.f / (1.f + __expf(-2.f * u));
}

template <int ACT>
__device__ __forceinline__ float dact(float x, float s) {
  if (ACT == kGluSilu) return s * (1.f + x * (1.f - s));
  return s + 2.f * x * s * (1.f - s) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * x * x);
}

template <int V>
__device__ __forceinline__ void load_iv(const GluArgs& a, int64_t g, int64_t c, int width, float (&m)[V],
                                        float (&b)[V]) {
  const bool on = a.mode == kGluPerNeuron || (a.mode == kGluPerGroup && g >= 0);
  const int64_t o = (a.mode == kGluPerGroup ? g * a.nn : 0) + c;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    m[j] = on && j < width ? __ldg(a.mul + o + j) : 1.f;
    b[j] = on && j < width ? __ldg(a.add + o + j) : 0.f;
  }
}

template <typename T, int V, int ACT, bool STATS>
__global__ void fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, GluArgs a,
                           int64_t rows_per_chunk) {
  const int64_t nn = a.nn;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int width = c < nn ? static_cast<int>(nn - c < V ? nn - c : V) : 0;
  const bool count_tokens = STATS && blockIdx.x == 0 && threadIdx.x == 0;
  if (width == 0 && !count_tokens) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < a.n ? r0 + rows_per_chunk : a.n;
  ns::Acc<V> acc;
  acc.reset();
  int64_t cur = -1;
  float m[V], b[V];
  load_iv<V>(a, -1, c, width, m, b);
  for (int64_t r = r0; r < r1; r += kUnroll) {
    Pack<T, V> xg[kUnroll], xu[kUnroll];
    int64_t g[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const bool row_ok = r + k < r1;
      g[k] = row_ok && a.ids ? __ldg(a.ids + r + k) : -1;
      if (g[k] >= a.groups) g[k] = -1;
      const int64_t off = (r + k) * nn + c;
      if (row_ok && width == V) {
        xg[k] = load<T, V>(gate + off);
        xu[k] = load<T, V>(up + off);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          xg[k].v[j] = row_ok && j < width ? gate[off + j] : from_f<T>(0.f);
          xu[k].v[j] = row_ok && j < width ? up[off + j] : from_f<T>(0.f);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (r + k >= r1) break;
      if (g[k] != cur) {
        if (STATS && cur >= 0) acc.flush(cur, nn, c, width, count_tokens, a.tokens, a.positive, a.sum, a.sum_sq, a.max);
        acc.reset();
        if (a.mode == kGluPerGroup) load_iv<V>(a, g[k], c, width, m, b);
        cur = g[k];
      }
      float v[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float x = to_f<T>(xg[k].v[j]);
        v[j] = x * sig<ACT>(x);
      }
      if (STATS && cur >= 0) acc.add(v);
      if (width == V) {
        Pack<T, V> y;
#pragma unroll
        for (int j = 0; j < V; ++j) y.v[j] = from_f<T>((v[j] * m[j] + b[j]) * to_f<T>(xu[k].v[j]));
        store<T, V>(out + (r + k) * nn + c, y);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (j < width) out[(r + k) * nn + c + j] = from_f<T>((v[j] * m[j] + b[j]) * to_f<T>(xu[k].v[j]));
      }
    }
  }
  if (STATS && cur >= 0) acc.flush(cur, nn, c, width, count_tokens, a.tokens, a.positive, a.sum, a.sum_sq, a.max);
}

template <typename T, int V, int ACT>
__global__ void bwd_kernel(const T* __restrict__ grad, const T* __restrict__ gate, const T* __restrict__ up,
                           T* __restrict__ dgate, T* __restrict__ dup, GluArgs a) {
  const int64_t vecs_per_row = (a.nn + V - 1) / V, total = a.n * vecs_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / vecs_per_row, c = (i - r * vecs_per_row) * V, off = r * a.nn + c;
    const int width = static_cast<int>(a.nn - c < V ? a.nn - c : V);
    int64_t g = a.ids ? __ldg(a.ids + r) : -1;
    if (g >= a.groups) g = -1;
    float m[V], b[V];
    load_iv<V>(a, g, c, width, m, b);
    Pack<T, V> xo, xg, xu, yg, yu;
    if (width == V) {
      xo = load<T, V>(grad + off);
      xg = load<T, V>(gate + off);
      xu = load<T, V>(up + off);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        xo.v[j] = j < width ? grad[off + j] : from_f<T>(0.f);
        xg.v[j] = j < width ? gate[off + j] : from_f<T>(0.f);
        xu.v[j] = j < width ? up[off + j] : from_f<T>(0.f);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float x = to_f<T>(xg.v[j]), o = to_f<T>(xo.v[j]), u = to_f<T>(xu.v[j]);
      const float s = sig<ACT>(x);
      yu.v[j] = from_f<T>(o * (x * s * m[j] + b[j]));
      yg.v[j] = from_f<T>(o * u * m[j] * dact<ACT>(x, s));
    }
    if (width == V) {
      store<T, V>(dgate + off, yg);
      store<T, V>(dup + off, yu);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j < width) {
          dgate[off + j] = yg.v[j];
          dup[off + j] = yu.v[j];
        }
      }
    }
  }
}

template <typename T, int V, int ACT>
cudaError_t fwd_launch(const void* gate, const void* up, void* out, const GluArgs& a, int num_sms, cudaStream_t st) {
  const launch::RowGrid rg = launch::row_grid(a.n, a.nn, int64_t(kThreads) * V, int64_t(num_sms) * 8, 16);
  if (rg.x == 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(rg.x), static_cast<unsigned>(rg.y));
  const int64_t rows = rg.rows;
  const T* g = static_cast<const T*>(gate);
  const T* u = static_cast<const T*>(up);
  T* o = static_cast<T*>(out);
  if (a.tokens) fwd_kernel<T, V, ACT, true><<<grid, kThreads, 0, st>>>(g, u, o, a, rows);
  else fwd_kernel<T, V, ACT, false><<<grid, kThreads, 0, st>>>(g, u, o, a, rows);
  return cudaGetLastError();
}

template <typename T, int V, int ACT>
cudaError_t bwd_launch(const void* grad, const void* gate, const void* up, void* dgate, void* dup, const GluArgs& a,
                       int num_sms, cudaStream_t st) {
  const int64_t total = a.n * ((a.nn + V - 1) / V);
  const int64_t blocks = launch::stride_blocks(total, 256, int64_t(num_sms) * 16);
  bwd_kernel<T, V, ACT><<<static_cast<unsigned>(blocks), 256, 0, st>>>(
      static_cast<const T*>(grad), static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(dgate),
      static_cast<T*>(dup), a);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t fwd_pick(int act, const void* gate, const void* up, void* out, const GluArgs& a, int sms, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.nn % V == 0 && aligned16(gate) && aligned16(up) && aligned16(out);
  if (act == kGluSilu) return vec ? fwd_launch<T, V, 0>(gate, up, out, a, sms, st) : fwd_launch<T, 1, 0>(gate, up, out, a, sms, st);
  return vec ? fwd_launch<T, V, 1>(gate, up, out, a, sms, st) : fwd_launch<T, 1, 1>(gate, up, out, a, sms, st);
}

template <typename T>
cudaError_t bwd_pick(int act, const void* grad, const void* gate, const void* up, void* dgate, void* dup,
                     const GluArgs& a, int sms, cudaStream_t st) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = a.nn % V == 0 && aligned16(grad) && aligned16(gate) && aligned16(up) && aligned16(dgate) &&
                   aligned16(dup);
  if (act == kGluSilu)
    return vec ? bwd_launch<T, V, 0>(grad, gate, up, dgate, dup, a, sms, st)
               : bwd_launch<T, 1, 0>(grad, gate, up, dgate, dup, a, sms, st);
  return vec ? bwd_launch<T, V, 1>(grad, gate, up, dgate, dup, a, sms, st)
             : bwd_launch<T, 1, 1>(grad, gate, up, dgate, dup, a, sms, st);
}

}  // namespace

cudaError_t glu_forward(int dtype, int act, const void* gate, const void* up, void* out, const GluArgs& a,
                        int num_sms, cudaStream_t stream) {
  if (a.n == 0 || a.nn == 0) return cudaSuccess;
  if (act != kGluSilu && act != kGluGeluTanh) return cudaErrorInvalidValue;
  switch (dtype) {
    case kNsF32: return fwd_pick<float>(act, gate, up, out, a, num_sms, stream);
    case kNsF16: return fwd_pick<__half>(act, gate, up, out, a, num_sms, stream);
    case kNsBF16: return fwd_pick<__nv_bfloat16>(act, gate, up, out, a, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t glu_backward(int dtype, int act, const void* grad, const void* gate, const void* up, void* dgate,
                         void* dup, const GluArgs& a, int num_sms, cudaStream_t stream) {
  if (a.n == 0 || a.nn == 0) return cudaSuccess;
  if (act != kGluSilu && act != kGluGeluTanh) return cudaErrorInvalidValue;
  switch (dtype) {
    case kNsF32: return bwd_pick<float>(act, grad, gate, up, dgate, dup, a, num_sms, stream);
    case kNsF16: return bwd_pick<__half>(act, grad, gate, up, dgate, dup, a, num_sms, stream);
    case kNsBF16: return bwd_pick<__nv_bfloat16>(act, grad, gate, up, dgate, dup, a, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace xlk
