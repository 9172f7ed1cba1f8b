"""Triton kernels (``@triton.jit``) and their launchers. Importing this package imports triton; nothing else in
deepseek_moe imports it except ``backends/triton.py``, lazily. Set ``TRITON_INTERPRET=1`` before importing to
run the kernels on CPU (slow; for tests)."""
from .heuristics import KINDS, TileConfig, force_tiles, gpu_tile_config, tile_config

__all__ = ["KINDS", "TileConfig", "force_tiles", "gpu_tile_config", "tile_config"]
