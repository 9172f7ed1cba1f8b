// The AMX micro-kernel of the prefill op (expert_blocks.cpp): c = W × xb for a chunk of 32 weight rows in their
// public layout against a piece's tokens packed in the B layout, on the tiles' bf16 dot products, fetching the next
// chunk's rows into L2 while it computes.
//
// Legend: H the dot products' length (hidden size for gate/up, expert width for down), Np a piece's token columns (a
// multiple of 16), c fp32 with row stride Np; xb in the B layout [H/2][Np][2] (VNNI pairs).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu_features.h"

#ifdef DEEPSEEK_MOE_AMX
namespace deepseek_moe {

// brgemm computes a chunk after its weight rows arrive and fetches nothing ahead across calls; this loop fetches
// the next chunk's rows into L2 a few lines per step while its tiles compute, so the weight stream keeps going
// (benchmarks/brgemm_layouts.py, cold weights at 16 and 48 token columns: 18% faster than brgemm, the same bits).
struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight tiles of 16 rows x 64 bytes. The asm names the whole struct: GCC's _tile_loadconfig declares only 8 bytes
// read, and at -O3 the rest of the struct was not stored.
inline __attribute__((target("amx-tile,amx-bf16"))) void amx_configure() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}

inline __attribute__((target("amx-tile"))) void amx_release() {
  _tile_release();
}

// Token columns [n0, n0 + 32) (kWide: 2 × 2 tiles of 16 × 16) or [n0, n0 + 16) (2 × 1) of c = W × xb: tiles 0-3
// accumulate, 4-5 hold A (16 weight rows each), 6-7 B; each step along H also fetches `per` more lines of pf.
template <bool kWide>
inline __attribute__((target("amx-tile,amx-bf16"))) void amx_columns(const at::BFloat16* W, int64_t H,
                                                                     const at::BFloat16* xb, int64_t Np,
                                                                     int64_t n0, float* c, const char* pf,
                                                                     int64_t per, int64_t lines, int64_t& fetched) {
  const int64_t sa = H * 2, sb = Np * 4, sc = Np * 4;
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (kWide) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < H; k += 32) {
    _tile_loadd(4, W + k, sa);
    _tile_loadd(5, W + 16 * H + k, sa);
    _tile_loadd(6, xb + k * Np + n0 * 2, sb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (kWide) {
      _tile_loadd(7, xb + k * Np + (n0 + 16) * 2, sb);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
    for (int64_t i = 0; i < per && fetched < lines; ++i, ++fetched) _mm_prefetch(pf + fetched * 64, _MM_HINT_T1);
  }
  _tile_stored(0, c + n0, sc);
  _tile_stored(2, c + 16 * Np + n0, sc);
  if constexpr (kWide) {
    _tile_stored(1, c + n0 + 16, sc);
    _tile_stored(3, c + 16 * Np + n0 + 16, sc);
  }
}

// Token columns [n0, n0 + 16·kTiles) of one 16-row half of c (row stride Np) = A (16 weight rows) × xb: tiles
// 0..kTiles−1 accumulate, 3 holds A, 4..3+kTiles B; the same fetching of pf as amx_columns.
template <int kTiles>
inline __attribute__((target("amx-tile,amx-bf16"))) void amx_half_columns(const at::BFloat16* A, int64_t H,
                                                                          const at::BFloat16* xb, int64_t Np,
                                                                          int64_t n0, float* c, const char* pf,
                                                                          int64_t per, int64_t lines,
                                                                          int64_t& fetched) {
  static_assert(kTiles >= 1 && kTiles <= 3, "three accumulators, one A and three B tiles at most");
  const int64_t sa = H * 2, sb = Np * 4, sc = Np * 4;
  _tile_zero(0);
  if constexpr (kTiles > 1) _tile_zero(1);
  if constexpr (kTiles > 2) _tile_zero(2);
  for (int64_t k = 0; k < H; k += 32) {
    _tile_loadd(3, A + k, sa);
    _tile_loadd(4, xb + k * Np + n0 * 2, sb);
    if constexpr (kTiles > 1) _tile_loadd(5, xb + k * Np + (n0 + 16) * 2, sb);
    if constexpr (kTiles > 2) _tile_loadd(6, xb + k * Np + (n0 + 32) * 2, sb);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (kTiles > 1) _tile_dpbf16ps(1, 3, 5);
    if constexpr (kTiles > 2) _tile_dpbf16ps(2, 3, 6);
    for (int64_t i = 0; i < per && fetched < lines; ++i, ++fetched) _mm_prefetch(pf + fetched * 64, _MM_HINT_T1);
  }
  _tile_stored(0, c + n0, sc);
  if constexpr (kTiles > 1) _tile_stored(1, c + n0 + 16, sc);
  if constexpr (kTiles > 2) _tile_stored(2, c + n0 + 32, sc);
}

// c (32 × Np fp32, row stride Np) = W (32 rows of H bf16) × xb (the B layout [H/2][Np][2]), Np a multiple of 16 and
// H of 32. With next, its 32 rows go to L2, a few lines per step, spread over the steps. Up to 48 columns (a
// fine-grained expert's share of a few hundred tokens) each 16-row half runs once over all its columns, 1 × 3 tiles
// (benchmarks/brgemm_layouts.py: 7-40% faster cold than 2 × 2 there, slower from 64 on); more in 2 × 2 tiles. Every c
// element is the same sum in the same order either way: the same bits.
inline __attribute__((target("amx-tile,amx-bf16"))) void amx_rows32(const at::BFloat16* W, int64_t H,
                                                             const at::BFloat16* xb, int64_t Np, float* c,
                                                             const at::BFloat16* next) {
  const int64_t lines = 32 * H * 2 / 64;
  const bool halves = Np <= 48;
  const int64_t steps = (halves ? 2 : (Np + 31) / 32) * (H / 32);
  const int64_t per = next ? (lines + steps - 1) / steps : 0;
  const char* pf = reinterpret_cast<const char*>(next);
  int64_t fetched = 0, n0 = 0;
  if (halves) {
    for (int64_t r = 0; r < 32; r += 16) {
      if (Np == 48)
        amx_half_columns<3>(W + r * H, H, xb, Np, 0, c + r * Np, pf, per, lines, fetched);
      else if (Np == 32)
        amx_half_columns<2>(W + r * H, H, xb, Np, 0, c + r * Np, pf, per, lines, fetched);
      else
        amx_half_columns<1>(W + r * H, H, xb, Np, 0, c + r * Np, pf, per, lines, fetched);
    }
    return;
  }
  for (; n0 + 32 <= Np; n0 += 32) amx_columns<true>(W, H, xb, Np, n0, c, pf, per, lines, fetched);
  if (n0 < Np) amx_columns<false>(W, H, xb, Np, n0, c, pf, per, lines, fetched);
}

}  // namespace deepseek_moe
#endif
