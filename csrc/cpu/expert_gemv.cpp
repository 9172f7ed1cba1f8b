// Routed experts for a few tokens (decode), CPU: every chosen expert's weights streamed from memory once.
//
// With T <= ~16 tokens the experts' GEMMs are matrix-vector products, bound by reading the weights: a step's
// floor is (bytes of the chosen experts) / (DRAM read bandwidth). Calling a BLAS GEMM per expert pays a parallel
// region, a packing pass and a thread hand-off per expert (SGLang's CPU MoE and llama.cpp stream the rows
// themselves for the same reason). Here one call runs two parallel regions over all experts:
//
//   1. gate/up: threads share the I hidden units of every segment in items of 32; for an item's units i of a
//      chosen expert a thread streams its gate rows and up rows I + i (contiguous in the public (E, 2I, H) layout),
//      dots each with the rows of x of that expert's tokens (three at a time with AVX2; a segment of many pairs
//      in blocks whose x rows stay in L2: pair_block), and writes a = act(min(g, L)) · clamp(u, −L, L) · w.
//   2. down: threads share the H output rows in items of 32; for each expert a thread streams the item's rows of
//      down (E, H, I), dots each with the pairs' a and adds into those rows of y (fp32), experts in a fixed order.
//
// Each thread streams its contiguous share of the items, then takes what is left of the others' (shared_cpu.h).
// On a CPU shared with other busy processes the op runs on the calling thread alone for a while (same file).
//
// With AVX2, an expert that serves one pair (every expert at T = 1) is read in ascending addresses, a row at a
// time, and left to the hardware prefetcher; otherwise (several pairs, or AVX-512) the down rows go 4 at a time and
// the next rows are fetched ahead (streams_alone: the measurements). No repacking: in the public layouts every row
// a dot product reads is contiguous. Accumulation is fp32 (double for fp64); a 16-bit weight is widened in
// registers. The AVX-512 dot product is chosen at run time by the CPU's capability (AVX2 + FMA on the CPUs without
// it), with a portable loop otherwise.
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

#include "avx2_math.h"
#include "cpu_features.h"
#include "expert_segments.h"
#include "inference_ops.h"
#include "shared_cpu.h"

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
// rate). ``next``: where the caller reads next (same stride), fetched into cache meanwhile (a row of H fp32 is one
// 4 KiB page, and the hardware prefetcher does not cross pages); null: nothing fetched ahead.
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
      if (next)
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
// The same for AVX2 + FMA (8 lanes; no masked 16-bit loads, so the tail under 8 elements is scalar).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2,fma"))) inline __m256 load8(const at::BFloat16* p) {
  return widen8(p);
}

// Two accumulators of 8 lanes per row (at R = 4, 8 of the 16 ymm registers, the 4 of v beside them).
template <int R, typename scalar_t>
__attribute__((target("avx2,fma"))) void dots_avx2(const scalar_t* base, int64_t stride, const float* v, int64_t n,
                                                   float* out, const scalar_t* next) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256 v0 = _mm256_loadu_ps(v + j), v1 = _mm256_loadu_ps(v + j + 8);
    const __m256 v2 = _mm256_loadu_ps(v + j + 16), v3 = _mm256_loadu_ps(v + j + 24);
    for (int r = 0; r < R; ++r) {
      const scalar_t* row = base + r * stride + j;
      if (next)
        for (int64_t l = 0; l < 32; l += kLine)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * stride + j + l), _MM_HINT_T0);
      acc[r][0] = _mm256_fmadd_ps(load8(row), v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(load8(row + 8), v1, acc[r][1]);
      acc[r][0] = _mm256_fmadd_ps(load8(row + 16), v2, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(load8(row + 24), v3, acc[r][1]);
    }
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 v0 = _mm256_loadu_ps(v + j);
    for (int r = 0; r < R; ++r) acc[r][0] = _mm256_fmadd_ps(load8(base + r * stride + j), v0, acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    float sum = sum8(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t k = j; k < n; ++k) sum += widen(base[r * stride + k]) * v[k];
    out[r] = sum;
  }
}

// dots_avx2<R> for U vectors at once: out[u·R + r] = row_r · v[u], every output the same sum as dots_avx2<R> on
// v[u] alone (its two accumulators take the same chunks in the same order, then the same horizontal sum and tail),
// each weight load serving U vectors. dots_avx2<2> keeps 4 FMA chains in flight, which the FMA latency bounds at
// well under the 2 FMAs a cycle Zen 3 can issue; here 2·R·U (12 at R = 2, U = 3: with the R weights and one
// vector, 15 of the 16 ymm registers).
template <int R, int U, typename scalar_t>
__attribute__((target("avx2,fma"))) void dots_many_avx2(const scalar_t* base, int64_t stride,
                                                        const float* const* v, int64_t n, float* out,
                                                        const scalar_t* next) {
  __m256 acc[U][R][2];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    if (next)
      for (int r = 0; r < R; ++r)
        for (int64_t l = 0; l < 32; l += kLine)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * stride + j + l), _MM_HINT_T0);
    for (int c = 0; c < 4; ++c) {  // chunk c of 8 goes to accumulator c % 2, as in dots_avx2
      __m256 w[R];
      for (int r = 0; r < R; ++r) w[r] = load8(base + r * stride + j + 8 * c);
      for (int u = 0; u < U; ++u) {
        const __m256 x = _mm256_loadu_ps(v[u] + j + 8 * c);
        for (int r = 0; r < R; ++r) acc[u][r][c & 1] = _mm256_fmadd_ps(w[r], x, acc[u][r][c & 1]);
      }
    }
  }
  for (; j + 8 <= n; j += 8) {
    __m256 w[R];
    for (int r = 0; r < R; ++r) w[r] = load8(base + r * stride + j);
    for (int u = 0; u < U; ++u) {
      const __m256 x = _mm256_loadu_ps(v[u] + j);
      for (int r = 0; r < R; ++r) acc[u][r][0] = _mm256_fmadd_ps(w[r], x, acc[u][r][0]);
    }
  }
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r) {
      float sum = sum8(_mm256_add_ps(acc[u][r][0], acc[u][r][1]));
      for (int64_t k = j; k < n; ++k) sum += widen(base[r * stride + k]) * v[u][k];
      out[u * R + r] = sum;
    }
}
#endif

template <int R, typename scalar_t, typename acc_t>
void dots(const scalar_t* base, int64_t stride, const acc_t* v, int64_t n, acc_t* out, Isa isa,
          const scalar_t* next) {
#ifdef DEEPSEEK_MOE_X86
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)) {
    if (isa == Isa::avx512) return dots_avx512<R>(base, stride, v, n, out, next);
    if (isa == Isa::avx2) return dots_avx2<R>(base, stride, v, n, out, next);
  }
#endif
  (void)isa;
  (void)next;
  dots_portable<R>(base, stride, v, n, out);
}

// dots<R> of U vectors: out[u·R + r] = row_r · v[u], the same bits as U calls of dots<R>.
template <int R, int U, typename scalar_t, typename acc_t>
void dots_many(const scalar_t* base, int64_t stride, const acc_t* const* v, int64_t n, acc_t* out, Isa isa,
               const scalar_t* next) {
#ifdef DEEPSEEK_MOE_X86
  if constexpr (std::is_same_v<acc_t, float> &&
                (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>)) {
    if (isa == Isa::avx2) return dots_many_avx2<R, U>(base, stride, v, n, out, next);
  }
#endif
  for (int u = 0; u < U; ++u) dots<R>(base, stride, v[u], n, out + u * R, isa, u == 0 ? next : nullptr);
}

// ------------------------------------------------------------------------------------ the op
// Where a segment's values of a start (a_offset + p·width for its pair p) and its place among all gate/up units
// (Σ width of the segments before it).
struct Placement {
  int64_t a_offset, units_before;
};

// Whether a segment's rows are read by one pair only and left to the hardware prefetcher, one row at a time in
// ascending addresses (no fetch ahead; down one row per dots call). Measured on AVX2 (AMD Zen 3; H = 1024,
// 64 x 352 + 2 shared, top-6, cold weights; docs/benchmarks.md): a decode step's op 0.76x the time of the
// interleaved rows with fetches ahead in fp32 and 0.93x in bf16 at T = 1 (one thread; two: 0.77x, 0.94x), 0.84x /
// 0.93x at T = 4, 0.91x / 1.02x at T = 16. A segment of several pairs keeps the fetch ahead: its rows are read
// again from cache by the next pairs while the next rows come in (bf16 T = 16 without it: 1.08x). The AVX-512 path
// has not been measured this way: unchanged.
template <typename scalar_t, typename acc_t>
bool streams_alone(const Segment<scalar_t, acc_t>& s, Isa isa) {
  return isa == Isa::avx2 && s.count == 1;
}

// Pairs per block of a segment's pairs whose vectors (x rows in the gate/up pass, a rows in the down pass) the
// loops below take through an item's rows before the next block: n-element vectors of acc_t in about 128 KiB,
// which stay in L2 beside the item's weight rows. A segment of more pairs (an expert at prefill sizes, the shared
// experts of every token) would otherwise read its pairs' vectors from L3 or memory once per row. A decode step's
// segments (at most a few dozen pairs) are one block. The order of blocks changes no bit: every output is one dots
// call, and y's rows receive their terms segment by segment.
template <typename acc_t>
int64_t pair_block(int64_t n) {
  return std::max<int64_t>(1, (int64_t(128) << 10) / (std::max<int64_t>(n, 1) * int64_t(sizeof(acc_t))));
}

// Pairs whose x rows one dots_many call takes through a unit's gate and up rows.
constexpr int kVectors = 3;

// The segments' units [u0, u1) (one unit: a gate row and an up row of one segment) -> a. A thread's range is
// contiguous within each segment, so it streams consecutive rows.
template <typename scalar_t, typename acc_t>
void gate_up_units(const std::vector<Segment<scalar_t, acc_t>>& segments, const std::vector<Placement>& place,
                   const acc_t* x, int64_t H, acc_t L, acc_t* a, int64_t u0, int64_t u1, Isa isa) {
  const int64_t block = pair_block<acc_t>(H);
  for (size_t k = 0; k < segments.size(); ++k) {
    const auto& s = segments[k];
    const int64_t a_offset = place[k].a_offset;
    const int64_t i0 = std::max(u0 - place[k].units_before, int64_t(0));
    const int64_t i1 = std::min(u1 - place[k].units_before, s.width);
    for (int64_t p0 = s.first; p0 < s.first + s.count; p0 += block) {
      const int64_t p1 = std::min(p0 + block, s.first + s.count);
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* gate = s.gate + i * H;
        const scalar_t* next = streams_alone(s, isa) ? nullptr : gate + H;
        auto write = [&](int64_t p, const acc_t* gu) {  // gu: the gate row's and the up row's dot with x_t
          a[a_offset + p * s.width + i] = clamped_swiglu(gu[0], gu[1], L) * (s.weight ? s.weight[p] : acc_t(1));
        };
        int64_t p = p0;
        for (; p + kVectors <= p1; p += kVectors) {
          const acc_t* xs[kVectors];
          for (int u = 0; u < kVectors; ++u) xs[u] = x + s.token[p + u] * H;
          acc_t gu[2 * kVectors];
          dots_many<2, kVectors>(gate, s.up - s.gate, xs, H, gu, isa, next);
          for (int u = 0; u < kVectors; ++u) write(p + u, gu + 2 * u);
        }
        for (; p < p1; ++p) {
          acc_t gu[2];  // the gate row and the up row (s.up − s.gate apart) against x_t
          dots<2>(gate, s.up - s.gate, x + s.token[p] * H, H, gu, isa, next);
          write(p, gu);
        }
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
  const int64_t H = x_TH.size(1);
  const Isa isa = cpu_isa();
  const acc_t L = glu_limit<acc_t>(limit);
  // x widened once (T·H elements: small), so that every dot reads one weight row and one acc_t vector.
  const Tensor xw = x_TH.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const auto built = build_segments<scalar_t, acc_t>(x_TH, gate_up, down, token_N, weight_N, counts, shared_gate,
                                                     shared_up, shared_down);
  const auto& segments = built.list;
  std::vector<Placement> place;  // each segment's a after the segments before it, pair by pair
  int64_t a_size = 0, units = 0;
  for (const auto& s : segments) {
    place.push_back({a_size - s.first * s.width, units});
    a_size += s.count * s.width;
    units += s.width;
  }
  std::vector<acc_t> a(static_cast<size_t>(a_size));
  const acc_t* x = xw.const_data_ptr<acc_t>();
  // Items the threads share (shared_cpu.h): 32 gate/up units (64 rows: 128-256 KiB of weights at H = 1024) and
  // 32 down rows of every segment, a few microseconds of streaming each. A unit's a, and a row of y summed over the
  // segments in their order, are each one item's work: no bit depends on which thread ran what.
  // kRows: down rows per dots call where the rows are fetched ahead (every segment but those that stream alone).
  constexpr int64_t kUnitItem = 32, kRowItem = 32, kRows = 4;
  static_assert(kRowItem % kRows == 0);
  SharedCpuWatch& watch = decode_watch();
  // Off (OMP_WAIT_POLICY=PASSIVE, or switched off), the watch costs nothing: no clock reads, nothing observed.
  const bool watching = watch.enabled();
  const int64_t start = watching ? steady_ns() : 0;
  const bool solo = watching && watch.solo(start);
  const int64_t start_cpu = watching && !solo ? thread_cpu_ns() : 0;
  int64_t wait = run_shares((units + kUnitItem - 1) / kUnitItem, solo, [&](int64_t item) {
    gate_up_units(segments, place, x, H, L, a.data(), item * kUnitItem, std::min(units, (item + 1) * kUnitItem), isa);
  });
  acc_t* y = y_TH.mutable_data_ptr<acc_t>();
  // R = 1: one ascending stream, left to the hardware prefetcher; R = kRows: the next rows fetched ahead.
  auto down_rows = [&](auto rows_per_call, const Segment<scalar_t, acc_t>& s, const acc_t* a_s, int64_t h0,
                       int64_t h1) {
    constexpr int64_t R = decltype(rows_per_call)::value;
    constexpr bool fetch_ahead = R > 1;
    const int64_t block = pair_block<acc_t>(s.width);
    for (int64_t p0 = s.first; p0 < s.first + s.count; p0 += block) {
      const int64_t p1 = std::min(p0 + block, s.first + s.count);
      int64_t h = h0;
      for (; h + R <= h1; h += R) {
        const scalar_t* rows = s.down + h * s.width;
        for (int64_t p = p0; p < p1; ++p) {
          acc_t out[R];
          dots<R>(rows, s.width, a_s + p * s.width, s.width, out, isa, fetch_ahead ? rows + R * s.width : nullptr);
          for (int r = 0; r < R; ++r) y[s.token[p] * H + h + r] += out[r];
        }
      }
      for (; h < h1; ++h) {
        const scalar_t* row = s.down + h * s.width;
        for (int64_t p = p0; p < p1; ++p) {
          acc_t out[1];
          dots<1>(row, s.width, a_s + p * s.width, s.width, out, isa, fetch_ahead ? row + s.width : nullptr);
          y[s.token[p] * H + h] += out[0];
        }
      }
    }
  };
  wait += run_shares((H + kRowItem - 1) / kRowItem, solo, [&](int64_t item) {
    const int64_t h0 = item * kRowItem, h1 = std::min(H, h0 + kRowItem);
    for (size_t k = 0; k < segments.size(); ++k) {
      const auto& s = segments[k];
      const acc_t* a_s = a.data() + place[k].a_offset;
      if (streams_alone(s, isa))
        down_rows(std::integral_constant<int64_t, 1>{}, s, a_s, h0, h1);
      else
        down_rows(std::integral_constant<int64_t, kRows>{}, s, a_s, h0, h1);
    }
  });
  if (!watching) return;
  const int64_t end = steady_ns();
  int64_t work = 0;  // bytes of weights streamed
  for (const auto& s : segments) work += 3 * s.width * H * int64_t(sizeof(scalar_t));
  if (solo) {
    watch.observe_alone(end, end - start, work);
  } else {
    const int64_t cpu = thread_cpu_ns() - start_cpu;
    watch.observe(end, std::max(wait, cpu > 0 ? end - start - cpu : 0), end - start, work);
  }
}

}  // namespace

Tensor expert_gemv_cpu(const Tensor& x_in, const Tensor& gate_up_in, const Tensor& down_in, const Tensor& token_in,
                       const Tensor& weight_in, const Tensor& counts_E, std::optional<double> limit,
                       const std::optional<Tensor>& shared_gate, const std::optional<Tensor>& shared_up,
                       const std::optional<Tensor>& shared_down) {
  const InferenceInputs in = inference_inputs("expert_gemv", x_in, gate_up_in, down_in, token_in, weight_in,
                                               counts_E, shared_gate, shared_up, shared_down);
  const auto acc = at::toOpMathType(x_in.scalar_type());
  Tensor y_TH = at::zeros({x_in.size(0), x_in.size(1)}, x_in.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "expert_gemv", [&] {
    expert_gemv_impl<scalar_t>(in.x_TH, in.gate_up, in.down, in.token_N, in.weight_N, in.counts, limit,
                               in.shared_gate, in.shared_up, in.shared_down, y_TH);
  });
  return y_TH.to(x_in.scalar_type());
}

SharedCpuWatch& decode_watch() {
  static SharedCpuWatch watch;
  return watch;
}

bool shared_cpu_watch(std::optional<bool> enable) {
  return enable ? decode_watch().enable(*enable) : decode_watch().enabled();
}

c10::List<bool> shared_cpu_policy(at::IntArrayRef start_ns, at::IntArrayRef lost_ns, at::IntArrayRef elapsed_ns,
                                  at::IntArrayRef work) {
  const size_t n = start_ns.size();
  TORCH_CHECK(lost_ns.size() == n && elapsed_ns.size() == n && work.size() == n,
              "_shared_cpu_policy: start_ns, lost_ns, elapsed_ns and work must have one length, got ", n, ", ",
              lost_ns.size(), ", ", elapsed_ns.size(), " and ", work.size());
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(lost_ns[i] >= 0 && elapsed_ns[i] >= 0 && lost_ns[i] <= elapsed_ns[i] && work[i] >= 0,
                "_shared_cpu_policy: call ", i, " must have 0 <= lost_ns <= elapsed_ns and work >= 0, got lost_ns ",
                lost_ns[i], ", elapsed_ns ", elapsed_ns[i], ", work ", work[i]);
  SharedCpuWatch watch;
  watch.enable(true);  // whatever OMP_WAIT_POLICY says: the replay is of the policy itself
  c10::List<bool> solo;
  for (size_t i = 0; i < start_ns.size(); ++i) {
    solo.push_back(watch.solo(start_ns[i]));
    if (solo.get(i)) {
      watch.observe_alone(add_saturated(start_ns[i], elapsed_ns[i]), elapsed_ns[i], work[i]);
    } else {
      watch.observe(add_saturated(start_ns[i], elapsed_ns[i]), lost_ns[i], elapsed_ns[i], work[i]);
    }
  }
  return solo;
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("expert_gemv", &expert_gemv_cpu);
}

}  // namespace deepseek_moe
