// Torch-free launchers of the glu CUDA kernels (csrc/cuda/glu.cu): out = (act(gate) * mul + add) * up with
// optional fused neuron stats of act(gate) (pre-intervention), and the backward.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace xlk {

enum GluAct : int { kGluSilu = 0, kGluGeluTanh = 1 };
enum GluMode : int { kGluNoIv = 0, kGluPerNeuron = 1, kGluPerGroup = 2 };

struct GluArgs {
  int64_t n = 0, nn = 0, groups = 0;  // rows, neurons, groups (ids outside [-1, groups) act as -1)
  const int64_t* ids = nullptr;       // (n,) or null (every row -1)
  int mode = kGluNoIv;                // intervention: mul/add (nn,) or (groups, nn) fp32; -1 rows untouched
  const float* mul = nullptr;
  const float* add = nullptr;
  int64_t* tokens = nullptr;  // stats (all null: no stats); tokens (groups,), the rest (groups, nn)
  int64_t* positive = nullptr;
  double* sum = nullptr;
  double* sum_sq = nullptr;
  float* max = nullptr;
};

// dtype: 0 f32, 1 f16, 2 bf16 (as NsDtype). gate/up/out (n, nn) contiguous.
cudaError_t glu_forward(int dtype, int act, const void* gate, const void* up, void* out, const GluArgs& a,
                        int num_sms, cudaStream_t stream);

// d up = grad * act'(gate); d gate = grad * up * mul * d act/d gate. All (n, nn) contiguous.
cudaError_t glu_backward(int dtype, int act, const void* grad, const void* gate, const void* up, void* dgate,
                         void* dup, const GluArgs& a, int num_sms, cudaStream_t stream);

}  // namespace xlk
