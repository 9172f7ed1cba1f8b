"""Dispatch data movement on CPU: the compiled extension's ops against the torch ops (issue 6), then the layer.

    python benchmarks/dispatch_cpu.py                 # T=16384, H=2048, E=64, K=6, fp32; layer at T=4096, H=1024

Part 1, one process, interleaved rounds, medians: routing metadata (extension: stable counting sort; torch:
build_plan's argsort), permute (gather rows into expert order) and combine (K-way sum into token rows), forward
and backward (permute's backward is a combine and combine's a permute: autograd of each). The extension runs
twice: with its host block cache (the default; steady state reuses freed output blocks) and with the cache off
('ext fresh': every large output newly mapped, on huge pages where the kernel grants them). For the torch ops
on huge pages too, run with THP_MEM_ALLOC_ENABLE=1 (PyTorch's CPU allocator reads it at start-up). Part 2: the whole
DeepSeekMoE layer, forward+backward, backend "ext" against backend "torch" (same weights and input).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

import deepseek_moe as dm
from deepseek_moe import ext
from deepseek_moe.backends import ext as ext_backend
from deepseek_moe.bench.timing import run_once
from deepseek_moe.dispatch import build_plan, combine_rows, gather_rows
from deepseek_moe.testing import make_topk


def _median_times(fns: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, List[float]]:
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    return times


def _without_cache(fn: Callable[[], None]) -> Callable[[], None]:
    """fn with the extension's block cache off: every large output is a freshly mapped (huge-page) block."""

    def call() -> None:
        ext.set_cache_limit(0)
        try:
            fn()  # the result is dropped inside, so its block is released while the limit is 0
        finally:
            ext.set_cache_limit(None)

    return call


def dispatch_part(T: int, H: int, E: int, K: int, dtype: torch.dtype, repeats: int) -> None:
    topk = make_topk(T, E, K, "random")
    weight = torch.rand(T, K)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    o = torch.randn(T * K, H, dtype=dtype, requires_grad=True)
    grad_NH, grad_TH = torch.randn(T * K, H, dtype=dtype), torch.randn(T, H, dtype=dtype)
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
    print(f"dispatch ops: T={T} H={H} E={E} K={K} {dtype}, {torch.get_num_threads()} threads, median of {repeats}")
    # Two passes, so the cache-off runs never evict the cached runs' blocks; each pass has its own torch column.
    for label, variant in (("ext: block cache on (default; steady state reuses freed output blocks)", lambda f: f),
                           ("ext fresh: block cache off, every large output newly mapped (huge-page advice)",
                            _without_cache)):
        print(f"\n{label}")
        print(f"{'step':18s} {'torch ms':>9s} {'ext ms':>8s} {'speed-up':>9s}")
        total = {"torch": 0.0, "ext": 0.0}
        for step, fns in steps.items():
            times = _median_times({"torch": fns["torch"], "ext": variant(fns["ext"])}, repeats)
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


def layer_part(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, repeats: int) -> None:
    cfg = dm.MoEConfig(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, num_shared_experts=2, top_k=K)
    layers = {name: dm.DeepSeekMoELayer(cfg.replace(backend=name)).to(dtype) for name in ("torch", "ext")}
    layers["ext"].load_state_dict(layers["torch"].state_dict())
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    times = _median_times({name: (lambda m=m: run_once(m, x, "fwdbwd")) for name, m in layers.items()}, repeats)
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
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ext_backend.ensure_loaded()
    dispatch_part(args.tokens, args.hidden_size, args.experts, args.top_k, dtype, args.repeats)
    if args.layer_tokens:
        layer_part(args.layer_tokens, 1024, 352, 64, 6, dtype, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
