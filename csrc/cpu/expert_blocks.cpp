// Routed experts for many tokens (prefill, inference), CPU: each expert's pairs as the wide operand of GEMM
// micro-kernels: in bf16 on AMX our own loop (amx_rows32 in amx_rows.h) where every chunk is whole, else oneDNN's
// (at::native::cpublas::brgemm). A CPU without a bf16 micro-kernel (AVX2 only, or AVX-512 without BF16) runs bf16
// through fp32 brgemm: each weight chunk is widened into the thread's buffer just before its GEMM (exact), the
// activations a rounded to bf16 as in the native path; ATen's own bf16 GEMMs there run at a seventh of fp32's rate.
//
// Calling a BLAS GEMM per expert pays a parallel region, a packing pass and a thread hand-off per expert, and on a
// shared CPU every region waits for a descheduled thread. Here one call runs two parallel regions over all experts:
//
//   1. gate/up: threads claim whole pieces (up to kPiece pairs of one expert), costliest first, until none is left
//      (a thread that a shared CPU deschedules leaves its share to the other). A thread packs the piece's tokens of
//      x into brgemm's B layout in its own buffer (H × Np, Np the pair count rounded up to 16; VNNI pairs
//      [H/2][Np][2] for bf16; 16 × 16 words at a time), then for every chunk of Ib rows of the expert's gate and
//      up weights (the A operand, in their public (E, 2I, H) layout: no repacking, nothing cached) gets g and u as
//      Ib × Np fp32 tiles and computes a = act(min(g, L)) · clamp(u, −L, L) · w in the epilogue, written in the B
//      layout GEMM 2 reads.
//   2. down: threads split the H output rows into groups; for each piece, Hb rows of the expert's down weights (A,
//      public (E, H, I) layout) times its a, transposed back 16 × 16 and added into the group's columns of y,
//      pieces in a fixed order, so every y element receives its terms in the same order whatever the thread count.
//      A thread sums a group in its own fp32 buffer (every token's row of the group's columns, contiguous) and then
//      writes it to y in the output dtype: no T × H fp32 buffer, no pass to zero it or to convert it, and the rows
//      it adds into are the group's width apart, not H (4 KiB at H = 1024 put every token's row in one L1 set).
//
// Both GEMMs compute transposed tiles (weight rows × tokens): the weights keep their layout and only activations
// are rearranged. At prefill sizes every expert is active, so a call streams all routed weights; brgemm computes a
// chunk only after its rows arrive, the AMX loop fetches the next chunk meanwhile, so stream and arithmetic
// overlap. The shared experts are one more segment (every token, weight 1) when given. Every buffer the
// micro-kernel reads is 64-byte aligned: unaligned tiles measured half the speed.
//
// Legend: T tokens, H hidden size, I expert hidden size, J = 2·I, E experts, N sorted (token, slot) pairs,
// Np a piece's pairs rounded up to 16, Ib gate/up rows per call, Hb down rows per tile; a "word" is 32 bits: one
// fp32 element or a VNNI pair of 16-bit elements.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "amx_rows.h"
#include "avx2_math.h"
#include "avx512_math.h"
#include "cpu_features.h"
#include "expert_segments.h"
#include "inference_ops.h"

namespace deepseek_moe {
namespace {

using at::Tensor;
namespace cpublas = at::native::cpublas;

constexpr int64_t kIb = 32;   // gate/up rows per call: a 32 × H tile of each, reused across the piece's columns
constexpr int64_t kHb = 64;   // down rows per tile
// Down tiles per group at most (512 rows). Groups of 4 tiles at H = 1024 on two threads measured 5-10% faster than
// groups of 2 at T = 512 and 2048 (one process alternating the two, 20-40 calls each).
constexpr int64_t kGroupTiles = 8;
// Pairs per piece (a thread's unit of gate/up work, and the token columns of every micro-kernel call on it): an
// expert with more, or the shared experts (every token), is split so that the threads' shares even out and a
// piece's packed x (kPiece × H) stays in L2. One call per piece and row chunk: alternating kernel shapes (a
// reconfiguration of the AMX tiles each time) measured slower.
constexpr int64_t kPiece = 256;
// Pairs per piece for fp32 GEMMs without AVX-512 (fp32 layers, bf16 ones widened; oneDNN's AVX2 brgemm): a piece's
// fp32 x (32 × H) and the widened weight chunks stay in a 512 KiB L2 (AMD Zen 3). Against 256, one process
// alternating the sizes (H = 1024, 64 × 352 + 2 shared, top-6): 0.78-0.90 of the time at T = 512 and 2048, fp32 and
// bf16; 16 and 48 were 2-16% slower than 32.
constexpr int64_t kPieceAvx2 = 32;

int64_t round_up(int64_t n, int64_t m) {
  return (n + m - 1) / m * m;
}

template <typename scalar_t>
constexpr int64_t per_word() {
  return static_cast<int64_t>(4 / sizeof(scalar_t));
}

// ------------------------------------------------------------------------------------ the GLU epilogue
// Where a tile of a goes: a piece's a in the B layout (row j, token column n at word (j / P)·Np + n, half j % P),
// the tile's rows from j0. round_bf16: an fp32 a of a bf16 layer holds bf16 values (as the layer's activations
// and the native bf16 path's a do).
template <typename scalar_t>
struct BTile {
  scalar_t* a;
  int64_t Np, j0;
  bool round_bf16;
  void store(int64_t i, int64_t n, float v) const {
    constexpr int64_t P = per_word<scalar_t>();
    const int64_t j = j0 + i;
    if (round_bf16) v = static_cast<float>(static_cast<at::BFloat16>(v));
    a[((j / P) * Np + n) * P + j % P] = static_cast<scalar_t>(v);
  }
};

// a from the g and u tiles (jr × nc fp32, row stride nc) and the columns' weights w (0 past the pairs): the
// portable loop.
template <typename scalar_t>
void glu_tile_portable(const float* g, const float* u, const float* w, float limit, int64_t jr, int64_t nc,
                       const BTile<scalar_t>& out) {
  for (int64_t i = 0; i < jr; ++i)
    for (int64_t n = 0; n < nc; ++n) out.store(i, n, clamped_swiglu(g[i * nc + n], u[i * nc + n], limit) * w[n]);
}

// Adds the transposed tile c (hr × nc fp32, row stride nc) into y: column n into y_rows[n][0, hr). The portable
// loop.
void add_transposed_portable(const float* c, int64_t hr, int64_t nc, int64_t cols, float* const* y_rows) {
  for (int64_t n = 0; n < cols; ++n)
    for (int64_t i = 0; i < hr; ++i) y_rows[n][i] += c[i * nc + n];
}

#ifdef DEEPSEEK_MOE_X86
// act(min(g, L)) · clamp(u, −L, L) · w for the 16 lanes at g_at and u_at, the clamp in torch.clamp's order (max
// first); NaN in g or u stays NaN (the intrinsics return their second operand when one is NaN).
__attribute__((target("avx512f"))) inline __m512 glu16(const float* g_at, const float* u_at, __m512 w, __m512 L) {
  const __m512 g = _mm512_min_ps(L, _mm512_loadu_ps(g_at));
  const __m512 u = _mm512_min_ps(L, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), L), _mm512_loadu_ps(u_at)));
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(g, sig), u), w);
}

// nc a multiple of 16; for 16-bit types jr and j0 even (rows j0 + i and j0 + i + 1 form one VNNI word per token).
template <typename scalar_t>
__attribute__((target("avx512f"))) void glu_tile_avx512(const float* g, const float* u, const float* w, float limit,
                                                        int64_t jr, int64_t nc, const BTile<scalar_t>& out) {
  const __m512 L = _mm512_set1_ps(limit);
  for (int64_t n = 0; n < nc; n += 16) {
    const __m512 wn = _mm512_loadu_ps(w + n);
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t i = 0; i < jr; ++i) {
        const __m512 v = glu16(g + i * nc + n, u + i * nc + n, wn, L);
        _mm512_storeu_ps(out.a + (out.j0 + i) * out.Np + n, out.round_bf16 ? _mm512_castsi512_ps(bf16_high(v)) : v);
      }
    } else {
      uint32_t* words = reinterpret_cast<uint32_t*>(out.a);
      for (int64_t i = 0; i < jr; i += 2)
        _mm512_storeu_si512(words + ((out.j0 + i) / 2) * out.Np + n,
                            _mm512_or_si512(
                                _mm512_srli_epi32(bf16_high(glu16(g + i * nc + n, u + i * nc + n, wn, L)), 16),
                                bf16_high(glu16(g + (i + 1) * nc + n, u + (i + 1) * nc + n, wn, L))));
    }
  }
}

// dst[k·ld + n] = src[n][k] for 16 rows src[n] (nullptr: zeros) and words k < Hw: the B layout of 16 tokens.
__attribute__((target("avx512f"))) void pack16_avx512(const uint32_t* const* src, int64_t Hw, uint32_t* dst,
                                                      int64_t ld) {
  __m512i r[16];
  int64_t k = 0;
  for (; k + 16 <= Hw; k += 16) {
    for (int n = 0; n < 16; ++n) r[n] = src[n] ? _mm512_loadu_si512(src[n] + k) : _mm512_setzero_si512();
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (k + i) * ld, r[i]);
  }
  for (; k < Hw; ++k)
    for (int n = 0; n < 16; ++n) dst[k * ld + n] = src[n] ? src[n][k] : 0u;
}

// dst[0, n) = src[0, n) rounded to bf16 (c10::BFloat16's rule, bf16_high).
__attribute__((target("avx512f"))) void to_bf16_avx512(const float* src, int64_t n, at::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(_mm512_loadu_ps(src + i)), 16)));
  for (; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
}

// add_transposed_portable for hr a multiple of 16 and nc of 16.
__attribute__((target("avx512f"))) void add_transposed_avx512(const float* c, int64_t hr, int64_t nc, int64_t cols,
                                                              float* const* y_rows) {
  __m512i r[16];
  for (int64_t n0 = 0; n0 < cols; n0 += 16) {
    for (int64_t i0 = 0; i0 < hr; i0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(c + (i0 + i) * nc + n0);
      transpose16(r);
      for (int64_t n = 0; n < std::min<int64_t>(16, cols - n0); ++n) {
        float* y = y_rows[n0 + n] + i0;
        _mm512_storeu_ps(y, _mm512_add_ps(_mm512_loadu_ps(y), _mm512_castsi512_ps(r[n])));
      }
    }
  }
}
#endif

#ifdef DEEPSEEK_MOE_X86
// glu16 on 8 lanes.
__attribute__((target("avx2,fma"))) inline __m256 glu8(const float* g_at, const float* u_at, __m256 w, __m256 L) {
  const __m256 g = _mm256_min_ps(L, _mm256_loadu_ps(g_at));
  const __m256 u = _mm256_min_ps(L, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), L), _mm256_loadu_ps(u_at)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(g, sig), u), w);
}

// glu_tile_avx512 for an fp32 a (fp32 layers, and bf16 ones widened to fp32), nc a multiple of 8.
__attribute__((target("avx2,fma"))) void glu_tile_avx2(const float* g, const float* u, const float* w, float limit,
                                                       int64_t jr, int64_t nc, const BTile<float>& out) {
  const __m256 L = _mm256_set1_ps(limit);
  for (int64_t n = 0; n < nc; n += 8) {
    const __m256 wn = _mm256_loadu_ps(w + n);
    for (int64_t i = 0; i < jr; ++i) {
      const __m256 v = glu8(g + i * nc + n, u + i * nc + n, wn, L);
      _mm256_storeu_ps(out.a + (out.j0 + i) * out.Np + n, out.round_bf16 ? round_bf16_8(v) : v);
    }
  }
}

// add_transposed_portable for hr a multiple of 8 and nc of 8.
__attribute__((target("avx2,fma"))) void add_transposed_avx2(const float* c, int64_t hr, int64_t nc, int64_t cols,
                                                             float* const* y_rows) {
  __m256 r[8];
  for (int64_t n0 = 0; n0 < cols; n0 += 8) {
    for (int64_t i0 = 0; i0 < hr; i0 += 8) {
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(c + (i0 + i) * nc + n0);
      transpose8(r);
      for (int64_t n = 0; n < std::min<int64_t>(8, cols - n0); ++n) {
        float* y = y_rows[n0 + n] + i0;
        _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), r[n]));
      }
    }
  }
}

// dst[k·ld + n] = src[n][k] in fp32 for 8 rows src[n] of bf16 (nullptr: zeros) and k < H: the fp32 B layout of 8
// tokens.
__attribute__((target("avx2,fma"))) void pack8_widened_avx2(const at::BFloat16* const* src, int64_t H, float* dst,
                                                            int64_t ld) {
  __m256 r[8];
  int64_t k = 0;
  for (; k + 8 <= H; k += 8) {
    for (int n = 0; n < 8; ++n)
      r[n] = src[n] ? widen8(src[n] + k) : _mm256_setzero_ps();
    transpose8(r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (k + i) * ld, r[i]);
  }
  for (; k < H; ++k)
    for (int n = 0; n < 8; ++n) dst[k * ld + n] = src[n] ? static_cast<float>(src[n][k]) : 0.f;
}

// to_bf16_avx512 on 8 lanes at a time.
__attribute__((target("avx2,fma"))) void to_bf16_avx2(const float* src, int64_t n, at::BFloat16* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_8(_mm256_loadu_ps(src + i))), 16);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  for (; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
}
#endif

// ------------------------------------------------------------------------------------ widening bf16
// dst[0, n) = src[0, n) in fp32 (bf16 is fp32's high half: exact).
void widen_portable(const at::BFloat16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#ifdef DEEPSEEK_MOE_X86
__attribute__((target("avx2,fma"))) void widen_avx2(const at::BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, widen8(src + i));
  widen_portable(src + i, n - i, dst + i);
}
#endif

// The operand a GEMM of gemm_t reads for n elements at src: src itself, or (bf16 weights on a CPU without a bf16
// micro-kernel) their fp32 widening in buffer.
template <typename gemm_t, typename scalar_t>
const gemm_t* gemm_operand(const scalar_t* src, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<gemm_t, scalar_t>) {
    return src;
  } else {
#ifdef DEEPSEEK_MOE_X86
    if (has_avx2_fma()) {
      widen_avx2(src, n, buffer);
      return buffer;
    }
#endif
    widen_portable(src, n, buffer);
    return buffer;
  }
}

// ------------------------------------------------------------------------------------ the op
// Pairs [first, first + count) of a segment (at most kPiece or kPieceAvx2 of them), padded to Np columns; its a at
// word ab.
struct Piece {
  int64_t segment, first, count, Np, ab;
};

// scalar_t: the dtype of x, the weights and y; gemm_t: the dtype the GEMMs read (scalar_t, or fp32 for bf16 on a
// CPU without a bf16 micro-kernel: every weight chunk widened into the thread's buffer just before its GEMM,
// the activations packed in fp32; the stream is still the bf16 weights).
template <typename scalar_t, typename gemm_t>
void expert_blocks_impl(const Tensor& x_TH, const Tensor& gate_up, const Tensor& down, const Tensor& token_N,
                        const Tensor& weight_N, const std::vector<int64_t>& counts, std::optional<double> limit,
                        const std::optional<Tensor>& shared_gate, const std::optional<Tensor>& shared_up,
                        const std::optional<Tensor>& shared_down, const Tensor& y_TH) {
  constexpr int64_t P = per_word<gemm_t>();
  constexpr bool vnni = P == 2;
  constexpr bool widened = !std::is_same_v<scalar_t, gemm_t>;
  const int64_t H = x_TH.size(1), Hw = H / P;  // Hw: words per row of x in the GEMMs' dtype
  // avx2: AVX2 is the widest vector code here (its epilogue, add and rounding); has_avx2: AVX2 code may run.
  const bool avx512 = has_avx512(), has_avx2 = has_avx2_fma(), avx2 = !avx512 && has_avx2;
  const float L = glu_limit<float>(limit);
  const auto built = build_segments<scalar_t, float>(x_TH, gate_up, down, token_N, weight_N, counts, shared_gate,
                                                     shared_up, shared_down);
  const auto& segments = built.list;
  const int64_t piece_cols = std::is_same_v<gemm_t, float> && !avx512 ? kPieceAvx2 : kPiece;
  std::vector<Piece> pieces;
  std::vector<int64_t> cost;
  int64_t ab_words = 0, max_np = 0;
  for (int64_t k = 0; k < static_cast<int64_t>(segments.size()); ++k) {
    const auto& s = segments[k];
    if (s.width == 0) continue;  // adds nothing (and brgemm refuses an empty product)
    for (int64_t p = 0; p < s.count; p += piece_cols) {
      const int64_t count = std::min(piece_cols, s.count - p), np = round_up(count, 16);
      pieces.push_back({k, s.first + p, count, np, ab_words});
      cost.push_back(s.width * np);
      ab_words += (s.width / P) * np;
      max_np = std::max(max_np, np);
    }
  }
  // Both GEMMs on our AMX loop where every chunk is whole (bf16, H a multiple of 32, every width of 32), else
  // brgemm.
  bool amx = false;
#ifdef DEEPSEEK_MOE_AMX
  if constexpr (vnni) {
    amx = has_amx_bf16() && H % 32 == 0;
    for (const auto& s : segments) amx = amx && s.width % kIb == 0;
  }
#endif
  const Tensor ab_buffer = at::empty({ab_words}, x_TH.options().dtype(at::kInt));  // ATen's: 64-byte aligned
  uint32_t* ab = reinterpret_cast<uint32_t*>(ab_buffer.data_ptr<int32_t>());
  const scalar_t* x_s = x_TH.const_data_ptr<scalar_t>();
  const uint32_t* x = reinterpret_cast<const uint32_t*>(x_s);
  int64_t max_width = 0;
  for (const auto& s : segments) max_width = std::max(max_width, s.width);

  // 1. gate/up: threads claim whole pieces, costliest first, until none is left (a thread that a shared CPU
  //    deschedules leaves its share to the other): each packs the piece's x in the B layout into its own buffer
  //    (it stays in L2), then runs every row chunk of the segment's weights over it.
  std::vector<int64_t> order(pieces.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return cost[i] > cost[j]; });
  const int64_t n_pieces = static_cast<int64_t>(pieces.size());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_pieces));
  std::atomic<int64_t> claimed{0};
  at::parallel_for(0, parts, 1, [&](int64_t, int64_t) {
    // The thread's buffers, from ATen's allocator (64-byte aligned, not on a worker thread's small stack).
    const Tensor xb_buffer = at::empty({Hw * max_np}, x_TH.options().dtype(at::kInt));
    const Tensor fp32_buffer = at::empty({(2 * kIb + 1) * piece_cols}, x_TH.options().dtype(at::kFloat));
    const Tensor wide_buffer = at::empty({widened ? 2 * kIb * H : 0}, x_TH.options().dtype(at::kFloat));
    uint32_t* xb = reinterpret_cast<uint32_t*>(xb_buffer.data_ptr<int32_t>());
    float *g = fp32_buffer.data_ptr<float>(), *u = g + kIb * piece_cols, *w = u + kIb * piece_cols;
    float *wide_gate = wide_buffer.data_ptr<float>(), *wide_up = wide_gate + kIb * H;
#ifdef DEEPSEEK_MOE_AMX
    if (amx) {
      cpublas::brgemm_release(vnni);  // oneDNN reconfigures the tiles at its next call
      amx_configure();
    }
#endif
    // A thread claims its next piece when it starts one, so the rows it fetches while this piece's last chunk
    // computes are those it runs next (a guess from alternating claims went wrong once the threads' speeds
    // differed; claiming ahead measured 0-7% faster at T = 512, no different at 2048).
    for (int64_t i = claimed++, i_next = 0; i < n_pieces; i = i_next) {
      const int64_t q = order[i];
      i_next = claimed++;
      const int64_t q_next = i_next < n_pieces ? order[i_next] : -1;
      const Piece& piece = pieces[q];
      const auto& s = segments[piece.segment];
      const int64_t np = piece.Np;
      for (int64_t n0 = 0; n0 < np; n0 += 16) {  // pack 16 token columns at a time
        if constexpr (widened) {
          float* xf = reinterpret_cast<float*>(xb);
#ifdef DEEPSEEK_MOE_X86
          if (has_avx2) {
            for (int64_t n8 = 0; n8 < 16; n8 += 8) {
              const scalar_t* src[8];
              for (int64_t n = 0; n < 8; ++n)
                src[n] = n0 + n8 + n < piece.count ? x_s + s.token[piece.first + n0 + n8 + n] * H : nullptr;
              pack8_widened_avx2(src, H, xf + n0 + n8, np);
            }
            continue;
          }
#endif
          for (int64_t n = 0; n < 16; ++n) {
            const scalar_t* row = n0 + n < piece.count ? x_s + s.token[piece.first + n0 + n] * H : nullptr;
            for (int64_t k = 0; k < H; ++k) xf[k * np + n0 + n] = row ? static_cast<float>(row[k]) : 0.f;
          }
          continue;
        }
        const uint32_t* src[16];
        for (int64_t n = 0; n < 16; ++n)
          src[n] = n0 + n < piece.count ? x + s.token[piece.first + n0 + n] * Hw : nullptr;
#ifdef DEEPSEEK_MOE_X86
        if (avx512) {
          pack16_avx512(src, Hw, xb + n0, np);
          continue;
        }
#endif
        for (int64_t k = 0; k < Hw; ++k)
          for (int64_t n = 0; n < 16; ++n) xb[k * np + n0 + n] = src[n] ? src[n][k] : 0u;
      }
      for (int64_t n = 0; n < np; ++n) w[n] = n >= piece.count ? 0.f : s.weight ? s.weight[piece.first + n] : 1.f;
      const gemm_t* xb_s = reinterpret_cast<const gemm_t*>(xb);
      gemm_t* ab_piece = reinterpret_cast<gemm_t*>(ab + piece.ab);
      for (int64_t j0 = 0; j0 < s.width; j0 += kIb) {
        const int64_t jr = std::min(kIb, s.width - j0);
#ifdef DEEPSEEK_MOE_AMX
        if constexpr (vnni) {
          if (amx) {  // the gate chunk, then the up chunk, each fetching the one computed after it
            const bool last = j0 + kIb >= s.width;
            const scalar_t* after = !last ? s.gate + (j0 + kIb) * H
                                    : q_next >= 0 ? segments[pieces[q_next].segment].gate : nullptr;
            amx_rows32(s.gate + j0 * H, H, xb_s, np, g, s.up + j0 * H);
            amx_rows32(s.up + j0 * H, H, xb_s, np, u, after);
          }
        }
        if (!amx) {
          cpublas::brgemm(jr, np, H, H, np, np, false, gemm_operand<gemm_t>(s.gate + j0 * H, jr * H, wide_gate),
                          xb_s, g, vnni);
          cpublas::brgemm(jr, np, H, H, np, np, false, gemm_operand<gemm_t>(s.up + j0 * H, jr * H, wide_up), xb_s,
                          u, vnni);
        }
#else
        cpublas::brgemm(jr, np, H, H, np, np, false, gemm_operand<gemm_t>(s.gate + j0 * H, jr * H, wide_gate), xb_s,
                        g, vnni);
        cpublas::brgemm(jr, np, H, H, np, np, false, gemm_operand<gemm_t>(s.up + j0 * H, jr * H, wide_up), xb_s, u,
                        vnni);
#endif
        const BTile<gemm_t> out{ab_piece, np, j0, widened};
#ifdef DEEPSEEK_MOE_X86
        if (avx512 && jr % 2 == 0) {
          glu_tile_avx512(g, u, w, L, jr, np, out);
          continue;
        }
        if constexpr (std::is_same_v<gemm_t, float>) {
          if (avx2) {
            glu_tile_avx2(g, u, w, L, jr, np, out);
            continue;
          }
        }
#endif
        glu_tile_portable(g, u, w, L, jr, np, out);
      }
    }
#ifdef DEEPSEEK_MOE_AMX
    if (amx) {
      amx_release();
      return;
    }
#endif
    cpublas::brgemm_release(vnni);
  });

  // 2. down: threads claim groups of Hb-row tiles of y until none is left; for its group a thread runs every
  //    piece, in order, so each y element receives its terms in one order whatever the thread count. Groups of
  //    half a thread's share, at most kGroupTiles tiles: a piece's a, read again for every group, stays in L1/L2
  //    across a group's tiles, and its down rows are read in runs of the group's height.
  scalar_t* y = y_TH.mutable_data_ptr<scalar_t>();
  const int64_t T = x_TH.size(0);
  const int64_t h_tiles = (H + kHb - 1) / kHb;
  const int64_t group_tiles = std::clamp<int64_t>(h_tiles / (2 * at::get_num_threads()), 1, kGroupTiles);
  const int64_t groups = (h_tiles + group_tiles - 1) / group_tiles;
  const bool transpose_fast = avx512 && H % 16 == 0, transpose_avx2 = avx2 && H % 8 == 0;
  std::atomic<int64_t> claimed_group{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), groups), 1, [&](int64_t, int64_t) {
    const Tensor c_buffer = at::empty({kHb * piece_cols}, x_TH.options().dtype(at::kFloat));
    const Tensor sum_buffer = at::empty({T * group_tiles * kHb}, x_TH.options().dtype(at::kFloat));
    const Tensor wide_buffer = at::empty({widened ? kHb * max_width : 0}, x_TH.options().dtype(at::kFloat));
    float* wide_down = wide_buffer.data_ptr<float>();
    float* c = c_buffer.data_ptr<float>();
    float* sum = sum_buffer.data_ptr<float>();  // the group's y in fp32: row t at t · width
    float* y_rows[kPiece];
#ifdef DEEPSEEK_MOE_AMX
    if (amx) {
      cpublas::brgemm_release(vnni);
      amx_configure();
    }
#endif
    for (int64_t group = claimed_group++; group < groups; group = claimed_group++) {
      const int64_t ht0 = group * group_tiles, ht1 = std::min(h_tiles, ht0 + group_tiles);
      const int64_t h0 = ht0 * kHb, width = std::min(H, ht1 * kHb) - h0;
      std::fill_n(sum, T * width, 0.f);
      for (size_t q = 0; q < pieces.size(); ++q) {
        const Piece& piece = pieces[q];
        const auto& s = segments[piece.segment];
        const gemm_t* ab_piece = reinterpret_cast<const gemm_t*>(ab + piece.ab);
        for (int64_t ht = ht0; ht < ht1; ++ht) {
          const int64_t h = ht * kHb, hr = std::min(kHb, H - h);
#ifdef DEEPSEEK_MOE_AMX
          if constexpr (vnni) {
            if (amx) {  // 32 down rows at a time (H is a multiple of 32), each fetching the 32 computed after it
              for (int64_t r = 0; r < hr; r += 32) {
                const auto* next = q + 1 < pieces.size() ? &segments[pieces[q + 1].segment] : nullptr;
                const scalar_t* after = r + 32 < hr ? s.down + (h + r + 32) * s.width
                                        : ht + 1 < ht1 ? s.down + (h + kHb) * s.width
                                        : next ? next->down + ht0 * kHb * next->width
                                               : nullptr;
                amx_rows32(s.down + (h + r) * s.width, s.width, ab_piece, piece.Np, c + r * piece.Np, after);
              }
            }
          }
          if (!amx)
            cpublas::brgemm(hr, piece.Np, s.width, s.width, piece.Np, piece.Np, false,
                            gemm_operand<gemm_t>(s.down + h * s.width, hr * s.width, wide_down), ab_piece, c, vnni);
#else
          cpublas::brgemm(hr, piece.Np, s.width, s.width, piece.Np, piece.Np, false,
                          gemm_operand<gemm_t>(s.down + h * s.width, hr * s.width, wide_down), ab_piece, c, vnni);
#endif
          for (int64_t n = 0; n < piece.count; ++n) y_rows[n] = sum + s.token[piece.first + n] * width + h - h0;
#ifdef DEEPSEEK_MOE_X86
          if (transpose_fast) {
            add_transposed_avx512(c, hr, piece.Np, piece.count, y_rows);
            continue;
          }
          if (transpose_avx2) {
            add_transposed_avx2(c, hr, piece.Np, piece.count, y_rows);
            continue;
          }
#endif
          add_transposed_portable(c, hr, piece.Np, piece.count, y_rows);
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const float* row = sum + t * width;
        scalar_t* out = y + t * H + h0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          std::copy_n(row, width, out);
          continue;
        }
#ifdef DEEPSEEK_MOE_X86
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (avx512) {
            to_bf16_avx512(row, width, out);
            continue;
          }
          if (avx2) {
            to_bf16_avx2(row, width, out);
            continue;
          }
        }
#endif
        for (int64_t i = 0; i < width; ++i) out[i] = static_cast<scalar_t>(row[i]);
      }
    }
#ifdef DEEPSEEK_MOE_AMX
    if (amx) {
      amx_release();
      return;
    }
#endif
    cpublas::brgemm_release(vnni);
  });
}

}  // namespace

// Whether expert_blocks has a micro-kernel for dtype on this CPU: fp32 always (oneDNN's fp32 brgemm); bf16
// natively where oneDNN packs it (a VNNI micro-kernel: AVX-512 BF16 or AMX), else through fp32 (each weight chunk
// widened just before its GEMM), which needs AVX2 to beat ATen's bf16 GEMMs on such a CPU (19 against 130 GFLOP/s
// in fp32 on AMD Zen 3: docs/benchmarks.md).
bool native_bf16() {
  return cpublas::could_pack(at::kBFloat16);
}

bool expert_blocks_supported(at::ScalarType dtype) {
  return dtype == at::kFloat || (dtype == at::kBFloat16 && (native_bf16() || has_avx2_fma()));
}

Tensor expert_blocks_cpu(const Tensor& x_in, const Tensor& gate_up_in, const Tensor& down_in, const Tensor& token_in,
                         const Tensor& weight_in, const Tensor& counts_E, std::optional<double> limit,
                         const std::optional<Tensor>& shared_gate, const std::optional<Tensor>& shared_up,
                         const std::optional<Tensor>& shared_down) {
  const InferenceInputs in = inference_inputs("expert_blocks", x_in, gate_up_in, down_in, token_in, weight_in,
                                               counts_E, shared_gate, shared_up, shared_down);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "expert_blocks: fp32 or bf16 only, got ", dtype);
  const int64_t H = x_in.size(1), I = down_in.size(2);
  const int64_t Is = shared_gate ? shared_gate->size(0) : 0;
  TORCH_CHECK(dtype == at::kFloat || (H % 2 == 0 && I % 2 == 0 && Is % 2 == 0),
              "expert_blocks: bf16 needs even sizes (VNNI pairs), got H=", H, ", I=", I, ", shared width ", Is);
  const Tensor y_TH = at::empty({x_in.size(0), H}, x_in.options());
  if (H == 0) return y_TH;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "expert_blocks", [&] {
    if constexpr (std::is_same_v<scalar_t, float>) {
      expert_blocks_impl<float, float>(in.x_TH, in.gate_up, in.down, in.token_N, in.weight_N, in.counts, limit,
                                       in.shared_gate, in.shared_up, in.shared_down, y_TH);
    } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (native_bf16())
        expert_blocks_impl<scalar_t, scalar_t>(in.x_TH, in.gate_up, in.down, in.token_N, in.weight_N, in.counts,
                                               limit, in.shared_gate, in.shared_up, in.shared_down, y_TH);
      else
        expert_blocks_impl<scalar_t, float>(in.x_TH, in.gate_up, in.down, in.token_N, in.weight_N, in.counts, limit,
                                            in.shared_gate, in.shared_up, in.shared_down, y_TH);
    }
  });
  return y_TH;
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("expert_blocks", &expert_blocks_cpu);
}

TORCH_LIBRARY_FRAGMENT(deepseek_moe, m) {
  m.def("expert_blocks_supported(ScalarType dtype) -> bool", &expert_blocks_supported);
}

}  // namespace deepseek_moe
