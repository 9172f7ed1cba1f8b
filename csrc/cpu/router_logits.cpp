// The router's gate GEMM for a decode step on the CPU: logits = x · weightᵀ in fp32.
//
// ATen's linear (MKL's sgemm) splits its work by the thread count: on 2 threads its logits for 7 tokens differed
// from 1 thread's in the last bits, so a step cannot move it to the calling thread without changing the bits a
// choice is made from; and its parallel region, on a CPU shared with another busy process, leaves OpenMP's threads
// spinning into the experts' pass (docs/benchmarks.md: a decode step of 16 tokens ran at 27.6 calls per second
// beside the load with it, 43.2 with the gate GEMM on the calling thread). Here each logit is one accumulator of
// vector lanes over H in order, its lanes summed in a fixed order, then the last H mod (lanes) products in order:
// the same arithmetic whichever block of rows and tokens computes it, so the bits do not depend on the thread
// count or on the other tokens of the batch. A step's gate GEMM runs on the calling thread below kThreadMacs.
//
// Blocks of R weight rows by U tokens share each load (R·U accumulators: 12 of AVX2's 16 registers at 4 × 3); a
// block of 4 rows (16 KiB at H = 1024) serves every token from L1/L2 after one pass from memory.
//
// Legend: T tokens, E experts, H hidden size.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "avx2_math.h"
#include "cpu_features.h"
#include "inference_ops.h"
#include "shared_cpu.h"

namespace deepseek_moe {
namespace {

using at::Tensor;

// Gate GEMMs of at least this many multiply-adds run on threads; smaller ones (a decode step of a layer of
// DeepSeekMoE-16B's size, T = 16, H = 2048, E = 64, is 2.1 M) take tens of microseconds on the calling thread, less
// than a parallel region costs on a CPU shared with another busy process.
constexpr int64_t kThreadMacs = int64_t(1) << 22;
constexpr int kRows = 4, kTokens = 3;

// out[u·ld + r] = w_r · x_u for R rows of w and U rows of x (H floats each, rows H apart). Eight partial sums per
// logit (the compiler's vectors on any CPU; no FMA at the baseline ISA, so none is contracted).
template <int R, int U>
void block_portable(const float* w, const float* x, int64_t H, float* out, int64_t ld) {
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) {
      const float* a = w + r * H;
      const float* b = x + u * H;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t j = 0;
      for (; j + 8 <= H; j += 8)
        for (int k = 0; k < 8; ++k) acc[k] += a[j + k] * b[j + k];
      float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; j < H; ++j) sum += a[j] * b[j];
      out[u * ld + r] = sum;
    }
  }
}

#ifdef DEEPSEEK_MOE_X86
// ``next``: the next block's rows, fetched into cache meanwhile (the hardware prefetcher does not cross the 4 KiB
// pages a row of H fp32 spans).
template <int R, int U>
__attribute__((target("avx2,fma"))) void block_avx2(const float* w, const float* x, int64_t H, float* out,
                                                   int64_t ld, const float* next) {
  __m256 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * H + j), _MM_HINT_T0);
    for (int64_t k = j; k < j + 16; k += 8) {
      __m256 xv[U];
      for (int u = 0; u < U; ++u) xv[u] = _mm256_loadu_ps(x + u * H + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + r * H + k);
        for (int u = 0; u < U; ++u) acc[r][u] = _mm256_fmadd_ps(wv, xv[u], acc[r][u]);
      }
    }
  }
  for (; j + 8 <= H; j += 8) {
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + r * H + j);
      for (int u = 0; u < U; ++u) acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + u * H + j), acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 0; u < U; ++u) {
      float sum = sum8(acc[r][u]);
      for (int64_t k = j; k < H; ++k) sum = __builtin_fmaf(w[r * H + k], x[u * H + k], sum);
      out[u * ld + r] = sum;
    }
  }
}

template <int R, int U>
__attribute__((target("avx512f"))) void block_avx512(const float* w, const float* x, int64_t H, float* out,
                                                     int64_t ld, const float* next) {
  __m512 acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * H + j), _MM_HINT_T0);
    __m512 xv[U];
    for (int u = 0; u < U; ++u) xv[u] = _mm512_loadu_ps(x + u * H + j);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * H + j);
      for (int u = 0; u < U; ++u) acc[r][u] = _mm512_fmadd_ps(wv, xv[u], acc[r][u]);
    }
  }
  if (j < H) {  // masked lanes add +0: the same sum as without them
    const __mmask16 m = static_cast<__mmask16>((1u << (H - j)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, w + r * H + j);
      for (int u = 0; u < U; ++u)
        acc[r][u] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + u * H + j), acc[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) out[u * ld + r] = _mm512_reduce_add_ps(acc[r][u]);
}
#endif

template <int R, int U>
void block(Isa isa, const float* w, const float* x, int64_t H, float* out, int64_t ld, const float* next) {
#ifdef DEEPSEEK_MOE_X86
  if (isa == Isa::avx512) return block_avx512<R, U>(w, x, H, out, ld, next);
  if (isa == Isa::avx2) return block_avx2<R, U>(w, x, H, out, ld, next);
#endif
  (void)isa;
  (void)next;
  block_portable<R, U>(w, x, H, out, ld);
}

template <int R>
void block_rows(int64_t tokens, Isa isa, const float* w, const float* x, int64_t H, float* out, int64_t ld,
                const float* next) {
  static_assert(kTokens == 3);
  if (tokens == 3) return block<R, 3>(isa, w, x, H, out, ld, next);
  if (tokens == 2) return block<R, 2>(isa, w, x, H, out, ld, next);
  block<R, 1>(isa, w, x, H, out, ld, next);
}

}  // namespace

Tensor router_logits_cpu(const Tensor& x_in, const Tensor& weight_in) {
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat && weight_in.dim() == 2,
              "router_logits: weight must be (E, H) float32, got ", weight_in.scalar_type(), " ", weight_in.sizes());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == weight_in.size(1), "router_logits: x must be (T, H) with H = ",
              weight_in.size(1), ", got ", x_in.sizes());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "router_logits: x must be float32, bfloat16 or float16 (the gate GEMM is fp32), got ", dtype);
  const Tensor x_TH = x_in.to(at::kFloat).contiguous(), weight_EH = weight_in.contiguous();  // 16 -> 32 bits: exact
  const int64_t T = x_TH.size(0), H = x_TH.size(1), E = weight_EH.size(0);
  Tensor logits_TE = at::empty({T, E}, x_TH.options());
  const float* x = x_TH.const_data_ptr<float>();
  const float* w = weight_EH.const_data_ptr<float>();
  float* logits = logits_TE.mutable_data_ptr<float>();
  const Isa isa = cpu_isa();
  constexpr int64_t kItemRows = 16;  // the rows of one item the threads share
  const bool alone = T * E * H < kThreadMacs || decode_watch().solo(steady_ns());
  run_shares((E + kItemRows - 1) / kItemRows, alone, [&](int64_t item) {
    const int64_t e1 = std::min(E, (item + 1) * kItemRows);
    for (int64_t e = item * kItemRows; e < e1; e += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, e1 - e);
      const float* base = w + e * H;
      const float* next = base + rows * H;
      for (int64_t t = 0; t < T; t += kTokens) {
        const int64_t tokens = std::min<int64_t>(kTokens, T - t);
        float* out = logits + t * E + e;
        switch (rows) {
          case 4: block_rows<4>(tokens, isa, base, x + t * H, H, out, E, next); break;
          case 3: block_rows<3>(tokens, isa, base, x + t * H, H, out, E, next); break;
          case 2: block_rows<2>(tokens, isa, base, x + t * H, H, out, E, next); break;
          default: block_rows<1>(tokens, isa, base, x + t * H, H, out, E, next);
        }
      }
    }
  });
  return logits_TE;
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("router_logits", &router_logits_cpu);
}

}  // namespace deepseek_moe
