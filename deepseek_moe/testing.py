"""Test helpers: RMS-ratio comparison that reports where it failed, routing generators, gloo process groups.

Legend: T tokens, E routed experts, K experts per token.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable, Optional

import torch


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS(actual − expected) / RMS(expected) in fp64 (0 when both are all zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.square().mean().sqrt().item() if e.numel() else 0.0
    err = (a - e).square().mean().sqrt().item() if e.numel() else 0.0
    if denom == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / denom


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol_rms: float, name: str = "tensor") -> None:
    """Assert shape equality and relative RMS error <= ``rtol_rms``; the message shows the ratio and the worst
    element (index, both values), so a failing kernel says where it went wrong."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all() and torch.isfinite(expected).all():
        bad = torch.nonzero(~torch.isfinite(actual))[0].tolist()
        raise AssertionError(f"{name}: non-finite value at {bad}")
    ratio = rel_rms(actual, expected)
    if not ratio <= rtol_rms:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        flat = int(diff.argmax())
        idx = list(torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else []
        idx = [int(i) for i in idx]
        raise AssertionError(f"{name}: relative RMS error {ratio:.3e} > {rtol_rms:.1e}; worst at {idx}: "
                             f"actual {actual.reshape(-1)[flat].item():.6g} vs expected "
                             f"{expected.reshape(-1)[flat].item():.6g}")


def require_extension() -> None:
    """Load the compiled extension for a test, building it from a source checkout; skip (with the reason) in an
    installation that carries neither the sources nor a build, e.g. a plain wheel; fail on any other error."""
    import pytest

    from . import ext
    from .backends import ext as ext_backend

    if not ext.sources() and not ext.has_prebuilt():
        pytest.skip("the compiled extension is not in this installation (a wheel built without "
                    "DEEPSEEK_MOE_BUILD_EXT=1 ships neither csrc/ nor a build)")
    ext_backend.ensure_loaded()  # builds csrc/ the first time (~30 s), then loads the cached library


def ran_ops(fn: Callable[[], object]) -> tuple:
    """(fn(), the names of the extension's ops it ran, e.g. {"deepseek_moe::expert_gemv"}), by the profiler."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name.startswith("deepseek_moe::")}


def make_topk(num_tokens: int, num_experts: int, top_k: int, kind: str = "balanced",
              generator: Optional[torch.Generator] = None, empty_experts: int = 0) -> torch.Tensor:
    """int64 (T, K) distinct expert choices per token.

    kind: "balanced" (round-robin, every expert equally loaded), "random" (uniform random distinct experts),
    "skewed" (Zipf-like: low expert ids much more popular). ``empty_experts`` > 0 keeps the last that many
    experts unused (they receive zero tokens).
    """
    usable = num_experts - empty_experts
    if not 1 <= top_k <= usable:
        raise ValueError(f"make_topk: need 1 <= top_k={top_k} <= experts in use={usable}")
    if kind == "balanced":
        base = torch.arange(num_tokens * top_k).view(num_tokens, top_k)
        return (base % usable)
    if kind == "random":
        logits = torch.rand(num_tokens, usable, generator=generator)
    elif kind == "skewed":
        popularity = 1.0 / torch.arange(1, usable + 1, dtype=torch.float32)
        logits = torch.log(popularity) - torch.log(-torch.log(torch.rand(num_tokens, usable, generator=generator)))
    else:
        raise ValueError(f"make_topk: kind={kind!r}; expected 'balanced', 'random' or 'skewed'")
    return logits.topk(top_k, dim=-1).indices


def spawn_gloo(fn: Callable[..., None], world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes joined in a gloo process group on this machine (one
    thread each), and wait for them; a rank's exception fails the call. ``fn`` must be importable (module level)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(world, port, fn, args), nprocs=world, join=True)


def _gloo_rank(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and torn down: leave without the interpreter's finalization, where gloo's worker threads can still
    # abort the process (SIGABRT, "terminate called without an active exception": pytorch/pytorch#179291; seen once
    # in CI after a DDP test had passed every check).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
