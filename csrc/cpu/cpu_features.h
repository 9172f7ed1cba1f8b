// Which vector instructions the CPU running the extension has (the extension is built for the baseline x86-64
// ISA; its AVX2 and AVX-512 paths carry target attributes and run only where this says so).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define DEEPSEEK_MOE_X86 1
#endif
// AMX intrinsics need GCC 11 or clang 12; the tile data needs Linux's permission call.
#if defined(DEEPSEEK_MOE_X86) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <sys/syscall.h>
#include <unistd.h>
#define DEEPSEEK_MOE_AMX 1
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

// AVX2 with FMA: 8 fp32 lanes (AMD Zen 1-3, Intel Haswell on; the CPUs without AVX-512).
inline bool has_avx2_fma() {
#ifdef DEEPSEEK_MOE_X86
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// The widest vector code a kernel with all three paths runs here.
enum class Isa { portable, avx2, avx512 };
inline Isa cpu_isa() {
  return has_avx512() ? Isa::avx512 : has_avx2_fma() ? Isa::avx2 : Isa::portable;
}

// AMX tiles with bf16 dot products, and the OS's leave to use them in this process (Linux grants the tile data
// on request: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)).
inline bool has_amx_bf16() {
#ifdef DEEPSEEK_MOE_AMX
  static const bool yes = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace deepseek_moe
