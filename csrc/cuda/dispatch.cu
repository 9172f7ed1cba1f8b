// Dispatch data movement on CUDA: the same ops and results as csrc/cpu/dispatch.cpp.
//
// Plain CUDA (no PyTorch headers): the launchers take raw pointers and a stream, and dispatch_cuda.cpp binds
// them to the torch ops. So this file compiles with nvcc alone, which CI does where nvcc exists.
//
// Legend: T tokens, K slots per token, P = T·K pairs (p = t·K + k), E experts, N sorted pairs, H hidden size.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

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

// counts[e] = number of pairs routed to e; flags an out-of-range id.
__global__ void count_kernel(const int64_t* expert_P, int64_t P, int64_t E, unsigned long long* counts,
                             int* error_flag) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < P; p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = expert_P[p];
    if (e < 0 || e >= E) {
      atomicExch(error_flag, 1);
      continue;
    }
    atomicAdd(counts + e, 1ULL);
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

// One block per expert: walks all pairs in order, a block-wide prefix count gives each matching pair its rank,
// so the order within an expert is the pair order (stable, deterministic, no atomics).
__global__ void rank_kernel(const int64_t* expert_P, int64_t P, int64_t K, const int64_t* offsets, int64_t* pair,
                            int64_t* token, int64_t* slot) {
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int64_t base;
  const int64_t e = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (threadIdx.x == 0) base = offsets[e];
  __syncthreads();
  for (int64_t start = 0; start < P; start += kThreads) {
    const int64_t p = start + threadIdx.x;
    const bool match = p < P && expert_P[p] == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, match);
    const int before_in_warp = __popc(ballot & ((1u << lane) - 1u));
    if (lane == 0) warp_sums[warp] = __popc(ballot);
    __syncthreads();
    int before = before_in_warp;
    int total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      if (w < warp) before += warp_sums[w];
      total += warp_sums[w];
    }
    if (match) {
      const int64_t pos = base + before;
      pair[pos] = p;
      token[pos] = p / K;
      slot[p] = pos;
    }
    __syncthreads();
    if (threadIdx.x == 0) base += total;
    __syncthreads();
  }
}

template <typename T>
__global__ void permute_kernel(const T* x, const int64_t* token, int64_t N, int64_t H, T* out) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const T* src = x + token[n] * H;
    T* dst = out + n * H;
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[h] = src[h];
  }
}

// y[t] = Σ_k w[t, k] · o[slot[t, k]] in slot order (w = 1 without weight); slot outside [0, N) adds nothing.
template <typename T>
__global__ void combine_kernel(const T* o, const int64_t* slot, const typename Acc<T>::type* w, int64_t N,
                               int64_t T_, int64_t K, int64_t H, T* y) {
  using A = typename Acc<T>::type;
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
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

// grad_o[slot[t, k]] = w[t, k] · grad_y[t]; grad_w[t, k] = <o[slot[t, k]], grad_y[t]> (block reduction).
template <typename T>
__global__ void combine_backward_kernel(const T* grad_y, const T* o, const int64_t* slot,
                                        const typename Acc<T>::type* w, int64_t N, int64_t T_, int64_t K,
                                        int64_t H, T* grad_o, typename Acc<T>::type* grad_w) {
  using A = typename Acc<T>::type;
  __shared__ A partial[kThreads];
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = slot[t * K + k];
      const bool kept = n >= 0 && n < N;
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

}  // namespace

void route_plan(const int64_t* expert_P, int64_t P, int64_t K, int64_t E, unsigned long long* counts_scratch,
                int64_t* counts, int64_t* offsets, int64_t* pair, int64_t* token, int64_t* slot, int* error_flag,
                cudaStream_t stream) {
  cudaMemsetAsync(counts_scratch, 0, E * sizeof(unsigned long long), stream);
  cudaMemsetAsync(error_flag, 0, sizeof(int), stream);
  if (P > 0) count_kernel<<<blocks_for((P + kThreads - 1) / kThreads), kThreads, 0, stream>>>(expert_P, P, E, counts_scratch, error_flag);
  offsets_kernel<<<1, 1, 0, stream>>>(counts_scratch, E, counts, offsets);
  if (P > 0) rank_kernel<<<static_cast<unsigned>(E), kThreads, 0, stream>>>(expert_P, P, K, offsets, pair, token, slot);
}

void permute(const void* x, const int64_t* token, int64_t N, int64_t H, int element_size, void* out,
             cudaStream_t stream) {
  if (N == 0 || H == 0) return;
  const int blocks = blocks_for(N);
  switch (element_size) {
    case 2: permute_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint16_t*>(x), token, N, H, static_cast<uint16_t*>(out)); break;
    case 4: permute_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint32_t*>(x), token, N, H, static_cast<uint32_t*>(out)); break;
    case 8: permute_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const uint64_t*>(x), token, N, H, static_cast<uint64_t*>(out)); break;
    default: break;
  }
}

template <typename T>
static void combine_typed(const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T_, int64_t K,
                          int64_t H, void* y, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  combine_kernel<T><<<blocks_for(T_), kThreads, 0, stream>>>(static_cast<const T*>(o), slot,
                                                             static_cast<const A*>(w), N, T_, K, H, static_cast<T*>(y));
}

template <typename T>
static void combine_backward_typed(const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                                   int64_t T_, int64_t K, int64_t H, void* grad_o, void* grad_w,
                                   cudaStream_t stream) {
  using A = typename Acc<T>::type;
  combine_backward_kernel<T><<<blocks_for(T_), kThreads, 0, stream>>>(
      static_cast<const T*>(grad_y), static_cast<const T*>(o), slot, static_cast<const A*>(w), N, T_, K, H,
      static_cast<T*>(grad_o), static_cast<A*>(grad_w));
}

void combine(DType dtype, const void* o, const int64_t* slot, const void* w, int64_t N, int64_t T_, int64_t K,
             int64_t H, void* y, cudaStream_t stream) {
  if (T_ == 0 || H == 0) return;
  switch (dtype) {
    case DType::kFloat32: combine_typed<float>(o, slot, w, N, T_, K, H, y, stream); break;
    case DType::kFloat64: combine_typed<double>(o, slot, w, N, T_, K, H, y, stream); break;
    case DType::kFloat16: combine_typed<__half>(o, slot, w, N, T_, K, H, y, stream); break;
    case DType::kBFloat16: combine_typed<__nv_bfloat16>(o, slot, w, N, T_, K, H, y, stream); break;
  }
}

void combine_backward(DType dtype, const void* grad_y, const void* o, const int64_t* slot, const void* w, int64_t N,
                      int64_t T_, int64_t K, int64_t H, void* grad_o, void* grad_w, cudaStream_t stream) {
  if (T_ == 0) return;
  switch (dtype) {
    case DType::kFloat32: combine_backward_typed<float>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, stream); break;
    case DType::kFloat64: combine_backward_typed<double>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, stream); break;
    case DType::kFloat16: combine_backward_typed<__half>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, stream); break;
    case DType::kBFloat16: combine_backward_typed<__nv_bfloat16>(grad_y, o, slot, w, N, T_, K, H, grad_o, grad_w, stream); break;
  }
}

}  // namespace cuda
}  // namespace deepseek_moe
