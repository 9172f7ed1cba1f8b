"""Which operand layout streams fine-grained experts' bf16 weights faster through oneDNN's brgemm (AMX): the blocks
op's choice (weight rows as the A operand, in their public layout) or SGLang's (weights packed once as the B
operand: contiguous tiles, one sequential stream).

    python benchmarks/brgemm_layouts.py            # 64 experts x 704 x 1024 bf16 gate/up weights, 16/48/192 tokens

GEMM 1 of the prefill op alone, both threads splitting the experts, the weights cold (8 copies of 92 MB cycled, so
nothing stays in the caches between two visits of a copy); for each expert and each chunk of 32 weight rows (or
32 packed columns) one micro-kernel call over all its token columns. Also the A layout with the next chunk
prefetched into L1 before each call. Times are per copy, the best of three passes; GB/s is the weight bytes over
that time. A C++ snippet compiled just in time with torch.utils.cpp_extension (~40 s the first time); the CPU
needs oneDNN's bf16 micro-kernel (AMX).
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
#include <chrono>
#include <vector>
namespace cb = at::native::cpublas;

// layout 0: weight rows as A (32 x H, row stride H), x as B [H/2][Np][2]; 1: the same with the next 32 rows
// prefetched into L1 first; 2: weights as B blocks [H/2][32][2] (contiguous), x rows as A (Np x H).
double gemm1(std::vector<at::Tensor> copies, at::Tensor x, int64_t Np, int64_t layout) {
  const int64_t E = copies[0].size(0), J = copies[0].size(1), H = copies[0].size(2);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, 2, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> c(32 * Np);
    const at::BFloat16* xs = x.data_ptr<at::BFloat16>();
    for (auto& w : copies) {
      const at::BFloat16* base = w.data_ptr<at::BFloat16>();
      const int64_t e0 = p0 * E / 2, e1 = p1 * E / 2;
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t j = 0; j < J; j += 32) {
          const at::BFloat16* chunk = base + (e * J + j) * H;
          if (layout == 2) {
            cb::brgemm(Np, 32, H, H, 32, 32, false, xs, chunk, c.data(), true);
            continue;
          }
          if (layout == 1 && (e * J + j + 32) < e1 * J)
            for (int64_t l = 0; l < 32 * H * 2; l += 64)
              _mm_prefetch(reinterpret_cast<const char*>(chunk + 32 * H) + l, _MM_HINT_T0);
          cb::brgemm(32, Np, H, H, Np, Np, false, chunk, xs, c.data(), true);
        }
    }
    cb::brgemm_release(true);
  });
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / copies.size();
}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,48,192", help="token columns per expert (comma list)")
    p.add_argument("--copies", type=int, default=8)
    args = p.parse_args(argv)
    mod = load_inline("deepseek_moe_brgemm_layouts", cpp_sources=SOURCE, functions=["gemm1"],
                      extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.set_num_threads(2)
    E, J, H = 64, 704, 1024
    copies = [torch.randn(E, J, H).bfloat16() for _ in range(args.copies)]
    mb = E * J * H * 2 / 1e6
    print(f"torch {torch.__version__}; {E} experts x {J} x {H} bf16 ({mb:.0f} MB a copy, {args.copies} copies); 2 threads")
    names = ("weights as A", "weights as A, next chunk prefetched", "weights packed as B (SGLang)")
    for Np in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(Np * H).bfloat16()
        for layout, name in enumerate(names):
            t = min(mod.gemm1(copies, x, Np, layout) for _ in range(3))
            print(f"{Np:4d} tokens/expert  {name:>36s} {t * 1e3:7.2f} ms {mb / t / 1e3:6.1f} GB/s "
                  f"{2 * E * J * H * Np / t / 1e12:5.2f} TFLOP/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
