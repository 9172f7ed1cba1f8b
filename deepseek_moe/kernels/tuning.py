"""Autotune sweep of the grouped-MLP kernels' tiles: each kernel kind timed alone, on the layer's shape, for every
candidate; the winners go to the tuning table that selection reads (:func:`.heuristics.tile_config`).

``benchmarks/gpu/run_all.py --tune`` runs it per shape on the device and writes the table; tests run it in Triton's
interpreter at toy sizes (``interpret=True``: two candidates, one call each), which checks the plumbing, not speed.
The heuristic's tiles are always the first candidate, so a sweep cut short by its time budget never records
anything slower than what selection would have used without it.

Legend: T tokens, K experts per token, E experts, H hidden size, I expert hidden size, J = 2·I, N sorted pairs.
"""
from __future__ import annotations

import time
from dataclasses import astuple, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..plan import build_plan
from . import launch
from .heuristics import KINDS, TileConfig, gpu_tile_config

# Tiles tried on a GPU besides the heuristic's, per kind: (BM, BC, BR, warps, stages). gate_up keeps two
# accumulators (gate and up) per program, so its BC stays at most 128; the others trade rows for columns.
_GPU_CANDIDATES = {
    "gate_up": [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 8, 4),
                (128, 64, 32, 4, 4), (256, 64, 64, 8, 3)],
    "down": [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
             (256, 128, 64, 8, 3), (64, 64, 64, 4, 3)],
}
_GPU_CANDIDATES["dgrad"] = _GPU_CANDIDATES["down"]
_GPU_CANDIDATES["down_bwd"] = _GPU_CANDIDATES["gate_up"]
_GPU_CANDIDATES["wgrad"] = [(128, 128, 64, 8, 3), (64, 128, 32, 4, 4), (128, 64, 64, 8, 4), (64, 64, 64, 4, 3),
                            (128, 256, 32, 8, 3)]


def candidates(kind: str, dtype: torch.dtype, capability_major: int, interpret: bool) -> List[TileConfig]:
    """The tiles the sweep tries for ``kind``, the heuristic's first. In the interpreter two small ones (the
    sweep's plumbing is what runs there). Raises ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"candidates: unknown kernel kind {kind!r}; expected one of {KINDS}")
    if interpret:
        return [TileConfig(32, 32, 32), TileConfig(16, 32, 16)]
    first = gpu_tile_config(kind, dtype, capability_major)
    rest = [TileConfig(*c) for c in _GPU_CANDIDATES[kind] if dtype.itemsize <= 2 or c[2] <= 32]
    return [first] + [c for c in rest if c != first]


@dataclass
class SweepResult:
    """Winners per kind and every (tiles, ms) measured; ``skipped``: kinds the budget left untried."""

    best: Dict[str, TileConfig] = field(default_factory=dict)
    timings: Dict[str, List[tuple]] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)

    def measured(self) -> Dict[str, object]:
        return {"timings_ms": {k: [[list(astuple(t)), ms] for t, ms in v] for k, v in self.timings.items()},
                "skipped": self.skipped}


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one untimed call (the compile)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - begin)
    return sorted(samples)[len(samples) // 2]


def kernel_calls(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, device: torch.device,
                 interpret: bool, seed: int = 0) -> Dict[str, Callable[[TileConfig], object]]:
    """{kind: call(tiles)} running each kernel once on random data of this shape (balanced routing: T·K/E pairs
    per expert), the layer's arguments as the triton backend passes them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    topk_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(device)
    plan = build_plan(topk_TK, torch.rand(T, K, generator=g).to(device), E)
    token_N, pair_N, offsets = plan.token_N, plan.pair_N, plan.offsets_E1
    weight_N = plan.weight_TK.reshape(-1)[pair_N].float()

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x_TH, gate_up, down = randn(T, H), randn(E, 2 * I, H, scale=H ** -0.5), randn(E, H, I, scale=I ** -0.5)
    N = token_N.numel()
    h_NJ, a_NI, grad_y, grad_h = randn(N, 2 * I), randn(N, I), randn(T, H), randn(N, 2 * I)
    return {
        "gate_up": lambda c: launch.gate_up_swiglu(x_TH, token_N, weight_N, gate_up, offsets, c, interpret),
        "down": lambda c: launch.grouped_gemm_scatter(a_NI, down.transpose(1, 2), pair_N, T * K, offsets, False, c,
                                                      interpret),
        "dgrad": lambda c: launch.grouped_gemm_scatter(grad_h, gate_up, pair_N, T * K, offsets, False, c, interpret),
        "down_bwd": lambda c: launch.down_swiglu_backward(grad_y, token_N, down, h_NJ, weight_N, offsets, c,
                                                          interpret),
        "wgrad": lambda c: launch.expert_weight_grad(grad_h, None, x_TH, token_N, offsets, dtype, c, interpret),
    }


def sweep(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, device: torch.device, interpret: bool,
          budget_s: float = float("inf"), repeats: int = 5,
          progress: Optional[Callable[[str], None]] = None) -> SweepResult:
    """Time every candidate of every kernel kind on this shape and keep the fastest per kind. Stops trying new
    candidates once ``budget_s`` seconds have passed (a kind not started by then is in ``skipped``; a started
    one keeps its best so far, at worst the heuristic's). A candidate that fails to compile or launch (e.g. too
    much shared memory) is skipped and reported through ``progress``."""
    calls = kernel_calls(T, H, I, E, K, dtype, device, interpret)
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    result, begin = SweepResult(), time.perf_counter()
    say = progress or (lambda _: None)
    for kind in KINDS:
        for tiles in candidates(kind, dtype, major, interpret):
            if time.perf_counter() - begin > budget_s:
                if kind not in result.best:
                    result.skipped.append(kind)
                break
            try:
                ms = _seconds(lambda: calls[kind](tiles), device, 1 if interpret else repeats) * 1e3
            except Exception as err:  # out of shared memory or registers: not a candidate on this GPU
                say(f"tune {kind} {tiles}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            result.timings.setdefault(kind, []).append((tiles, ms))
            if kind not in result.best or ms < dict(result.timings[kind])[result.best[kind]]:
                result.best[kind] = tiles
            say(f"tune {kind} {tiles.block_m}x{tiles.block_c}x{tiles.block_r} w{tiles.num_warps} "
                f"s{tiles.num_stages}: {ms:.3f} ms")
    return result
