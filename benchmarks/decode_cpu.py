"""Decode on CPU: the forward of a few tokens through one DeepSeekMoE layer against a dense SwiGLU FFN that reads
the same weight bytes.

    python benchmarks/decode_cpu.py                     # T = 1, 8, 64; H=1024, 64x352 + 2 shared, K=6, fp32

At small T a forward is bound by reading weights: the layer reads the shared experts and every routed expert some
token picked (distinct experts touched × expert bytes). The dense contender for each input is a SwiGLU FFN of
width (distinct experts touched + Ks) · I, which reads exactly as many weight bytes; its time is the bound the
layer is held to. One process, forward under inference mode, contenders interleaved round by round, each round on
a fresh input (its routing decides the dense width, so each round builds its dense FFN first), 20 calls per
sample, median of the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import deepseek_moe as dm
from deepseek_moe.bench.timing import interleaved
from deepseek_moe.experts import SharedExperts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,64")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--expert-hidden-size", type=int, default=352)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    cfg = dm.MoEConfig(hidden_size=args.hidden_size, expert_hidden_size=args.expert_hidden_size,
                       num_routed_experts=64, num_shared_experts=2, top_k=6, backend=args.backend)
    layer = dm.DeepSeekMoELayer(cfg).to(dtype).eval()
    H, I, Ks = cfg.hidden_size, cfg.expert_hidden_size, cfg.num_shared_experts
    expert_mb = 3 * H * I * torch.finfo(dtype).bits / 8 / 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; H={H} 64x{I} +{Ks} shared K=6; "
          f"backend {layer.backend!r}; {args.rounds} rounds of 20 calls")
    print(f"{'T':>4s} {'experts':>8s} {'weight MB':>10s} {'layer ms':>9s} {'layer GB/s':>11s} {'dense ms':>9s} "
          f"{'x dense':>8s}")
    for T in (int(t) for t in args.tokens.split(",")):
        xs = [torch.randn(T, H, dtype=dtype) for _ in range(args.rounds)]
        ratios, layer_ms, dense_ms, touched = [], [], [], []
        for r, x in enumerate(xs):
            with torch.inference_mode():
                distinct = int(layer.route(x)[1].counts_E.count_nonzero())
            dense = SharedExperts.dense(H, (distinct + Ks) * I).to(dtype).eval()
            fns = {"layer": lambda _, x=x: layer(x), "dense": lambda _, x=x: dense(x)}
            with torch.inference_mode():
                t = {k: statistics.median(v) for k, v in interleaved(fns, 3, cpu, warmup=2, calls=20).items()}
            ratios.append(t["layer"] / t["dense"])
            layer_ms.append(t["layer"] * 1e3)
            dense_ms.append(t["dense"] * 1e3)
            touched.append(distinct + Ks)
        n = statistics.median(touched)
        mb, ms = n * expert_mb, statistics.median(layer_ms)
        print(f"{T:4d} {n:8.0f} {mb:10.1f} {ms:9.3f} {mb * 2**20 / 1e9 / (ms / 1e3):11.1f} "
              f"{statistics.median(dense_ms):9.3f} {statistics.median(ratios):7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
