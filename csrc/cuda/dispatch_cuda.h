// Launchers of the CUDA dispatch kernels (dispatch.cu): raw pointers and a stream, no PyTorch types, so the
// .cu file compiles with nvcc alone. dispatch_cuda.cpp binds them to the torch ops.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deepseek_moe {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Stable counting sort of the P = T·K pairs by expert (see route_plan_cpu). counts_scratch: E zeroed-by-us
// unsigned counters; error_flag: set to 1 when an expert id is outside [0, E).
void route_plan(const int64_t* expert_P, int64_t P, int64_t K, int64_t E, unsigned long long* counts_scratch,
                int64_t* counts, int64_t* offsets, int64_t* pair, int64_t* token, int64_t* slot, int* error_flag,
                cudaStream_t stream);

// out[n] = x[token[n]] for N rows of H elements of element_size bytes (2, 4 or 8).
void permute(const void* x, const int64_t* token, int64_t N, int64_t H, int element_size, void* out,
             cudaStream_t stream);

// y[t] = Σ_k w[t, k] · o[slot[t, k]] (w may be null: 1), accumulated in fp32 (fp64 for fp64) in slot order.
void combine(DType dtype, const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T, int64_t K,
             int64_t H, void* y, cudaStream_t stream);

// grad_o[slot[t, k]] = w[t, k] · grad_y[t]; grad_w[t, k] = <o[slot[t, k]], grad_y[t]> when grad_w is not null.
void combine_backward(DType dtype, const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                      int64_t T, int64_t K, int64_t H, void* grad_o, void* grad_w, cudaStream_t stream);

}  // namespace cuda
}  // namespace deepseek_moe
