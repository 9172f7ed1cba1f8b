"""CPU benchmark of one DeepSeekMoE layer against a dense SwiGLU FFN with the same active FLOPs (issue 2).

    python benchmarks/layer_cpu.py                       # T=4096, H=1024, 64x352 + 2 shared, top-6
    python benchmarks/layer_cpu.py --tokens 2048 --dtypes bfloat16 --repeats 5

Timings interleave the contenders round by round in one process (other processes share the cores), and
report the median of each; ratios are to the dense FFN of the same round set. Each round draws a fresh input,
so the routing (and the per-expert row counts) change between calls as they do in training.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import deepseek_moe as dm
from deepseek_moe.bench.timing import interleaved, run_once
from deepseek_moe.experts import SharedExperts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--expert-hidden-size", type=int, default=352)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--shared", type=int, default=2)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-eager", action="store_true", help="skip the (slow) eager reference backend")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = dm.MoEConfig(hidden_size=args.hidden_size, expert_hidden_size=args.expert_hidden_size,
                       num_routed_experts=args.experts, num_shared_experts=args.shared, top_k=args.top_k)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; T={args.tokens} H={cfg.hidden_size} "
          f"E={cfg.num_routed_experts}x{cfg.expert_hidden_size} +{cfg.num_shared_experts} shared, K={cfg.top_k}; "
          f"dense-equivalent width {cfg.dense_equivalent_width}")
    print(f"{'dtype':9s} {'mode':7s} {'contender':12s} {'median s':>9s} {'vs dense':>9s}")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        contenders = {"dense": SharedExperts.dense(cfg.hidden_size, cfg.dense_equivalent_width).to(dtype)}
        for backend in ("torch",) + (() if args.no_eager else ("eager",)):
            layer = dm.DeepSeekMoELayer(cfg.replace(backend=backend, aux_loss_alpha=0.0)).to(dtype)
            contenders[backend] = layer
        xs = [torch.randn(args.tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
              for _ in range(args.repeats + 1)]
        for mode in ("fwd", "fwdbwd"):
            fns = {name: (lambda r, m=m: run_once(m, xs[r], mode)) for name, m in contenders.items()}
            # One timed round is enough for the slow oracle.
            times = interleaved(fns, args.repeats, torch.device("cpu"), skip=lambda name, r: name == "eager" and r >= 1)
            dense = statistics.median(times["dense"])
            for name, ts in times.items():
                med = statistics.median(ts)
                print(f"{dtype_name:9s} {mode:7s} {name:12s} {med:9.3f} {med / dense:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
