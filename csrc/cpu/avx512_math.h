// AVX-512 building blocks of the CPU kernels (csrc/cpu/expert_blocks.cpp): e^x, fp32 -> bf16 rounding and a
// 16 × 16 transpose of 32-bit words. Each carries a target attribute: callers run them only where has_avx512()
// (cpu_features.h) says so.
#pragma once

#include "cpu_features.h"

#ifdef DEEPSEEK_MOE_X86
namespace deepseek_moe {

// e^x to about 1 ulp: 2^k · p(r), k = round(x / ln 2), r = x − k·ln 2 in two parts, p the degree-7 Taylor
// polynomial (|r| <= ln 2 / 2: its remainder is below 6e-9 relative). x is clamped where e^x leaves fp32; the
// minima and maxima take x second, so a NaN passes through.
__attribute__((target("avx512f"))) inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), _mm512_min_ps(_mm512_set1_ps(88.8f), x));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, k);
}

// fp32 -> bf16 bits in each lane's high half, rounded to nearest even, NaN kept quiet (c10::BFloat16's rule).
__attribute__((target("avx512f"))) inline __m512i bf16_high(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// r[0..16) := its transpose (16 × 16 words).
__attribute__((target("avx512f"))) inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // b[4q + j], 128-bit lane l: rows 4q..4q+3 of column 4l + j
    a[j] = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88);
    a[4 + j] = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    a[8 + j] = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
    a[12 + j] = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i32x4(a[j], a[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(a[j], a[8 + j], 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(a[4 + j], a[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(a[4 + j], a[12 + j], 0xDD);
  }
}

}  // namespace deepseek_moe
#endif
