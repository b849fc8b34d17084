// Driver of tests/test_cuda_launch.py: checks the launch shapes of csrc/cuda/launch.h against the CUDA limits for
// small, odd and huge sizes. Prints one line per failure and "N checks, M failed"; exits 1 on any failure.
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/launch.h"

using namespace xlk::launch;

static int64_t checks = 0, failed = 0;

#define CHECK(cond, ...)                         \
  do {                                           \
    ++checks;                                    \
    if (!(cond)) {                               \
      ++failed;                                  \
      if (failed <= 50) {                        \
        std::printf("FAIL %s: ", #cond);         \
        std::printf(__VA_ARGS__);                \
        std::printf("\n");                       \
      }                                          \
    }                                            \
  } while (0)

static const std::vector<int64_t> kDims = {1,    2,    3,     4,     7,     8,     31,    64,     100,    127,
                                           128,  255,  256,   257,   1000,  1023,  1024,  1025,   2048,   2050,
                                           4095, 4096, 4097,  4100,  8191,  8192,  8193,  8200,   16384,  65536,
                                           65537, 65540, 1 << 20, (1 << 20) + 1};
static const std::vector<int64_t> kCounts = {1, 2, 3, 31, 1000, 65535, 65536, 65537, 1 << 20, int64_t(1) << 31,
                                             (int64_t(1) << 31) + 7, int64_t(1) << 40, int64_t(1) << 50};

// head_steer backward for every D, both element sizes, aligned and misaligned data.
static void steer_bwd_checks() {
  for (int elem : {2, 4}) {
    for (int64_t D : kDims) {
      for (uintptr_t misalign : {uintptr_t(0), uintptr_t(elem)}) {
        const uintptr_t base = 4096 + misalign;
        const int v = vec_width(elem, {D, 0, 0, 0}, {base, 8192, 0});
        CHECK(v >= 1 && v * elem <= 16 && (v & (v - 1)) == 0, "elem %d D %lld: v %d", elem, (long long)D, v);
        CHECK(D % v == 0 && base % (uintptr_t(v) * elem) == 0, "elem %d D %lld: v %d does not fit", elem,
              (long long)D, v);
        for (int64_t bh : {int64_t(1), int64_t(3), int64_t(1000), int64_t(1) << 31, int64_t(1) << 40}) {
          for (int64_t T : {int64_t(1), int64_t(5), int64_t(4096), int64_t(1) << 33}) {
            const SteerBwd p = steer_bwd(D, v, bh, T, 132);
            const char* fmt = "elem %d D %lld v %lld bh %lld T %lld: threads %lld cols %lld rows %lld tiles %lld "
                              "grid %lld x %lld chunk %lld";
#define ARGS elem, (long long)D, (long long)p.vec, (long long)bh, (long long)T, (long long)p.threads, \
             (long long)p.cols, (long long)p.rows, (long long)p.tiles, (long long)p.grid_x, (long long)p.grid_y, \
             (long long)p.chunk
            CHECK(p.vec == v, fmt, ARGS);  // the width the alignment allows, whatever D
            CHECK(p.threads >= 1 && p.threads <= 1024 && p.threads % 32 == 0, fmt, ARGS);
            CHECK(p.cols >= 1 && p.rows >= 1 && p.cols * p.rows <= p.threads, fmt, ARGS);
            CHECK(p.tiles * p.cols * p.vec >= D && (p.tiles - 1) * p.cols * p.vec < D, fmt, ARGS);  // covers D
            CHECK((p.threads * p.vec + 32) * 4 <= 48 * 1024, fmt, ARGS);  // default shared memory
            CHECK(p.grid_x >= 1 && p.grid_x <= kMaxGridX && p.grid_x <= bh, fmt, ARGS);
            CHECK(p.grid_y >= 1 && p.grid_y <= kMaxGridY, fmt, ARGS);
            CHECK(p.grid_y * p.chunk >= T && (p.grid_y - 1) * p.chunk < T, fmt, ARGS);
#undef ARGS
          }
        }
      }
    }
  }
}

// Vector width: maximal, and divides every count and address (strides of o, pointers).
static void vec_checks() {
  for (int elem : {1, 2, 4, 8}) {
    for (int64_t D : kDims) {
      for (int64_t stride : {int64_t(0), int64_t(2), int64_t(6), D * 3, D * 8}) {
        for (uintptr_t k : {0, 1, 2, 3, 4, 6, 8, 16}) {
          const uintptr_t addr = 4096 + k * elem;
          const int v = vec_width(elem, {D, stride}, {addr});
          auto fits = [&](int w) { return D % w == 0 && stride % w == 0 && addr % (uintptr_t(w) * elem) == 0; };
          CHECK(v >= 1 && v * elem <= 16 && fits(v), "elem %d D %lld stride %lld addr %llu: v %d", elem,
                (long long)D, (long long)stride, (unsigned long long)addr, v);
          CHECK(2 * v * elem > 16 || !fits(2 * v), "elem %d D %lld stride %lld addr %llu: v %d not maximal", elem,
                (long long)D, (long long)stride, (unsigned long long)addr, v);
        }
      }
    }
  }
}

// glu forward / neuron_stats (row_grid) and the 1-D grid-stride launches (stride_blocks).
static void grid_checks() {
  for (int64_t n : kCounts) {
    for (int64_t cols : kCounts) {
      for (int64_t per_block : {int64_t(128), int64_t(1024)}) {
        for (int64_t target : {int64_t(1), int64_t(8 * 132)}) {
          const RowGrid g = row_grid(n, cols, per_block, target, 16);
          const char* fmt = "n %lld cols %lld per_block %lld: grid %lld x %lld rows %lld";
#define ARGS (long long)n, (long long)cols, (long long)per_block, (long long)g.x, (long long)g.y, (long long)g.rows
          if (cdiv(cols, per_block) <= kMaxGridX) {
            CHECK(g.x >= 1 && g.x * per_block >= cols && (g.x - 1) * per_block < cols, fmt, ARGS);
          } else {
            CHECK(g.x == 0, fmt, ARGS);  // reported, never launched
          }
          CHECK(g.y >= 1 && g.y <= kMaxGridY && g.y * g.rows >= n && (g.y - 1) * g.rows < n, fmt, ARGS);
          CHECK(g.rows >= 16 || g.y == 1, fmt, ARGS);
#undef ARGS
        }
      }
    }
    for (int64_t cap : {int64_t(132) * 16, int64_t(1) << 20, int64_t(1) << 40}) {
      const int64_t b = stride_blocks(n, 256, cap);
      CHECK(b >= 1 && b <= cap && b <= kMaxGridX && (b * 256 >= n || b == cap || b == kMaxGridX),
            "total %lld cap %lld: %lld blocks", (long long)n, (long long)cap, (long long)b);
    }
  }
}

int main() {
  steer_bwd_checks();
  vec_checks();
  grid_checks();
  std::printf("%lld checks, %lld failed\n", (long long)checks, (long long)failed);
  return failed ? 1 : 0;
}
