// Launch shapes of the CUDA kernels (csrc/cuda/*.cu) in plain C++ (no CUDA, no torch), so that a CPU test
// (tests/test_cuda_launch.py) checks them against the hardware limits: at most 1024 threads per block,
// gridDim.x <= 2^31 - 1, gridDim.y <= 65535.
#pragma once
#include <cstdint>
#include <initializer_list>

namespace xlk {
namespace launch {

constexpr int64_t kMaxGridX = 0x7fffffff;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxThreads = 1024;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Widest vector (elements of `elem` bytes, at most 16 bytes) that divides every count and aligns every address
// (a null address aligns with anything).
inline int vec_width(int elem, std::initializer_list<int64_t> counts, std::initializer_list<uintptr_t> addrs) {
  for (int v = 16 / elem; v > 1; v /= 2) {
    bool ok = true;
    for (int64_t c : counts) ok = ok && c % v == 0;
    for (uintptr_t a : addrs) ok = ok && a % (static_cast<uintptr_t>(v) * elem) == 0;
    if (ok) return v;
  }
  return 1;
}

// Blocks of a 1-D grid-stride loop over `total` items, `threads` per block, at most `cap` blocks.
inline int64_t stride_blocks(int64_t total, int64_t threads, int64_t cap) {
  return clamp64(cdiv(total, threads), 1, min64(cap, kMaxGridX));
}

// Column slabs x row chunks (glu forward, neuron_stats): blockIdx.x takes `per_block` of the `cols` columns,
// blockIdx.y `rows` of the n >= 1 rows; about `target` blocks, chunks of at least `min_rows` rows.
// x == 0: more slabs than a grid holds (a row of over 2^38 elements; not a tensor that fits in memory).
struct RowGrid {
  int64_t x, y, rows;
};
inline RowGrid row_grid(int64_t n, int64_t cols, int64_t per_block, int64_t target, int64_t min_rows) {
  RowGrid g{cdiv(cols, per_block), 0, 0};
  const int64_t chunks = clamp64(cdiv(target, g.x), 1, min64(cdiv(n, min_rows), kMaxGridY));
  g.rows = cdiv(n, chunks);
  g.y = cdiv(n, g.rows);
  if (g.x > kMaxGridX) g.x = 0;
  return g;
}

// head_steer backward for head dim D read in vectors of v (from the alignment, v divides D): `cols` threads per row
// walk the D/v vectors in `tiles` steps, `rows` rows of T in flight (rows > 1 only when D/v < 256); blockIdx.x
// strides over the bh = B*H heads, blockIdx.y takes `chunk` steps of T (enough blocks for ~4 per SM).
struct SteerBwd {
  int64_t vec, threads, cols, rows, tiles, grid_x, grid_y, chunk;
};
inline SteerBwd steer_bwd(int64_t D, int v, int64_t bh, int64_t T, int num_sms) {
  SteerBwd p{};
  p.vec = v;
  const int64_t nv = D / v;
  p.cols = min64(nv, kMaxThreads);
  p.rows = nv >= 256 ? 1 : 256 / nv;
  p.threads = cdiv(p.cols * p.rows, 32) * 32;
  p.tiles = cdiv(nv, p.cols);
  p.grid_x = min64(bh, kMaxGridX);
  const int64_t target = 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132);
  p.chunk = cdiv(T, clamp64(cdiv(target, bh), 1, min64(cdiv(T, p.rows), kMaxGridY)));
  p.grid_y = cdiv(T, p.chunk);
  return p;
}

}  // namespace launch
}  // namespace xlk
