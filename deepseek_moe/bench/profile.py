"""Per-stage profile of a layer's calls (router, plan, permute, GEMMs, combine, shared experts; forward and
backward): torch.profiler over a few calls, split by :func:`deepseek_moe.stages.stage_times`."""
from __future__ import annotations

from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile

from ..stages import stage_times
from .timing import run_once


def profile_stages(module: torch.nn.Module, x: torch.Tensor, mode: str, calls: int = 3) -> Dict[str, float]:
    """Milliseconds per call of each "<stage>/fwd" and "<stage>/bwd" for ``calls`` calls of ``module`` on ``x`` in
    ``mode`` ("fwd": inference forward in eval mode, "fwdbwd": forward and backward in training mode; after one
    untimed call; the module's train/eval mode is restored after), device time on CUDA, CPU time elsewhere.
    Profiled calls run slower than timed ones: the split is what to read, not the sum. Time outside every stage
    range is "other": a module compiled with torch.compile runs as one graph (no ranges inside), and the eager
    backend marks no stages of its own inside the experts. Raises ValueError for another mode."""
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"profile_stages: mode {mode!r} must be 'fwd' or 'fwdbwd'")
    cuda = x.device.type == "cuda"
    was_training = module.training
    module.train(mode == "fwdbwd")
    try:
        run_once(module, x, mode)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                run_once(module, x, mode)
            if cuda:
                torch.cuda.synchronize()
    finally:
        module.train(was_training)
    return {k: v / calls for k, v in sorted(stage_times(prof.events(), cuda).items())}
