"""Timing and memory measurement for the benchmark: CUDA events on GPU, a monotonic clock on CPU."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional

import torch

MODES = ("fwd", "fwdbwd", "decode")
DECODE_CALLS_PER_SAMPLE = 10  # decode calls are short: each sample times this many back to back


def run_once(module: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    """One call in ``mode``: forward under inference mode (fwd, decode) or forward + backward (fwdbwd)."""
    if mode == "fwdbwd":
        y = module(x)
        y.backward(torch.ones_like(y))
        # Every call starts from no gradients, as a training step after zero_grad(set_to_none=True) does; an input
        # shared by several contenders would otherwise make the later ones accumulate into its .grad.
        for t in (x, *module.parameters()):
            t.grad = None
    else:
        with torch.inference_mode():
            module(x)


def time_call(fn: Callable[[], None], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``fn`` (averaged over ``calls`` back-to-back calls)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls


def interleaved(fns: Dict[str, Callable[[int], None]], rounds: int, device: torch.device, warmup: int = 1,
                calls: int = 1, skip: Optional[Callable[[str, int], bool]] = None,
                on_sample: Optional[Callable[[str, float], None]] = None,
                settle: float = 0.0) -> Dict[str, List[float]]:
    """Seconds per call of each ``fn(r)``, the contenders interleaved round by round (background load on a shared
    machine then hits them alike): ``warmup`` untimed calls each with r = -1, then ``rounds`` rounds r = 0, 1, ...
    (an ``fn`` uses r to pick a fresh input), each sample timing ``calls`` back-to-back calls. ``skip(name, r)``
    leaves a contender out of a round; ``on_sample(name, seconds per call)`` runs after each sample (progress).
    ``settle``: seconds to sleep before each sample, so that no sample pays for the one before it (after a parallel
    region, OpenMP's threads spin for milliseconds; on a CPU shared with another process that is CPU time the next
    sample loses)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(-1)
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if skip is not None and skip(name, r):
                continue
            if settle > 0:
                time.sleep(settle)
            samples[name].append(time_call(lambda: fn(r), device, calls))
            if on_sample is not None:
                on_sample(name, samples[name][-1])
    return samples


def summarize(samples: List[float]) -> "tuple[float, float]":
    """(median, relative spread (max − min) / median)."""
    med = statistics.median(samples)
    return med, (max(samples) - min(samples)) / med if med > 0 else 0.0


def peak_memory(fn: Callable[[], None], device: torch.device) -> int:
    """Extra memory one call of ``fn`` holds at its peak, in bytes.

    CUDA: the caching allocator's peak minus what was allocated before. CPU: the profiler's record of every
    tensor allocation and free during the call (``profile_memory``), replayed in time order; the peak of the
    running sum. This counts PyTorch's CPU tensors only (not the allocator's slack), which is what differs
    between the contenders.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 for the block: the profiler's native library logs two lines per session that
    would interleave with the table. Python exceptions still propagate."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
