// Dispatch on CUDA: the same ops, results and bounds checks as csrc/cpu/dispatch.cpp (route_plan, combine).
//
// Plain CUDA (no PyTorch headers): the launchers take raw pointers and a stream, and dispatch_cuda.cpp binds
// them to the torch ops. So this file compiles with nvcc alone, which CI does where nvcc exists.
//
// Legend: T tokens, K slots per token, P = T·K pairs (p = t·K + k), E experts, N sorted pairs, H hidden size.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cub/device/device_radix_sort.cuh>

#include "dispatch_cuda.h"

namespace deepseek_moe {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline float to_acc(float v) { return v; }
__device__ inline double to_acc(double v) { return v; }
__device__ inline float to_acc(__half v) { return __half2float(v); }
__device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ inline T from_acc(float v);
template <>
__device__ inline float from_acc<float>(float v) { return v; }
template <>
__device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Acc { using type = float; };
template <>
struct Acc<double> { using type = double; };

template <typename T, typename A>
__device__ inline T store_cast(A v) { return from_acc<T>(v); }
template <>
__device__ inline double store_cast<double, double>(double v) { return v; }


// counts[e] = number of pairs routed to e, and the radix sort's input (key = expert, value = pair id). An
// out-of-range id raises the error flag and gets key E, so it sorts after every real pair.
__global__ void keys_kernel(const int64_t* expert_P, int64_t P, int64_t E, int32_t* key_P, int32_t* pair_P,
                            unsigned long long* counts, int* error_flag) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = expert_P[p];
    const bool bad = e < 0 || e >= E;
    if (bad) {
      atomicExch(error_flag, 1);
    } else {
      atomicAdd(counts + e, 1ULL);
    }
    key_P[p] = static_cast<int32_t>(bad ? E : e);
    pair_P[p] = static_cast<int32_t>(p);
  }
}

// Exclusive scan of the E counts (one thread: E is small), written as int64 counts and offsets.
__global__ void offsets_kernel(const unsigned long long* counts_u, int64_t E, int64_t* counts, int64_t* offsets) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t running = 0;
  for (int64_t e = 0; e < E; ++e) {
    offsets[e] = running;
    counts[e] = static_cast<int64_t>(counts_u[e]);
    running += counts[e];
  }
  offsets[E] = running;
}

// From the pair ids in expert order: pair, token and the inverse map slot.
__global__ void plan_kernel(const int32_t* sorted_pair_P, int64_t P, int64_t K, int64_t* pair, int64_t* token,
                            int64_t* slot) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < P; n += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = sorted_pair_P[n];
    pair[n] = p;
    token[n] = p / K;
    slot[p] = n;
  }
}

// y[t] = Σ_k w[t, k] · o[slot[t, k]] in slot order (w = 1 without weight); slot == N (no pair) adds nothing, and a
// slot outside [0, N] raises the error flag, as the CPU op raises.
template <typename T>
__global__ void combine_kernel(const T* o, const int64_t* slot, const typename Acc<T>::type* w, int64_t N,
                               int64_t T_, int64_t K, int64_t H, T* y, int* error_flag) {
  using A = typename Acc<T>::type;
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    if (threadIdx.x == 0) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = slot[t * K + k];
        if (n < 0 || n > N) atomicExch(error_flag, 1);
      }
    }
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      A acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = slot[t * K + k];
        if (n < 0 || n >= N) continue;
        const A v = to_acc(o[n * H + h]);
        acc += w ? w[t * K + k] * v : v;
      }
      y[t * H + h] = store_cast<T, A>(acc);
    }
  }
}

// grad_o[slot[t, k]] = w[t, k] · grad_y[t]; grad_w[t, k] = <o[slot[t, k]], grad_y[t]> (block reduction); the
// same bounds check as combine_kernel.
template <typename T>
__global__ void combine_backward_kernel(const T* grad_y, const T* o, const int64_t* slot,
                                        const typename Acc<T>::type* w, int64_t N, int64_t T_, int64_t K,
                                        int64_t H, T* grad_o, typename Acc<T>::type* grad_w, int* error_flag) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads];
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = slot[t * K + k];
      const bool kept = n >= 0 && n < N;
      if (threadIdx.x == 0 && (n < 0 || n > N)) atomicExch(error_flag, 1);
      A dot = 0;
      if (kept) {
        const A wk = w ? w[t * K + k] : A(1);
        for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
          const A g = to_acc(grad_y[t * H + h]);
          if (w) dot += to_acc(o[n * H + h]) * g;
          grad_o[n * H + h] = store_cast<T, A>(wk * g);
        }
      }
      if (grad_w) {
        partial[threadIdx.x] = dot;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
          if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
          __syncthreads();
        }
        if (threadIdx.x == 0) grad_w[t * K + k] = kept ? partial[0] : A(0);
        __syncthreads();
      }
    }
  }
}

int blocks_for(int64_t rows) { return static_cast<int>(rows < 65535 ? (rows > 0 ? rows : 1) : 65535); }

// Key bits of the radix sort: keys lie in [0, E], E marking an out-of-range id.
int key_bits(int64_t E) {
  int bits = 1;
  while ((int64_t(1) << bits) <= E) ++bits;
  return bits;
}

template <typename T>
void combine_typed(const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T_, int64_t K, int64_t H,
                   void* y, int* error_flag, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  combine_kernel<T><<<blocks_for(T_), kThreads, 0, stream>>>(static_cast<const T*>(o), slot, static_cast<const A*>(w),
                                                             N, T_, K, H, static_cast<T*>(y), error_flag);
}

template <typename T>
void combine_backward_typed(const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                            int64_t T_, int64_t K, int64_t H, void* grad_o, void* grad_w, int* error_flag,
                            cudaStream_t stream) {
  using A = typename Acc<T>::type;
  combine_backward_kernel<T><<<blocks_for(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(o), slot, static_cast<const A*>(w), N, T_, K, H,
      static_cast<T*>(grad_o), static_cast<A*>(grad_w), error_flag);
}

}  // namespace

size_t route_plan_temp_bytes(int64_t P, int64_t E) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                  static_cast<int>(P), 0, key_bits(E));
  return bytes;
}

void route_plan(const int64_t* expert_P, int64_t P, int64_t K, int64_t E, const RoutePlanScratch& scratch,
                int64_t* counts, int64_t* offsets, int64_t* pair, int64_t* token, int64_t* slot, int* error_flag,
                cudaStream_t stream) {
  cudaMemsetAsync(scratch.counts, 0, E * sizeof(unsigned long long), stream);
  cudaMemsetAsync(error_flag, 0, sizeof(int), stream);
  const int blocks = blocks_for((P + kThreads - 1) / kThreads);
  if (P > 0) {
    keys_kernel<<<blocks, kThreads, 0, stream>>>(expert_P, P, E, scratch.key_in, scratch.pair_in, scratch.counts,
                                                 error_flag);
    // A stable LSD radix sort on the key bits: O(P) work, and the pairs of one expert stay in pair order.
    size_t bytes = scratch.temp_bytes;
    cub::DeviceRadixSort::SortPairs(scratch.temp, bytes, scratch.key_in, scratch.key_out, scratch.pair_in,
                                    scratch.pair_out, static_cast<int>(P), 0, key_bits(E), stream);
  }
  offsets_kernel<<<1, 1, 0, stream>>>(scratch.counts, E, counts, offsets);
  if (P > 0) plan_kernel<<<blocks, kThreads, 0, stream>>>(scratch.pair_out, P, K, pair, token, slot);
}

void combine(DType dtype, const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T_, int64_t K,
             int64_t H, void* y, int* error_flag, cudaStream_t stream) {
  cudaMemsetAsync(error_flag, 0, sizeof(int), stream);
  if (T_ == 0 || H == 0) return;
  switch (dtype) {
    case DType::kFloat32: combine_typed<float>(o, slot, w, N, T_, K, H, y, error_flag, stream); break;
    case DType::kFloat64: combine_typed<double>(o, slot, w, N, T_, K, H, y, error_flag, stream); break;
    case DType::kFloat16: combine_typed<__half>(o, slot, w, N, T_, K, H, y, error_flag, stream); break;
    case DType::kBFloat16: combine_typed<__nv_bfloat16>(o, slot, w, N, T_, K, H, y, error_flag, stream); break;
  }
}

void combine_backward(DType dtype, const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                      int64_t T_, int64_t K, int64_t H, void* grad_o, void* grad_w, int* error_flag,
                      cudaStream_t stream) {
  cudaMemsetAsync(error_flag, 0, sizeof(int), stream);
  if (T_ == 0) return;
  switch (dtype) {
    case DType::kFloat32: combine_backward_typed<float>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, error_flag, stream); break;
    case DType::kFloat64: combine_backward_typed<double>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, error_flag, stream); break;
    case DType::kFloat16: combine_backward_typed<__half>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, error_flag, stream); break;
    case DType::kBFloat16: combine_backward_typed<__nv_bfloat16>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, error_flag, stream); break;
  }
}

}  // namespace cuda
}  // namespace deepseek_moe
