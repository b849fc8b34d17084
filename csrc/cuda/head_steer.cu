// head_steer CUDA kernels (torch-free): out = gate[b,h] * o[b,t,h,:] + shift[b,h,:], exactly shift where
// gate == 0. Element access is vectorised (up to 16 bytes per load/store) when D, the strides of o and the
// pointers allow it. Backward: blocks over (b*H + h, chunk of t), any D (launch shapes: launch.h); the
// per-(b,h) sums are reduced in the block and added with one fp32 atomic per (b,h,d) and per (b,h) per chunk.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "head_steer.h"
#include "launch.h"

namespace xlk {
namespace {

// Grid-stride over the nvec = B*T*H*D/V vectors of the output; I is the index type (32-bit when it fits).
// svec: shift rows may be read as float4 (16-byte aligned, D % 4 == 0, V % 4 == 0).
template <typename T, int V, typename I>
__global__ void fwd_kernel(const T* __restrict__ o, T* __restrict__ out, const float* __restrict__ gate,
                           const float* __restrict__ shift, SteerShape s, I nvec, bool svec) {
  const I dv = static_cast<I>(s.D / V), H = static_cast<I>(s.H), Tn = static_cast<I>(s.T);
  const I stride = static_cast<I>(gridDim.x) * static_cast<I>(blockDim.x);
  for (I i = static_cast<I>(blockIdx.x) * static_cast<I>(blockDim.x) + static_cast<I>(threadIdx.x); i < nvec;
       i += stride) {
    const I row = i / dv, d = (i - row * dv) * V;
    const I h = row % H, bt = row / H, t = bt % Tn, b = bt / Tn;
    const float g = gate ? gate[b * s.gate_bs + h] : 1.f;
    float sv[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sv[j] = 0.f;
    if (shift) {
      const float* sp = shift + b * s.shift_bs + h * s.D + d;
      if constexpr (V % 4 == 0) {
        if (svec) {
#pragma unroll
          for (int q = 0; q < V / 4; ++q) {
            const float4 f = reinterpret_cast<const float4*>(sp)[q];
            sv[4 * q] = f.x;
            sv[4 * q + 1] = f.y;
            sv[4 * q + 2] = f.z;
            sv[4 * q + 3] = f.w;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) sv[j] = sp[j];
        }
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) sv[j] = sp[j];
      }
    }
    Pack<T, V> y;
    if (g == 0.f) {  // select: o is not read (it may hold garbage for skipped heads)
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_f<T>(sv[j]);
    } else {
      const Pack<T, V> x = load<T, V>(o + b * s.sb + t * s.st + h * s.sh + d);
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_f<T>(g * to_f<T>(x.v[j]) + sv[j]);
    }
    store<T, V>(out + static_cast<int64_t>(row) * s.D + d, y);
  }
}

// Block: `cols` threads per row of the nv = D/V vectors, which they walk in tiles of `cols`, x `rows` rows of T in
// flight (threads beyond cols*rows idle; blockDim is a multiple of 32). blockIdx.x strides over b*H + h,
// blockIdx.y is a chunk of T. Shared memory: blockDim*V floats (shift partials) + 32 floats (gate warp sums).
// Up to 1024 threads (launch.h), hence the launch bounds (at most 64 registers).
template <typename T, int V>
__global__ void __launch_bounds__(1024)
    bwd_kernel(const T* __restrict__ grad, const T* __restrict__ o, const float* __restrict__ gate,
               T* __restrict__ grad_o, float* __restrict__ ggate, int64_t ggate_bs, float* __restrict__ gshift,
               int64_t gshift_bs, SteerShape s, int cols, int rows, int64_t chunk) {
  extern __shared__ float smem[];
  float* warp_sums = smem + static_cast<int64_t>(blockDim.x) * V;
  const int64_t nv = s.D / V;
  const int tid = static_cast<int>(threadIdx.x);
  const int col = tid % cols, rl = tid / cols;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t t1 = t0 + chunk < s.T ? t0 + chunk : s.T;
  for (int64_t bh = blockIdx.x; bh < s.B * s.H; bh += gridDim.x) {
    const int64_t b = bh / s.H, h = bh % s.H;
    const float g = gate ? gate[b * s.gate_bs + h] : 1.f;
    float acc_g = 0.f;
    for (int64_t c0 = 0; c0 < nv; c0 += cols) {  // uniform across the block
      const bool active = rl < rows && c0 + col < nv;
      const int64_t d = (c0 + col) * V;
      float acc_s[V];
#pragma unroll
      for (int j = 0; j < V; ++j) acc_s[j] = 0.f;
      if (active) {
        for (int64_t t = t0 + rl; t < t1; t += rows) {
          const int64_t r = ((b * s.T + t) * s.H + h) * s.D + d;
          const Pack<T, V> dy = load<T, V>(grad + r);
          if (grad_o) {
            Pack<T, V> y;
#pragma unroll
            for (int j = 0; j < V; ++j) y.v[j] = from_f<T>(g == 0.f ? 0.f : g * to_f<T>(dy.v[j]));
            store<T, V>(grad_o + r, y);
          }
          if (gshift) {
#pragma unroll
            for (int j = 0; j < V; ++j) acc_s[j] += to_f<T>(dy.v[j]);
          }
          if (ggate) {
            const Pack<T, V> x = load<T, V>(o + b * s.sb + t * s.st + h * s.sh + d);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              float xv = to_f<T>(x.v[j]);
              if (g == 0.f && !isfinite(xv)) xv = 0.f;  // garbage at skipped heads counts as 0
              acc_g += to_f<T>(dy.v[j]) * xv;
            }
          }
        }
      }
      if (gshift) {
        float* dst = gshift + b * gshift_bs + h * s.D + d;
        if (rows == 1) {
          if (active) {
#pragma unroll
            for (int j = 0; j < V; ++j) atomicAdd(dst + j, acc_s[j]);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) smem[tid * V + j] = acc_s[j];
          __syncthreads();
          if (active && rl == 0) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              float sum = 0.f;
              for (int k = 0; k < rows; ++k) sum += smem[(k * cols + col) * V + j];
              atomicAdd(dst + j, sum);
            }
          }
          __syncthreads();
        }
      }
    }
    if (ggate) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc_g += __shfl_down_sync(0xffffffffu, acc_g, off);
      if ((tid & 31) == 0) warp_sums[tid >> 5] = acc_g;
      __syncthreads();
      if (tid == 0) {
        float sum = 0.f;
        for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) sum += warp_sums[w];
        atomicAdd(ggate + b * ggate_bs + h, sum);
      }
      __syncthreads();
    }
  }
}

bool aligned(const void* p, int bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Widest vector that D, the strides of o (where the size is > 1) and every pointer allow.
int pick_vec(int elem, const SteerShape& s, const void* a, const void* b, const void* c) {
  return launch::vec_width(elem, {s.D, s.B > 1 ? s.sb : 0, s.T > 1 ? s.st : 0, s.H > 1 ? s.sh : 0},
                           {reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b),
                            reinterpret_cast<uintptr_t>(c)});
}

template <typename F>
cudaError_t with_vec(int v, F&& f) {
  switch (v) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

template <typename F>
cudaError_t with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kSteerF32: return f(float{});
    case kSteerF16: return f(__half{});
    case kSteerBF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t head_steer_forward(int dtype, const void* o, void* out, const float* gate, const float* shift,
                               SteerShape s, cudaStream_t stream) {
  const int64_t n = s.B * s.T * s.H * s.D;
  if (n == 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int v = pick_vec(static_cast<int>(sizeof(T)), s, o, out, nullptr);
    return with_vec(v, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const int64_t nvec = n / V;
      const int threads = 256;
      const int64_t blocks = launch::stride_blocks(nvec, threads, int64_t{1} << 20);
      const T* op = static_cast<const T*>(o);
      T* yp = static_cast<T*>(out);
      const bool svec = shift != nullptr && V % 4 == 0 && s.D % 4 == 0 && s.shift_bs % 4 == 0 && aligned(shift, 16);
      if (nvec < (int64_t{1} << 31)) {
        fwd_kernel<T, V, uint32_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
            op, yp, gate, shift, s, static_cast<uint32_t>(nvec), svec);
      } else {
        fwd_kernel<T, V, int64_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(op, yp, gate, shift, s,
                                                                                         nvec, svec);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t head_steer_backward(int dtype, const void* grad, const void* o, const float* gate, void* grad_o,
                                float* grad_gate, int64_t ggate_bs, float* grad_shift, int64_t gshift_bs,
                                SteerShape s, int num_sms, cudaStream_t stream) {
  const int64_t bh = s.B * s.H;
  if (bh == 0 || s.T == 0 || s.D == 0 || (!grad_o && !grad_gate && !grad_shift)) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int v = pick_vec(static_cast<int>(sizeof(T)), s, grad, grad_o, grad_gate ? o : nullptr);
    const launch::SteerBwd p = launch::steer_bwd(s.D, v, bh, s.T, num_sms);
    return with_vec(static_cast<int>(p.vec), [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      const size_t smem = (static_cast<size_t>(p.threads) * V + 32) * sizeof(float);
      const dim3 grid(static_cast<unsigned>(p.grid_x), static_cast<unsigned>(p.grid_y));
      bwd_kernel<T, V><<<grid, static_cast<unsigned>(p.threads), smem, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(o), gate, static_cast<T*>(grad_o), grad_gate,
          ggate_bs, grad_shift, gshift_bs, s, static_cast<int>(p.cols), static_cast<int>(p.rows), p.chunk);
      return cudaGetLastError();
    });
  });
}

}  // namespace xlk
