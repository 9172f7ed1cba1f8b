// Routed experts for a few tokens (decode), CPU: every chosen expert's weights streamed from memory once.
//
// With T <= ~16 tokens the experts' GEMMs are matrix-vector products, bound by reading the weights: a step's
// floor is (bytes of the chosen experts) / (DRAM read bandwidth). Calling a BLAS GEMM per expert pays a parallel
// region, a packing pass and a thread hand-off per expert (SGLang's CPU MoE and llama.cpp stream the rows
// themselves for the same reason). Here one call runs two parallel regions over all experts:
//
//   1. gate/up: threads split the I hidden units; for each chosen expert a thread streams its gate rows
//      [i0, i1) and up rows [I+i0, I+i1) (contiguous in the public (E, 2I, H) layout), dots each with the rows of
//      x of that expert's tokens (they stay in L1/L2), and writes a = act(min(g, L)) · clamp(u, −L, L) · w.
//   2. down: threads split the H output rows; for each expert a thread streams rows [h0, h1) of down (E, H, I),
//      dots each with the pairs' a and adds into its own slice of y (fp32), experts in a fixed order.
//
// No repacking: in the public layouts every row a dot product reads is contiguous. Accumulation is fp32 (double
// for fp64); a 16-bit weight is widened in registers. The AVX-512 dot product is chosen at run time by the CPU's
// capability, with a portable loop otherwise.
//
// Legend: T tokens, H hidden size, I expert hidden size, J = 2·I, E experts, N sorted (token, slot) pairs.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "expert_inputs.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DEEPSEEK_MOE_X86 1
#endif

namespace deepseek_moe {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------ dot products
// dots<R>: out[r] = row_r · v for the R rows base + r·stride (n elements each, in the weights' dtype) and one
// vector v (acc_t). Several rows per call share v's loads and the call's fixed cost (the horizontal sums).

float widen(float v) { return v; }
float widen(at::BFloat16 v) { return static_cast<float>(v); }
float widen(at::Half v) { return static_cast<float>(v); }
double widen(double v) { return v; }

template <int R, typename scalar_t, typename acc_t>
void dots_portable(const scalar_t* base, int64_t stride, const acc_t* v, int64_t n, acc_t* out) {
  for (int r = 0; r < R; ++r) {
    const scalar_t* row = base + r * stride;
    acc_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight partial sums: the compiler vectorises the loop
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int k = 0; k < 8; ++k) acc[k] += widen(row[j + k]) * v[j + k];
    acc_t sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; ++j) sum += widen(row[j]) * v[j];
    out[r] = sum;
  }
}

#ifdef DEEPSEEK_MOE_X86
__attribute__((target("avx512f"))) inline __m512 load16(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  const __m256i bits = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));  // bf16 = fp32's high half
}

// Two accumulators of 16 lanes per row (2·R independent chains: enough loads in flight to stream at the memory's
// rate). ``next``: where the caller reads next (same stride), fetched into cache meanwhile: a row of H fp32 is one
// 4 KiB page, and the hardware prefetcher does not cross pages.
template <int R, typename scalar_t>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dots_avx512(const scalar_t* base, int64_t stride,
                                                                     const float* v, int64_t n, float* out,
                                                                     const scalar_t* next) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const __mmask16 all = 0xFFFF;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);  // elements per cache line
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 v0 = _mm512_loadu_ps(v + j), v1 = _mm512_loadu_ps(v + j + 16);
    for (int r = 0; r < R; ++r) {
      const scalar_t* row = base + r * stride + j;
      for (int64_t l = 0; l < 32; l += kLine)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * stride + j + l), _MM_HINT_T0);
      acc[r][0] = _mm512_fmadd_ps(load16(row, all), v0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(load16(row + 16, all), v1, acc[r][1]);
    }
  }
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? all : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, v + j);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(load16(base + r * stride + j, m), v0, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}
#endif

bool has_avx512() {
#ifdef DEEPSEEK_MOE_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

template <int R, typename scalar_t, typename acc_t>
void dots(const scalar_t* base, int64_t stride, const acc_t* v, int64_t n, acc_t* out, bool avx512,
          const scalar_t* next) {
#ifdef DEEPSEEK_MOE_X86
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)) {
    if (avx512) return dots_avx512<R>(base, stride, v, n, out, next);
  }
#endif
  (void)avx512;
  (void)next;
  dots_portable<R>(base, stride, v, n, out);
}

// ------------------------------------------------------------------------------------ the op
// One GLU expert and the pairs it serves: rows gate[i], up[i] (H each, i < width), down[h] (width each, h < H);
// pair p (count of them from first) reads token token[p], is weighted by weight[p] (1 without weights) and writes
// a[p] (width values from a_offset + p·width).
template <typename scalar_t, typename acc_t>
struct Segment {
  const scalar_t *gate, *up, *down;
  int64_t width, first, count;
  const int64_t* token;
  const acc_t* weight;
  int64_t a_offset;
  int64_t units_before;  // Σ width of the segments before: the segment's place among all gate/up units
};

template <typename acc_t>
acc_t silu(acc_t g) {
  return g / (acc_t(1) + std::exp(-g));
}

// The segments' units [u0, u1) (one unit: a gate row and an up row of one segment) -> a. A thread's range is
// contiguous within each segment, so it streams consecutive rows.
template <typename scalar_t, typename acc_t>
void gate_up_units(const std::vector<Segment<scalar_t, acc_t>>& segments, const acc_t* x, int64_t H, acc_t L,
                   acc_t* a, int64_t u0, int64_t u1, bool avx512) {
  for (const auto& s : segments) {
    const int64_t i0 = std::max(u0 - s.units_before, int64_t(0)), i1 = std::min(u1 - s.units_before, s.width);
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* gate = s.gate + i * H;
      for (int64_t p = s.first; p < s.first + s.count; ++p) {
        acc_t gu[2];  // the gate row and the up row (s.up − s.gate apart) against x_t
        dots<2>(gate, s.up - s.gate, x + s.token[p] * H, H, gu, avx512, gate + H);
        const acc_t g = std::min(gu[0], L), u = std::min(std::max(gu[1], -L), L);
        a[s.a_offset + p * s.width + i] = silu(g) * u * (s.weight ? s.weight[p] : acc_t(1));
      }
    }
  }
}

template <typename scalar_t>
void expert_gemv_impl(const Tensor& x_TH, const Tensor& gate_up, const Tensor& down, const Tensor& token_N,
                      const Tensor& weight_N, const std::vector<int64_t>& counts, std::optional<double> limit,
                      const std::optional<Tensor>& shared_gate, const std::optional<Tensor>& shared_up,
                      const std::optional<Tensor>& shared_down, Tensor& y_TH) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t T = x_TH.size(0), H = x_TH.size(1), I = down.size(2);
  const bool avx512 = has_avx512();
  const acc_t L = limit ? static_cast<acc_t>(*limit) : std::numeric_limits<acc_t>::infinity();
  // x widened once (T·H elements: small), so that every dot reads one weight row and one acc_t vector.
  const Tensor xw = x_TH.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  std::vector<Segment<scalar_t, acc_t>> segments;
  const scalar_t* W1 = gate_up.const_data_ptr<scalar_t>();
  const scalar_t* W2 = down.const_data_ptr<scalar_t>();
  int64_t first = 0, units = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] > 0) {
      const scalar_t* gate = W1 + static_cast<int64_t>(e) * 2 * I * H;
      segments.push_back({gate, gate + I * H, W2 + static_cast<int64_t>(e) * H * I, I, first, counts[e],
                          token_N.const_data_ptr<int64_t>(), weight_N.const_data_ptr<acc_t>(), 0, units});
      units += I;
    }
    first += counts[e];
  }
  int64_t a_size = first * I;
  Tensor every_token;  // outlives the segments that point into it
  if (shared_gate) {  // the shared experts: one more GLU, every token, weight 1, its a after the routed pairs'
    const int64_t Is = shared_gate->size(0);
    every_token = at::arange(T, token_N.options());
    segments.push_back({shared_gate->const_data_ptr<scalar_t>(), shared_up->const_data_ptr<scalar_t>(),
                        shared_down->const_data_ptr<scalar_t>(), Is, 0, T, every_token.const_data_ptr<int64_t>(),
                        nullptr, a_size, units});
    units += Is;
    a_size += T * Is;
  }
  std::vector<acc_t> a(static_cast<size_t>(a_size));
  const acc_t* x = xw.const_data_ptr<acc_t>();
  // Grains: a thread's share of rows should be large enough to stream (a few KB per expert), and both threads of
  // a small machine busy.
  at::parallel_for(0, units, 16, [&](int64_t u0, int64_t u1) {
    gate_up_units(segments, x, H, L, a.data(), u0, u1, avx512);
  });
  acc_t* y = y_TH.mutable_data_ptr<acc_t>();
  at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {
    constexpr int kRows = 4;  // down rows per call
    for (const auto& s : segments) {
      int64_t h = h0;
      for (; h + kRows <= h1; h += kRows) {
        const scalar_t* rows = s.down + h * s.width;
        for (int64_t p = s.first; p < s.first + s.count; ++p) {
          acc_t out[kRows];
          dots<kRows>(rows, s.width, a.data() + s.a_offset + p * s.width, s.width, out, avx512,
                      rows + kRows * s.width);
          for (int r = 0; r < kRows; ++r) y[s.token[p] * H + h + r] += out[r];
        }
      }
      for (; h < h1; ++h) {
        const scalar_t* row = s.down + h * s.width;
        for (int64_t p = s.first; p < s.first + s.count; ++p) {
          acc_t out[1];
          dots<1>(row, s.width, a.data() + s.a_offset + p * s.width, s.width, out, avx512, row + s.width);
          y[s.token[p] * H + h] += out[0];
        }
      }
    }
  });
}

void check_weights(const Tensor& x, const Tensor& w, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type() && w.device() == x.device(),
              "expert_gemv: ", name, " must be a contiguous (", rows, ", ", cols, ") tensor of x's dtype, got ",
              w.sizes(), " ", w.scalar_type());
}

}  // namespace

Tensor expert_gemv_cpu(const Tensor& x_in, const Tensor& gate_up_in, const Tensor& down_in, const Tensor& token_in,
                       const Tensor& weight_in, const Tensor& counts_E, std::optional<double> limit,
                       const std::optional<Tensor>& shared_gate, const std::optional<Tensor>& shared_up,
                       const std::optional<Tensor>& shared_down) {
  check_expert_inputs("expert_gemv", x_in, gate_up_in, down_in, token_in, weight_in, counts_E);
  const int64_t H = x_in.size(1), E = gate_up_in.size(0);
  const auto acc = at::toOpMathType(x_in.scalar_type());
  TORCH_CHECK(shared_gate.has_value() == shared_up.has_value() && shared_up.has_value() == shared_down.has_value(),
              "expert_gemv: pass all three shared-expert weights or none");
  if (shared_gate) {
    const int64_t Is = shared_gate->size(0);
    check_weights(x_in, *shared_gate, "shared_gate", Is, H);
    check_weights(x_in, *shared_up, "shared_up", Is, H);
    check_weights(x_in, *shared_down, "shared_down", H, Is);
  }
  const Tensor x_TH = x_in.contiguous(), gate_up = gate_up_in.contiguous(), down = down_in.contiguous();
  const Tensor token_N = token_in.contiguous(), weight_N = weight_in.contiguous();
  const Tensor counts_cpu = counts_E.to(at::kCPU, at::kLong).contiguous();
  const std::vector<int64_t> counts(counts_cpu.const_data_ptr<int64_t>(), counts_cpu.const_data_ptr<int64_t>() + E);
  int64_t pairs = 0;
  for (int64_t n : counts) pairs += n;
  TORCH_CHECK(pairs == token_N.size(0), "expert_gemv: counts_E sum to ", pairs, ", token_N has ", token_N.size(0));
  Tensor y_TH = at::zeros({x_TH.size(0), H}, x_TH.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_TH.scalar_type(), "expert_gemv", [&] {
    expert_gemv_impl<scalar_t>(x_TH, gate_up, down, token_N, weight_N, counts, limit, shared_gate, shared_up,
                               shared_down, y_TH);
  });
  return y_TH.to(x_TH.scalar_type());
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("expert_gemv", &expert_gemv_cpu);
}

}  // namespace deepseek_moe
