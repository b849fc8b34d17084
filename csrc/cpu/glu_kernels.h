// Inner loops of the glu CPU kernels. Included twice by csrc/cpu/glu.cpp: once for the baseline ISA and once
// under `#pragma GCC target("avx2,fma")` (runtime-dispatched), each time inside its own namespace. No include
// guard on purpose; needs kBlock, kGeluK, kGeluC and Args from the including scope.

// Loads/stores widening to fp32. bf16 is done with plain bit operations (round to nearest even, NaN kept) so the
// loops vectorize; c10's conversion branches on NaN.
template <typename T>
inline float ld(T x) { return static_cast<float>(x); }
template <>
inline float ld<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t b = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &b, sizeof(float));
  return f;
}
template <typename T>
inline T st(float f) { return static_cast<T>(f); }
template <>
inline c10::BFloat16 st<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(float));
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = f != f ? 0x7fc0u : r;
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}

#if defined(XLK_GLU_F16C) && defined(__FLT16_MAX__)
// With F16C (the AVX2 copy), fp16 goes through _Float16 so the conversions vectorize (vcvtph2ps / vcvtps2ph).
template <>
inline float ld<c10::Half>(c10::Half x) {
  _Float16 h;
  std::memcpy(&h, &x.x, sizeof(h));
  return static_cast<float>(h);
}
template <>
inline c10::Half st<c10::Half>(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, sizeof(b));
  return c10::Half(b, c10::Half::from_bits());
}
#endif

// exp(x) for x in float range: 2^round(x*log2e) * poly(2^f); branch-free so the loops vectorize. NaN in -> garbage
// out, but every caller multiplies by x, so NaN still propagates. Past 88.5 it is +inf, so that sigmoid(-inf) is 0
// and silu/gelu(-inf) = -inf * 0 = NaN, as in the reference and the GPU kernels.
inline float xexp(float x) {
  const float over = x > 88.5f ? std::numeric_limits<float>::infinity() : 1.0f;
  x = x < -87.0f ? -87.0f : x;
  x = x > 87.0f ? 87.0f : x;
  const float t = x * 1.4426950408889634f;
  const float r = (t + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick), branch-free
  const int i = static_cast<int>(r);
  const float f = t - r;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (i + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale * over;
}

// s = sigmoid of the activation's inner argument: silu(x) = x*s(x); gelu_tanh(x) = x*s(2u), u = k(x + c x^3).
template <int ACT>
inline float sig(float x) {
  if (ACT == 0) return 1.f / (1.f + xexp(-x));
  const float u = kGeluK * (x + kGeluC * x * x * x);
  return 1.f / (1.f + xexp(-2.f * u));
}

template <int ACT>
inline float dact(float x, float s) {
  if (ACT == 0) return s * (1.f + x * (1.f - s));
  return s + 2.f * x * s * (1.f - s) * kGeluK * (1.f + 3.f * kGeluC * x * x);
}

template <typename T, int ACT, bool STATS>
void fwd_rows(const T* gate, const T* up, T* out, const Args& a, int64_t r0, int64_t r1, int64_t j0, int64_t w) {
  float v[kBlock];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g = a.ids ? a.ids[r] : -1, off = r * a.nn + j0;
    const T* __restrict__ x = gate + off;
    const T* __restrict__ u = up + off;
    T* __restrict__ y = out + off;
    if (STATS && r + 2 < r1) {  // a neuron block walks rows nn apart: prefetch two rows ahead
      const int64_t ahead = 2 * a.nn, bytes = w * static_cast<int64_t>(sizeof(T));
      for (int64_t k = 0; k < bytes; k += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(x + ahead) + k, 0, 3);
        __builtin_prefetch(reinterpret_cast<const char*>(u + ahead) + k, 0, 3);
        __builtin_prefetch(reinterpret_cast<const char*>(y + ahead) + k, 1, 3);
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      const float xf = ld(x[j]);
      v[j] = xf * sig<ACT>(xf);
    }
    if (STATS && g >= 0) {
      const int64_t o = g * a.nn + j0;
      int64_t* __restrict__ p = a.pos + o;
      double* __restrict__ s = a.sum + o;
      double* __restrict__ q = a.sq + o;
      float* __restrict__ m = a.mx + o;
      for (int64_t j = 0; j < w; ++j) p[j] += v[j] > 0.f ? 1 : 0;
      for (int64_t j = 0; j < w; ++j) {
        const double d = v[j];
        s[j] += d;
        q[j] += d * d;
      }
      for (int64_t j = 0; j < w; ++j) m[j] = xlk::max_keep_nan(m[j], v[j]);
    }
    const float* __restrict__ mm = a.mrow(g);
    if (mm) {
      const float* __restrict__ ad = a.arow(g) + j0;
      mm += j0;
      for (int64_t j = 0; j < w; ++j) y[j] = st<T>((v[j] * mm[j] + ad[j]) * ld(u[j]));
    } else {
      for (int64_t j = 0; j < w; ++j) y[j] = st<T>(v[j] * ld(u[j]));
    }
  }
}

template <typename T, int ACT, bool IV>
inline void bwd_row(const T* __restrict__ o, const T* __restrict__ x, const T* __restrict__ u, T* __restrict__ dx,
                    T* __restrict__ dy, const float* __restrict__ mm, const float* __restrict__ ad, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    const float xf = ld(x[j]), of = ld(o[j]), uf = ld(u[j]);
    const float s = sig<ACT>(xf);
    const float m = IV ? mm[j] : 1.f, b = IV ? ad[j] : 0.f;
    dy[j] = st<T>(of * (xf * s * m + b));
    dx[j] = st<T>(of * uf * m * dact<ACT>(xf, s));
  }
}
