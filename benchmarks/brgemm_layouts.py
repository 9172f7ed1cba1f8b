"""How fast GEMM 1 of the prefill op can stream fine-grained experts' bf16 weights on AMX: oneDNN's brgemm with the
blocks op's operand layout (weight rows as the A operand, in their public layout) or SGLang's (weights packed once
as the B operand), and a hand-written AMX loop that prefetches the next chunk of weight rows while it computes.

    python benchmarks/brgemm_layouts.py            # 64 experts x 704 x 1024 bf16 gate/up weights, 16/32/48/192 tokens
    python benchmarks/brgemm_layouts.py --peak     # the tiles' own rate now: no memory traffic, both threads

GEMM 1 alone, both threads splitting the experts, the weights cold (8 copies of 92 MB cycled, so nothing stays in
the caches between two visits of a copy); for each expert and each chunk of 32 weight rows (or 32 packed columns)
one call over all its token columns. Contenders, interleaved per token count:

* ``brgemm, weights as A``: the blocks op's call (``at::native::cpublas::brgemm``);
* ``brgemm, A, next chunk to L1``: the same with the next 32 rows prefetched into L1 before each call;
* ``brgemm, weights packed as B``: SGLang's layout (contiguous tiles, one sequential stream; a second copy);
* ``AMX loop``: 2 x 2 tiles of 16 x 16 (two 16-row A tiles, two 16-column B tiles per step of 32 along H);
* ``AMX loop, next chunk to L2``: the same, prefetching the next 32 rows into L2 a few lines per step, spread
  over the chunk's steps (the stream keeps going while the tiles compute);
* ``AMX loop by halves, next chunk to L2``: up to 48 token columns, each 16-row half of the chunk once over all
  its columns (1 x 3 tiles: one A, three B), fetching as above (what the blocks op runs there);
* ``... hot``: brgemm and the AMX loops on one expert's rows over and over (in L2): the arithmetic alone.

Times are per copy, the best of three passes; GB/s is the weight bytes over that time. A C++ snippet compiled just
in time with torch.utils.cpp_extension (~40 s the first time); the CPU needs AMX.

``--peak`` prints, for ten consecutive samples of 0.5 s, what each thread's tiles compute with no memory traffic
(four independent 16 x 16 x 32 bf16 dot products on tiles already loaded, over and over): the physical ceiling of
every AMX loop here, and on a shared host a measure of how much of the cores the neighbours leave.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <vector>
namespace cb = at::native::cpublas;
using bf16 = at::BFloat16;

struct TileConfig { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

// Eight 16 x 64-byte tiles. The asm names the whole struct as its operand: GCC's _tile_loadconfig declares only
// 8 bytes read, and at -O3 the rest of the struct was never stored (a #GP in ldtilecfg).
__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  asm volatile("ldtilecfg %0" :: "m"(cfg));
}
__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

// c (32 x Np fp32) = W (32 rows, stride H) x xb ([H/2][Np][2] VNNI), Np a multiple of 16; with pf, the 32·H·2
// bytes at pf go to L2 a few lines per step, spread over the steps.
__attribute__((target("amx-tile,amx-bf16")))
void chunk(const bf16* W, int64_t H, const bf16* xb, int64_t Np, float* c, const char* pf) {
  const int64_t sa = H * 2, sb = Np * 4, sc = Np * 4, lines = 32 * H * 2 / 64;
  const int64_t steps = (Np + 31) / 32 * (H / 32), per = pf ? (lines + steps - 1) / steps : 0;
  int64_t done = 0;
  int64_t n0 = 0;
  for (; n0 + 32 <= Np; n0 += 32) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < H; k += 32) {
      _tile_loadd(4, W + k, sa);
      _tile_loadd(5, W + 16 * H + k, sa);
      _tile_loadd(6, xb + k * Np + n0 * 2, sb);
      _tile_loadd(7, xb + k * Np + (n0 + 16) * 2, sb);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      for (int64_t i = 0; i < per && done < lines; ++i, ++done) _mm_prefetch(pf + done * 64, _MM_HINT_T1);
    }
    _tile_stored(0, c + n0, sc); _tile_stored(1, c + n0 + 16, sc);
    _tile_stored(2, c + 16 * Np + n0, sc); _tile_stored(3, c + 16 * Np + n0 + 16, sc);
  }
  if (n0 < Np) {
    _tile_zero(0); _tile_zero(2);
    for (int64_t k = 0; k < H; k += 32) {
      _tile_loadd(4, W + k, sa);
      _tile_loadd(5, W + 16 * H + k, sa);
      _tile_loadd(6, xb + k * Np + n0 * 2, sb);
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
      for (int64_t i = 0; i < per && done < lines; ++i, ++done) _mm_prefetch(pf + done * 64, _MM_HINT_T1);
    }
    _tile_stored(0, c + n0, sc); _tile_stored(2, c + 16 * Np + n0, sc);
  }
}

// The same for Np <= 48 by 16-row halves: tiles 0-2 accumulate, 3 holds A, 4-6 B.
__attribute__((target("amx-tile,amx-bf16")))
void chunk_halves(const bf16* W, int64_t H, const bf16* xb, int64_t Np, float* c, const char* pf) {
  const int64_t sa = H * 2, sb = Np * 4, sc = Np * 4, lines = 32 * H * 2 / 64, n = Np / 16;
  const int64_t steps = 2 * (H / 32), per = pf ? (lines + steps - 1) / steps : 0;
  int64_t done = 0;
  for (int64_t r = 0; r < 2; ++r) {
    const bf16* A = W + r * 16 * H;
    _tile_zero(0);  // tile numbers are immediates
    if (n > 1) _tile_zero(1);
    if (n > 2) _tile_zero(2);
    for (int64_t k = 0; k < H; k += 32) {
      _tile_loadd(3, A + k, sa);
      _tile_loadd(4, xb + k * Np, sb);
      if (n > 1) _tile_loadd(5, xb + k * Np + 32, sb);
      if (n > 2) _tile_loadd(6, xb + k * Np + 64, sb);
      _tile_dpbf16ps(0, 3, 4);
      if (n > 1) _tile_dpbf16ps(1, 3, 5);
      if (n > 2) _tile_dpbf16ps(2, 3, 6);
      for (int64_t i = 0; i < per && done < lines; ++i, ++done) _mm_prefetch(pf + done * 64, _MM_HINT_T1);
    }
    _tile_stored(0, c + r * 16 * Np, sc);
    if (n > 1) _tile_stored(1, c + r * 16 * Np + 16, sc);
    if (n > 2) _tile_stored(2, c + r * 16 * Np + 32, sc);
  }
}

// Contenders: 0 brgemm A; 1 brgemm A, next chunk to L1; 2 brgemm packed B; 3 AMX loop; 4 AMX loop, next chunk to
// L2; 5 brgemm A hot; 6 AMX loop hot; 7 AMX loop by halves, next chunk to L2; 8 the same hot.
double gemm1(std::vector<at::Tensor> copies, at::Tensor x, int64_t Np, int64_t how) {
  syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
  const int64_t E = copies[0].size(0), J = copies[0].size(1), H = copies[0].size(2);
  const bool own = how == 3 || how == 4 || how >= 6;
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, 2, 1, [&](int64_t p0, int64_t p1) {
    const at::Tensor c_buffer = at::empty({32 * Np}, at::kFloat);  // 64-byte aligned
    float* c = c_buffer.data_ptr<float>();
    const bf16* xs = x.data_ptr<bf16>();
    if (own) configure_tiles();
    for (auto& w : copies) {
      const bf16* base = w.data_ptr<bf16>();
      const int64_t e0 = p0 * E / 2, e1 = p1 * E / 2;
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t j = 0; j < J; j += 32) {
          const bool hot = how == 5 || how == 6 || how == 8;
          const bf16* rows = hot ? base + j * H : base + (e * J + j) * H;
          const bool more = (e * J + j + 32) < e1 * J;
          if (how == 2) {
            cb::brgemm(Np, 32, H, H, 32, 32, false, xs, rows, c, true);
          } else if (own) {
            const char* next = (how == 4 || how == 7) && more ? reinterpret_cast<const char*>(rows + 32 * H) : nullptr;
            if (how >= 7)
              chunk_halves(rows, H, xs, Np, c, next);
            else
              chunk(rows, H, xs, Np, c, next);
          } else {
            if (how == 1 && more)
              for (int64_t l = 0; l < 32 * H * 2; l += 64)
                _mm_prefetch(reinterpret_cast<const char*>(rows + 32 * H) + l, _MM_HINT_T0);
            cb::brgemm(32, Np, H, H, Np, Np, false, rows, xs, c, true);
          }
        }
    }
    if (own) release_tiles(); else cb::brgemm_release(true);
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / copies.size();
}

// FLOP/s of each of two threads running four independent tile dot products on loaded tiles for `seconds`.
__attribute__((target("amx-tile,amx-bf16")))
std::vector<double> peak(double seconds) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  std::vector<double> rate(2, 0.0);
  at::parallel_for(0, 2, 1, [&](int64_t p0, int64_t p1) {
    alignas(64) static thread_local uint16_t tile[16 * 32];
    for (int i = 0; i < 16 * 32; ++i) tile[i] = 0x3f80 + (i % 7);  // ~1.0 in bf16
    configure_tiles();
    _tile_loadd(4, tile, 64); _tile_loadd(5, tile, 64); _tile_loadd(6, tile, 64); _tile_loadd(7, tile, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    int64_t steps = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double elapsed = 0.0;
    while (elapsed < seconds) {
      for (int i = 0; i < 1000; ++i) {
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      steps += 1000;
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    alignas(64) float sink[256];
    _tile_stored(0, sink, 64);
    release_tiles();
    for (int64_t p = p0; p < p1; ++p) rate[p] = steps * 4 * 2.0 * 16 * 16 * 32 / elapsed;
  });
  return rate;
}

// The AMX loop against brgemm on one chunk: the largest absolute difference.
double check(at::Tensor w, at::Tensor x, int64_t Np) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  const int64_t H = w.size(1);
  const at::Tensor a = at::empty({32 * Np}, at::kFloat), b = at::empty({32 * Np}, at::kFloat);
  cb::brgemm(32, Np, H, H, Np, Np, false, w.data_ptr<bf16>(), x.data_ptr<bf16>(), a.data_ptr<float>(), true);
  cb::brgemm_release(true);
  configure_tiles();
  chunk(w.data_ptr<bf16>(), H, x.data_ptr<bf16>(), Np, b.data_ptr<float>(), nullptr);
  const double loop = (a - b).abs().max().item<double>();
  chunk_halves(w.data_ptr<bf16>(), H, x.data_ptr<bf16>(), Np, b.data_ptr<float>(), nullptr);
  release_tiles();
  return loop + (a - b).abs().max().item<double>();
}
"""

NAMES = ("brgemm, weights as A", "brgemm, A, next chunk to L1", "brgemm, weights packed as B", "AMX loop",
         "AMX loop, next chunk to L2", "brgemm, A, hot", "AMX loop, hot", "AMX loop by halves, next to L2",
         "AMX loop by halves, hot")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,32,48,192",
                   help="token columns per expert (comma list, multiples of 16; the halves loop only up to 48)")
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--peak", action="store_true", help="only the tiles' rate with no memory traffic, 10 samples")
    args = p.parse_args(argv)
    mod = load_inline("deepseek_moe_brgemm_layouts", cpp_sources=SOURCE, functions=["gemm1", "check", "peak"],
                      extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.set_num_threads(2)
    if args.peak:
        print(f"torch {torch.__version__}; AMX bf16 tiles on loaded operands, TFLOP/s per thread, 0.5 s samples")
        for i in range(10):
            rates = mod.peak(0.5)
            print(f"sample {i}: " + " + ".join(f"{r / 1e12:.2f}" for r in rates) + f" = {sum(rates) / 1e12:.2f}",
                  flush=True)
        return 0
    E, J, H = 64, 704, 1024
    diff = mod.check(torch.randn(32, H).bfloat16(), torch.randn(48 * H).bfloat16(), 48)
    if diff != 0.0:
        print(f"the AMX loop differs from brgemm by {diff}", file=sys.stderr)
        return 1
    copies = [torch.randn(E, J, H).bfloat16() for _ in range(args.copies)]
    mb = E * J * H * 2 / 1e6
    print(f"torch {torch.__version__}; {E} experts x {J} x {H} bf16 ({mb:.0f} MB a copy, {args.copies} copies); "
          f"2 threads; the AMX loop equals brgemm on a chunk")
    for Np in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(Np * H).bfloat16()
        best = [float("inf")] * len(NAMES)
        for _ in range(3):  # passes, contenders interleaved within each
            for how in range(len(NAMES)):
                if how >= 7 and Np > 48:
                    continue
                best[how] = min(best[how], mod.gemm1(copies, x, Np, how))
        for name, t in zip(NAMES, best):
            if t == float("inf"):
                continue
            print(f"{Np:4d} tokens/expert  {name:>28s} {t * 1e3:7.2f} ms {mb / t / 1e3:6.1f} GB/s "
                  f"{2 * E * J * H * Np / t / 1e12:5.2f} TFLOP/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
