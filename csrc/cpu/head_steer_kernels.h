// CPU loops of head_steer. Included TWICE by head_steer.cpp (no include guard): once plainly and once under
// `#pragma GCC target("avx2,fma")`, each time inside its own namespace; the .cpp picks one at run time.
// Keep it free of std:: templates (their shared instantiations could pick up AVX2 code): plain loops only.

// Element loads/stores as float; the bf16 ones are plain bit operations so that the loops vectorise.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float ld(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(c10::Half* p, int64_t i, float v) { p[i] = static_cast<c10::Half>(v); }
inline void st(c10::BFloat16* p, int64_t i, float v) {  // round to nearest even, NaN -> 0x7fc0 (as c10)
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  u = v != v ? 0x7fc00000u : u + 0x7fffu + ((u >> 16) & 1u);
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(u >> 16);
}

// out rows r in memory order; (b, t, h) of a row are stepped, not divided out, per row.
template <typename scalar_t>
void fwd_rows(const scalar_t* o, scalar_t* out, const float* gate, const float* shift, const xlk::SteerArgs& a,
              int64_t grain) {
  const int64_t rows = a.B * a.T * a.H, D = a.D;
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    int64_t h = r0 % a.H, t = (r0 / a.H) % a.T, b = r0 / (a.H * a.T);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ x = o + b * a.sb + t * a.st + h * a.sh;
      scalar_t* __restrict__ y = out + r * D;
      const float g = gate ? gate[b * a.gate_bs + h] : 1.f;
      const float* __restrict__ s = shift ? shift + b * a.shift_bs + h * D : nullptr;
      if (g == 0.f) {  // select: o is not read (it may hold garbage for skipped heads)
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
      if (++h == a.H) {
        h = 0;
        if (++t == a.T) {
          t = 0;
          ++b;
        }
      }
    }
  });
}

// One task k = one b and a chunk of t, walking the rows (t, h) in memory order (the prefetchers then stream
// dO and grad_o). Writes grad_o rows and per-task fp32 sums: sum_{t,d} dO*o into part_gate[k, h] and
// sum_t dO into part_shift[k, h, :] (both fully written by the task; no zeroing needed).
template <typename scalar_t>
void bwd_tasks(const scalar_t* dout, const scalar_t* o, const float* gate, scalar_t* grad_o, float* part_gate,
               float* part_shift, int64_t chunks, int64_t chunk_len, const xlk::SteerArgs& a) {
  const int64_t D = a.D, H = a.H, tasks = a.B * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t k0, int64_t k1) {
    float* lanes = part_gate ? new float[H * D] : nullptr;  // per-lane sums of dO*o of one task
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c = k % chunks, b = k / chunks;
      const int64_t t0 = c * chunk_len, t1 = t0 + chunk_len < a.T ? t0 + chunk_len : a.T;
      if (lanes) {
        for (int64_t i = 0; i < H * D; ++i) lanes[i] = 0.f;
      }
      if (part_shift) {
        float* __restrict__ ps = part_shift + k * H * D;
        for (int64_t i = 0; i < H * D; ++i) ps[i] = 0.f;
      }
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t r = (b * a.T + t) * H + h;
          const float g = gate ? gate[b * a.gate_bs + h] : 1.f;
          const scalar_t* __restrict__ dy = dout + r * D;
          if (grad_o) {
            scalar_t* __restrict__ dx = grad_o + r * D;
            if (g == 0.f) {
              for (int64_t d = 0; d < D; ++d) st(dx, d, 0.f);
            } else {
              for (int64_t d = 0; d < D; ++d) st(dx, d, g * ld(dy, d));
            }
          }
          if (part_shift) {
            float* __restrict__ as = part_shift + (k * H + h) * D;
            for (int64_t d = 0; d < D; ++d) as[d] += ld(dy, d);
          }
          if (lanes) {
            float* __restrict__ ag = lanes + h * D;
            const scalar_t* __restrict__ x = o + b * a.sb + t * a.st + h * a.sh;
            if (g == 0.f) {  // o may be garbage at skipped heads: non-finite values count as 0
              for (int64_t d = 0; d < D; ++d) {
                const float xv = ld(x, d);
                ag[d] += __builtin_isfinite(xv) ? ld(dy, d) * xv : 0.f;
              }
            } else {
              for (int64_t d = 0; d < D; ++d) ag[d] += ld(dy, d) * ld(x, d);
            }
          }
        }
      }
      if (lanes) {
        for (int64_t h = 0; h < H; ++h) {
          float sum = 0.f;
          for (int64_t d = 0; d < D; ++d) sum += lanes[h * D + d];
          part_gate[k * H + h] = sum;
        }
      }
    }
    delete[] lanes;
  });
}
