// Which vector instructions the CPU running the extension has (the extension is built for the baseline x86-64
// ISA; its AVX-512 paths carry target attributes and run only where this says so).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DEEPSEEK_MOE_X86 1
#endif

namespace deepseek_moe {

// AVX-512 F, BW and VL: 16 fp32 lanes, masked 16-bit loads.
inline bool has_avx512() {
#ifdef DEEPSEEK_MOE_X86
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return yes;
#else
  return false;
#endif
}

}  // namespace deepseek_moe
