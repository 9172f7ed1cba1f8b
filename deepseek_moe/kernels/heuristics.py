"""Tile sizes for the grouped-MLP kernels, per kernel kind, problem shape, dtype and GPU architecture.

``tile_config`` picks a :class:`TileConfig`: :func:`force_tiles` (a context manager, used by the tests) or the
env var ``DEEPSEEK_MOE_TRITON_TILES="BM,BC,BR[,warps,stages]"`` when set; else, on a GPU, the winner that an
autotune sweep (:mod:`deepseek_moe.kernels.tuning`, run by ``benchmarks/gpu/run_all.py``) recorded in the table
``tuned_tiles.json`` next to this file for (architecture, dtype, shape class); else the heuristic below, starting
points sized for Hopper-class shared memory (docs/kernels.md says how they were chosen and what is measured).
The table is read once per process, at selection, never per launch.

Kinds: "gate_up" (dims: H reduced, I produced), "down" (H produced, I reduced), "dgrad" (H produced, 2I
reduced), "down_bwd" (H reduced, I produced), "wgrad" (the per-expert weight gradients).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

KINDS = ("gate_up", "down", "dgrad", "down_bwd", "wgrad")
TABLE_PATH = Path(__file__).with_name("tuned_tiles.json")


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
            if type(v) is not int or v < 16 or v & (v - 1):
                raise ValueError(f"TileConfig: {name}={v!r} must be a power of two >= 16")
        if type(self.num_warps) is not int or self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"TileConfig: num_warps={self.num_warps!r} must be a power of two from 1 to 32")
        if type(self.num_stages) is not int or self.num_stages < 1:
            raise ValueError(f"TileConfig: num_stages={self.num_stages!r} must be a positive integer")


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


def shape_class(sizes: Tuple[int, int]) -> str:
    """The tuning table's shape class of experts with (hidden size H, expert hidden size I): both rounded up to a
    power of two ("H2048-I2048" for DeepSeekMoE-16B's 2048 × 1408), so that nearby shapes share a tuned entry."""
    H, I = (1 << max(0, math.ceil(math.log2(max(v, 1)))) for v in sizes)
    return f"H{H}-I{I}"


def table_key(arch: str, dtype: torch.dtype, sizes: Tuple[int, int]) -> str:
    """The tuning table's key: "<arch>/<dtype>/<shape class>", e.g. "sm90/bfloat16/H2048-I2048"."""
    return f"{arch}/{str(dtype).removeprefix('torch.')}/{shape_class(sizes)}"


def cuda_arch(device: torch.device) -> str:
    """"sm<major><minor>" of a CUDA device (sm90: H100 and H200)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def read_table(path: Path) -> Dict[str, Dict[str, TileConfig]]:
    """{key: {kind: TileConfig}} from a tuning table (JSON ``{"entries": {key: {kind: {block_m, ...}}}}``); {} for a
    missing file. Raises ValueError naming the file for one that is not such a table."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())["entries"]
        table = {key: {kind: TileConfig(**tiles) for kind, tiles in kinds.items()} for key, kinds in entries.items()}
        unknown = sorted({kind for kinds in table.values() for kind in kinds} - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kernel kinds {unknown}; expected some of {KINDS}")
        return table
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not a tile tuning table ({type(err).__name__}: {err}); delete it or rerun "
                         f"the sweep (benchmarks/gpu/run_all.py)") from None


def write_table(path: Path, key: str, tiles: Dict[str, TileConfig], measured: Dict[str, object]) -> None:
    """Record the sweep's winners ``tiles`` for ``key`` in the table at ``path`` (other keys kept), with what
    they were measured on (``measured``: device, torch, triton, date, shape, timings)."""
    read_table(path)  # ValueError naming the file if one is there and is not a table
    table = json.loads(path.read_text()) if path.exists() else {}
    table = {"entries": dict(table.get("entries", {})), "measured": dict(table.get("measured") or {})}
    table["entries"][key] = {kind: asdict(cfg) for kind, cfg in tiles.items()}
    table["measured"][key] = measured
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(staged, path)  # whole or not at all: selection reads this file
    _package_table.cache_clear()


@functools.lru_cache(maxsize=None)
def _package_table() -> Dict[str, Dict[str, TileConfig]]:
    return read_table(TABLE_PATH)


def tuned_tile_config(kind: str, dtype: torch.dtype, arch: str, sizes: Optional[Tuple[int, int]]
                      ) -> Optional[TileConfig]:
    """The tuning table's tiles for ``kind`` on ``arch`` with ``dtype`` and experts of ``sizes`` (H, I), or None
    when the table has no entry (or ``sizes`` is unknown)."""
    if sizes is None:
        return None
    return _package_table().get(table_key(arch, dtype, sizes), {}).get(kind)


def tile_config(kind: str, dtype: torch.dtype, device: torch.device,
                sizes: Optional[Tuple[int, int]] = None) -> TileConfig:
    """The tiles for kernel ``kind`` with ``dtype`` operands on ``device`` for experts of ``sizes`` (H, I) when
    known: a forced or environment override, else the tuning table's entry, else the heuristic (reads the
    environment, the table and the GPU's compute capability: call it when selecting, not per launch). Raises
    ValueError for an unknown kind or a malformed override or table."""
    if kind not in KINDS:
        raise ValueError(f"tile_config: unknown kernel kind {kind!r}; expected one of {KINDS}")
    forced = _forced or _from_env()
    if forced is not None:
        return forced
    if device.type != "cuda":
        # The interpreter runs each program as NumPy code: fewer, larger tiles interpret fastest.
        return TileConfig(32, 32, 32)
    tuned = tuned_tile_config(kind, dtype, cuda_arch(device), sizes)
    if tuned is not None:
        return tuned
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
