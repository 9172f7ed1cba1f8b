"""Dispatch data movement on CPU: the compiled extension's ops against the torch ops (issue 6), then the layer.

    python benchmarks/dispatch_cpu.py                 # T=16384, H=2048, E=64, K=6, fp32; layer at T=4096, H=1024

Part 1, one process, interleaved rounds, medians: routing metadata (extension: stable counting sort; torch:
build_plan's argsort), permute (gather rows into expert order) and combine (K-way sum into token rows), forward
and backward (permute's backward is a combine and combine's a permute: autograd of each). The extension runs
twice: with its host block cache (the default; steady state reuses freed output blocks, new ones are mapped on
huge pages) and with the cache off (outputs from ATen's allocator, as the torch ops get them: the kernels alone).
For the torch ops on huge pages too, run with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator reads it at
start-up). Part 2: the whole
DeepSeekMoE layer, forward+backward, backend "ext" against backend "torch" (same weights and input).

    python benchmarks/dispatch_cpu.py --device cuda --dtype bfloat16   # the CUDA table (needs the CUDA build)

On CUDA the host block cache plays no part (one pass) and the layer runs in the given dtype (the ext backend
uses PyTorch's grouped GEMM there: bf16 on compute capability >= 9.0).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Dict, List

import torch

import deepseek_moe as dm
from deepseek_moe import ext
from deepseek_moe.backends import ext as ext_backend
from deepseek_moe.bench.timing import run_once, time_call
from deepseek_moe.dispatch import build_plan, combine_rows, gather_rows
from deepseek_moe.testing import make_topk


def _median_times(fns: Dict[str, Callable[[], None]], repeats: int, device: torch.device) -> Dict[str, List[float]]:
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def _without_cache(fn: Callable[[], None]) -> Callable[[], None]:
    """fn with the extension's block cache off: its outputs come from ATen's allocator, like the torch ops'."""

    def call() -> None:
        ext.set_cache_limit(0)
        try:
            fn()
        finally:
            ext.set_cache_limit(None)

    return call


def dispatch_part(T: int, H: int, E: int, K: int, dtype: torch.dtype, repeats: int, device: torch.device) -> None:
    topk = make_topk(T, E, K, "random").to(device)
    weight = torch.rand(T, K, device=device)
    x = torch.randn(T, H, dtype=dtype, device=device, requires_grad=True)
    o = torch.randn(T * K, H, dtype=dtype, device=device, requires_grad=True)
    grad_NH = torch.randn(T * K, H, dtype=dtype, device=device)
    grad_TH = torch.randn(T, H, dtype=dtype, device=device)
    plans = {"torch": build_plan(topk, weight, E), "ext": ext_backend.route_plan(topk, weight, E)}
    gather = {"torch": gather_rows, "ext": ext_backend.permute}
    combine = {"torch": combine_rows, "ext": ext_backend.combine}
    steps = {
        "metadata": {"torch": lambda: build_plan(topk, weight, E), "ext": lambda: ext_backend.route_plan(topk, weight, E)},
        "permute fwd": {k: (lambda k=k: gather[k](x.detach(), plans[k])) for k in plans},
        "combine fwd": {k: (lambda k=k: combine[k](o.detach(), plans[k])) for k in plans},
        "permute fwd+bwd": {k: (lambda k=k: torch.autograd.grad(gather[k](x, plans[k]), x, grad_NH)) for k in plans},
        "combine fwd+bwd": {k: (lambda k=k: torch.autograd.grad(combine[k](o, plans[k]), o, grad_TH)) for k in plans},
    }
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"dispatch ops: T={T} H={H} E={E} K={K} {dtype}, {where}, median of {repeats}")
    # Two passes, so the cache-off runs never evict the cached runs' blocks; each pass has its own torch column.
    passes = [("ext: block cache on (default; steady state reuses freed output blocks)", lambda f: f),
              ("ext, block cache off: outputs from ATen's allocator like the torch ops' (the kernels alone)",
               _without_cache)]
    for label, variant in (passes if device.type == "cpu" else [("ext (CUDA kernels)", lambda f: f)]):
        print(f"\n{label}")
        print(f"{'step':18s} {'torch ms':>9s} {'ext ms':>8s} {'speed-up':>9s}")
        total = {"torch": 0.0, "ext": 0.0}
        for step, fns in steps.items():
            times = _median_times({"torch": fns["torch"], "ext": variant(fns["ext"])}, repeats, device)
            med = {k: statistics.median(v) for k, v in times.items()}
            if step in ("metadata", "permute fwd+bwd", "combine fwd+bwd"):
                for k in total:
                    total[k] += med[k]
            _row(step, med)
        _row("all, fwd+bwd", total)
        print("(all = metadata + permute fwd+bwd + combine fwd+bwd)")
        print(f"block cache: {ext.cache_info()}")


def _row(label: str, ms: Dict[str, float]) -> None:
    print(f"{label:18s} {ms['torch'] * 1e3:9.2f} {ms['ext'] * 1e3:8.2f} {ms['torch'] / ms['ext']:8.2f}x")


def layer_part(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, repeats: int, device: torch.device
               ) -> None:
    cfg = dm.MoEConfig(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=2, top_k=K)
    layers = {name: dm.DeepSeekMoELayer(cfg.replace(backend=name)).to(device, dtype) for name in ("torch", "ext")}
    layers["ext"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(T, H, dtype=dtype, device=device, requires_grad=True)
    times = _median_times({name: (lambda m=m: run_once(m, x, "fwdbwd")) for name, m in layers.items()}, repeats,
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
