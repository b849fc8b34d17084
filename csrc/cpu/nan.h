#pragma once
// NaN policy of the CPU kernels' running max.
#include <limits>

namespace xlk {

// Max that keeps NaN, stored as the canonical quiet NaN 0x7fc00000: the GPU kernels' ordered-int atomics rank that
// bit pattern above every number, while x86 arithmetic makes a negative NaN (0xffc00000) that they would rank below.
inline float max_keep_nan(float m, float v) {
  return v != v ? std::numeric_limits<float>::quiet_NaN() : (v > m ? v : m);
}

}  // namespace xlk
