// Launchers of the CUDA dispatch kernels (dispatch.cu): raw pointers and a stream, no PyTorch types, so the
// .cu file compiles with nvcc alone. dispatch_cuda.cpp binds them to the torch ops.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deepseek_moe {
namespace cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Device scratch of route_plan for P pairs: E counters, four int32 arrays of P, and the radix sort's temp_bytes
// (route_plan_temp_bytes).
struct RoutePlanScratch {
  unsigned long long* counts;
  int32_t* key_in;
  int32_t* key_out;
  int32_t* pair_in;
  int32_t* pair_out;
  void* temp;
  size_t temp_bytes;
};

size_t route_plan_temp_bytes(int64_t P, int64_t E);

// Stable sort of the P = T·K pairs by expert (the same plan as route_plan_cpu), O(P): counts, a radix sort of
// (expert, pair) and one pass writing pair, token and slot. error_flag: set to 1 when an expert id lies outside
// [0, E).
void route_plan(const int64_t* expert_P, int64_t P, int64_t K, int64_t E, const RoutePlanScratch& scratch,
                int64_t* counts, int64_t* offsets, int64_t* pair, int64_t* token, int64_t* slot, int* error_flag,
                cudaStream_t stream);

// y[t] = Σ_k w[t, k] · o[slot[t, k]] (w may be null: 1), accumulated in fp32 (fp64 for fp64) in slot order.
// error_flag: set to 1 for a slot outside [0, N] (N marks no pair).
void combine(DType dtype, const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T, int64_t K,
             int64_t H, void* y, int* error_flag, cudaStream_t stream);

// grad_o[slot[t, k]] = w[t, k] · grad_y[t]; grad_w[t, k] = <o[slot[t, k]], grad_y[t]> when grad_w is not null;
// error_flag as for combine.
void combine_backward(DType dtype, const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                      int64_t T, int64_t K, int64_t H, void* grad_o, void* grad_w, int* error_flag,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace deepseek_moe
