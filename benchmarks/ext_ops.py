"""What each op of the compiled extension (csrc/) earns over the torch path it replaces.

    python benchmarks/ext_ops.py                 # T=16384, H=2048, E=64, K=6, fp32; layer at T=4096, H=1024
    python benchmarks/ext_ops.py --device cuda --dtype bfloat16   # needs the CUDA build of the extension

One process, interleaved rounds, medians. Part 1, the dispatch ops: the routing plan (extension: stable
counting sort on CPU, radix sort on CUDA; torch: build_plan's argsort) and the weighted combine (weigh and sum
each token's K rows, forward and forward+backward). Part 2: the whole DeepSeekMoE layer, forward+backward,
backend "ext" (on CPU the C++ segment loop, segment_mlp_fused) against backend "torch" (same weights and input).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import deepseek_moe as dm
from deepseek_moe.backends import ext as ext_backend
from deepseek_moe.bench.timing import interleaved, run_once
from deepseek_moe.dispatch import build_plan, combine_rows
from deepseek_moe.testing import make_topk


def dispatch_part(T: int, H: int, E: int, K: int, dtype: torch.dtype, repeats: int, device: torch.device) -> None:
    topk = make_topk(T, E, K, "random").to(device)
    weight = torch.rand(T, K, device=device, requires_grad=True)
    o = torch.randn(T * K, H, dtype=dtype, device=device, requires_grad=True)
    grad_TH = torch.randn(T, H, dtype=dtype, device=device)
    plan = build_plan(topk, weight, E)
    combine = {"torch": lambda o: combine_rows(o, plan, weighted=True),
               "ext": lambda o: ext_backend.combine(o, plan, weighted=True)}
    steps = {
        "route plan": {"torch": lambda: build_plan(topk, weight, E), "ext": lambda: ext_backend.route_plan(topk, weight, E)},
        "combine fwd": {k: (lambda k=k: combine[k](o.detach())) for k in combine},
        "combine fwd+bwd": {k: (lambda k=k: torch.autograd.grad(combine[k](o), (o, weight), grad_TH)) for k in combine},
    }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"dispatch ops: T={T} H={H} E={E} K={K} {dtype}, {where}, median of {repeats}")
    print(f"{'step':18s} {'torch ms':>9s} {'ext ms':>8s} {'speed-up':>9s}")
    for step, fns in steps.items():
        times = interleaved({k: (lambda r, f=f: f()) for k, f in fns.items()}, repeats, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{step:18s} {med['torch'] * 1e3:9.2f} {med['ext'] * 1e3:8.2f} {med['torch'] / med['ext']:8.2f}x")


def layer_part(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, repeats: int, device: torch.device
               ) -> None:
    cfg = dm.MoEConfig(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=2, top_k=K)
    layers = {name: dm.DeepSeekMoELayer(cfg.replace(backend=name)).to(device, dtype) for name in ("torch", "ext")}
    layers["ext"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(T, H, dtype=dtype, device=device, requires_grad=True)
    times = interleaved({name: (lambda r, m=m: run_once(m, x, "fwdbwd")) for name, m in layers.items()}, repeats,
                        device)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in times.items()}
    print(f"\nlayer fwd+bwd: T={T} H={H} {E}x{I} +2 shared K={K} {dtype}, median of {repeats}")
    for name in layers:
        print(f"  backend {name:6s} {med[name]:.3f} s  (range {spread[name]})")
    print(f"  ext / torch = {med['ext'] / med['torch']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--layer-tokens", type=int, default=4096, help="T of the layer comparison (0 skips it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    ext_backend.ensure_loaded()
    if device.type == "cuda" and not ext_backend.has_cuda_kernels():
        p.error("the loaded extension has no CUDA kernels: build it with TORCH_CUDA_ARCH_LIST=... "
                "DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation")
    dispatch_part(args.tokens, args.hidden_size, args.experts, args.top_k, dtype, args.repeats, device)
    if args.layer_tokens:
        layer_part(args.layer_tokens, 1024, 352, 64, 6, dtype, args.repeats, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
