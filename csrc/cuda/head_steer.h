// Torch-free launchers of the head_steer CUDA kernels (csrc/cuda/head_steer.cu).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace xlk {

enum SteerDtype : int { kSteerF32 = 0, kSteerF16 = 1, kSteerBF16 = 2 };

struct SteerShape {
  int64_t B, T, H, D;
  int64_t sb, st, sh;         // strides (elements) of o over B, T, H; the last dim is contiguous
  int64_t gate_bs, shift_bs;  // batch strides of the fp32 gate (H)|(B,H) and shift (H,D)|(B,H,D); 0 = unbatched
};

// out (contiguous B,T,H,D) = gate * o + shift, exactly shift where gate == 0. gate/shift may be null.
cudaError_t head_steer_forward(int dtype, const void* o, void* out, const float* gate, const float* shift,
                               SteerShape s, cudaStream_t stream);

// grad (contiguous B,T,H,D). Writes grad_o (contiguous; may be null) = gate*grad (0 where gate == 0) and ADDS
// (atomically, fp32) sum_{t,d} grad*o into grad_gate[b*ggate_bs + h] and sum_t grad into
// grad_shift[b*gshift_bs + h*D + d] (either may be null); those must be zeroed by the caller.
// num_sms sizes the grid (a few blocks per SM).
cudaError_t head_steer_backward(int dtype, const void* grad, const void* o, const float* gate, void* grad_o,
                                float* grad_gate, int64_t ggate_bs, float* grad_shift, int64_t gshift_bs,
                                SteerShape s, int num_sms, cudaStream_t stream);

}  // namespace xlk
