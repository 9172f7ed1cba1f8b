"""Tile sizes for the grouped-MLP kernels, per kernel kind, problem shape, dtype and GPU architecture.

``tile_config`` picks a :class:`TileConfig`; :func:`force_tiles` (a context manager, used by the tests) and the
env var ``DEEPSEEK_MOE_TRITON_TILES="BM,BC,BR[,warps,stages]"`` override it. The GPU choices are starting
points sized for Hopper-class shared memory; see docs/kernels.md for how they were chosen and what is measured.

Kinds: "gate_up" (dims: H reduced, I produced), "down" (H produced, I reduced), "dgrad" (H produced, 2I
reduced), "down_bwd" (H reduced, I produced), "wgrad" (the per-expert weight gradients).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Iterator, Optional

import torch

KINDS = ("gate_up", "down", "dgrad", "down_bwd", "wgrad")


@dataclass(frozen=True)
class TileConfig:
    """A BM (``block_m``) rows × BC (``block_c``) output columns tile per program, stepping BR (``block_r``) at
    a time through the reduced dimension; warps and pipeline stages (ignored by the interpreter). tl.dot needs
    every block >= 16. (Not BN/BK: in this package N is the kept pairs and K the slots per token.)"""

    block_m: int
    block_c: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_c", "block_r"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig: {name}={v} must be a power of two >= 16")


_forced: Optional[TileConfig] = None


@contextlib.contextmanager
def force_tiles(cfg: TileConfig) -> Iterator[TileConfig]:
    """Use ``cfg`` for every kernel launch inside the block (tests force small tiles to cross tile edges)."""
    global _forced
    previous, _forced = _forced, cfg
    try:
        yield cfg
    finally:
        _forced = previous


def _from_env() -> Optional[TileConfig]:
    spec = os.environ.get("DEEPSEEK_MOE_TRITON_TILES", "").strip()
    if not spec:
        return None
    try:
        return TileConfig(*(int(v) for v in spec.split(",")))
    except (TypeError, ValueError) as err:
        raise ValueError(f"DEEPSEEK_MOE_TRITON_TILES={spec!r} is invalid: expected 'BM,BC,BR[,warps,stages]' "
                         f"with powers of two >= 16 ({err})") from None


def tile_config(kind: str, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """The tiles for kernel ``kind`` with ``dtype`` operands on ``device``: a forced or environment override, else
    the heuristic (reads the environment and the GPU's compute capability: call it when selecting, not per
    launch)."""
    if kind not in KINDS:
        raise ValueError(f"tile_config: unknown kernel kind {kind!r}; expected one of {KINDS}")
    forced = _forced or _from_env()
    if forced is not None:
        return forced
    if device.type != "cuda":
        # The interpreter runs each program as NumPy code: fewer, larger tiles interpret fastest.
        return TileConfig(32, 32, 32)
    return gpu_tile_config(kind, dtype, torch.cuda.get_device_capability(device)[0])


def gpu_tile_config(kind: str, dtype: torch.dtype, capability_major: int) -> TileConfig:
    """The CUDA tiles for ``kind`` and ``dtype`` on a GPU of compute capability ``capability_major``.x."""
    wide = dtype.itemsize <= 2
    if kind == "gate_up":
        # Two fp32 accumulators (gate and up) per program: keep BC at 64 to stay within registers.
        cfg = TileConfig(128, 64, 64, num_warps=8, num_stages=4) if wide else TileConfig(64, 64, 32, 4, 3)
    elif kind == "wgrad":
        # Reduction over an expert's rows; output tiles cover the (J or H) x (H or I) weight.
        cfg = TileConfig(128, 128, 32, num_warps=8, num_stages=3) if wide else TileConfig(64, 64, 32, 4, 3)
    else:
        cfg = TileConfig(128, 128, 64, num_warps=8, num_stages=3) if wide else TileConfig(64, 64, 32, 4, 3)
    if capability_major < 9:  # Ampere-class: ~100-160 KB of shared memory per SM
        cfg = replace(cfg, num_stages=min(cfg.num_stages, 3), block_r=min(cfg.block_r, 32))
    return cfg
