"""The GEMM rates a fine-grained MoE gets on this CPU against a dense FFN of the same active FLOPs or weight bytes.

    python benchmarks/gemm_rates_cpu.py          # H=1024, 64 experts of I=352, K=6; dense width 2816

These are the floors under the layer benchmarks (docs/benchmarks.md): no MoE code runs here, only PyTorch's
``torch.mm`` / ``F.linear`` on the shapes the layer hands to MKL and oneDNN.

* training shapes (T = 4096): the 64 experts' GEMMs at ~T·K/E rows each, each expert's weights cold (a different
  expert every call, as in the layer), against the dense FFN's GEMMs, forward and backward shapes, fp32 and bf16;
* decode (T = 1): the GEMVs of K randomly chosen experts (cold weights) against the dense FFN's GEMVs, in GB/s of
  weights streamed.

Interleaved rounds (``deepseek_moe.bench.timing.interleaved``), median; ratios are per-FLOP or per-byte time of the
expert shapes over the dense shapes (1.0 = the same rate).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from deepseek_moe.bench.timing import interleaved


def _median_s(fns, rounds):
    return {name: statistics.median(ts) for name, ts in interleaved(fns, rounds, torch.device("cpu")).items()}


def training_rates(H, I, E, K, T, dtype, rounds):
    """Per-FLOP time of E per-expert GEMMs (n = T·K/E rows, cold weights) over the dense FFN's GEMMs."""
    n, F_dense = T * K // E, (K + 2) * I
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(E, 2 * I, H, generator=g).to(dtype)
    dn = torch.randn(E, H, I, generator=g).to(dtype)
    x, a, go = (torch.randn(n, d, generator=g).to(dtype) for d in (H, I, H))
    h = torch.randn(n, 2 * I, generator=g).to(dtype)
    W, Wd = torch.randn(2 * F_dense, H, generator=g).to(dtype), torch.randn(H, F_dense, generator=g).to(dtype)
    X, A, G = (torch.randn(T, d, generator=g).to(dtype) for d in (H, F_dense, H))
    Hd = torch.randn(T, 2 * F_dense, generator=g).to(dtype)
    # (expert loop, dense equivalent, FLOPs of the loop, FLOPs of the dense op)
    shapes = {
        "x·gate_upᵀ": (lambda: [x @ gu[e].t() for e in range(E)], lambda: X @ W.t(), 2 * E * n * H * 2 * I,
                       2 * T * H * 2 * F_dense),
        "a·downᵀ": (lambda: [a @ dn[e].t() for e in range(E)], lambda: A @ Wd.t(), 2 * E * n * I * H,
                    2 * T * F_dense * H),
        "grad_a = g·down": (lambda: [go @ dn[e] for e in range(E)], lambda: G @ Wd, 2 * E * n * H * I,
                            2 * T * H * F_dense),
        "grad_down = gᵀ·a": (lambda: [go.t() @ a for _ in range(E)], lambda: G.t() @ A, 2 * E * n * H * I,
                             2 * T * H * F_dense),
        "grad_gate_up = hᵀ·x": (lambda: [h.t() @ x for _ in range(E)], lambda: Hd.t() @ X, 2 * E * n * 2 * I * H,
                                2 * T * 2 * F_dense * H),
        "grad_x = h·gate_up": (lambda: [h @ gu[e] for e in range(E)], lambda: Hd @ W, 2 * E * n * 2 * I * H,
                               2 * T * 2 * F_dense * H),
    }
    rows = []
    for name, (loop, dense, loop_flops, dense_flops) in shapes.items():
        s = _median_s({"experts": lambda r, f=loop: f(), "dense": lambda r, f=dense: f()}, rounds)
        rows.append((name, loop_flops / s["experts"] / 1e12, dense_flops / s["dense"] / 1e12))
    return n, rows


def decode_rates(H, I, E, K, rounds, calls=50):
    """GB/s of weights streamed by K cold experts' GEMVs against the dense FFN's GEMVs (fp32, T = 1)."""
    g = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    F_dense = (K + 2) * I
    W, Wd = torch.randn(2 * F_dense, H, generator=g), torch.randn(H, F_dense, generator=g)
    x, a, ad = torch.randn(1, H, generator=g), torch.randn(1, I, generator=g), torch.randn(1, F_dense, generator=g)
    picks = [torch.randperm(E, generator=g)[:K].tolist() for _ in range(calls)]

    def experts(_r):
        for ids in picks:
            for e in ids:
                F.linear(x, gu[e])
                F.linear(a, dn[e])

    def dense(_r):
        for _ in picks:
            F.linear(x, W)
            F.linear(ad, Wd)

    with torch.inference_mode():
        s = _median_s({"experts": experts, "dense": dense}, rounds)
    bytes_experts, bytes_dense = K * 3 * I * H * 4, 3 * F_dense * H * 4
    return bytes_experts / (s["experts"] / calls) / 1e9, bytes_dense / (s["dense"] / calls) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--expert-hidden-size", type=int, default=352)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    H, I, E, K = args.hidden_size, args.expert_hidden_size, args.experts, args.top_k
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H}, {E} experts of I={I}, K={K}; "
          f"dense width {(K + 2) * I}")
    for dtype in (torch.float32, torch.bfloat16):
        n, rows = training_rates(H, I, E, K, args.tokens, dtype, args.rounds)
        print(f"\n{str(dtype)[6:]}, T={args.tokens}: {E} expert GEMMs of {n} rows vs the dense FFN's GEMMs (TFLOP/s)",
              flush=True)
        print(f"{'shape':22s} {'experts':>8s} {'dense':>8s} {'rate ratio':>10s}")
        for name, experts, dense in rows:
            print(f"{name:22s} {experts:8.3f} {dense:8.3f} {experts / dense:10.2f}")
    experts_gbs, dense_gbs = decode_rates(H, I, E, K, args.rounds)
    print(f"\nfp32 decode, T=1: {K} cold experts' GEMVs {experts_gbs:.1f} GB/s, dense FFN's GEMVs {dense_gbs:.1f} GB/s "
          f"(ratio {experts_gbs / dense_gbs:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
