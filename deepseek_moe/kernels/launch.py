"""Launchers of the grouped-MLP Triton kernels and their tile map (no autograd, no modules, no environment).

Every launcher takes its tiles (:class:`~deepseek_moe.kernels.heuristics.TileConfig`) and whether Triton
interprets (``interpret``) as arguments: the backend resolves both once, when it is selected, so a launch reads
neither the environment nor the device's properties.

Legend as in :mod:`.grouped_mlp`: T tokens, P = T·K pairs, N kept pairs (sorted by expert), H hidden size,
I expert hidden size, J = 2·I, E experts; a GEMM has M rows, C output columns, R the reduced dimension; L tiles
in the tile map, Q = cdiv(I, BC) column tiles of I.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from .grouped_mlp import (_down_swiglu_bwd_kernel, _expert_weight_grad_kernel, _gate_up_swiglu_kernel,
                          _grouped_gemm_scatter_kernel)
from .heuristics import TileConfig

# Tests set this so that every output buffer starts as NaN: a row a kernel fails to write then fails the test.
POISON_OUTPUTS = False


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_flags(dtype: torch.dtype, interpret: bool) -> dict:
    # The interpreter computes bf16 tl.dot wrongly (cast the operands to fp32 there) and converts fp32 to bf16
    # by truncation, which doubles the rounding error (round to nearest even by hand there). fp32 inputs use
    # IEEE fp32 products unless the user allowed TF32 for matmuls in PyTorch.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_FP32": interpret, "RNE": interpret, "PRECISION": "tf32" if tf32 else "ieee"}


def expert_tiles(offsets_E1: torch.Tensor, num_rows: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-aligned tiles of the sorted rows, built on the device (no host sync).

    Args:
        offsets_E1: int64 (E+1,) segment starts of the sorted rows, offsets[0] = 0, offsets[E] = num_rows.
        num_rows: N (static). block_m: rows per tile (BM).
    Returns:
        tile_expert_L: int32 (L,) expert of each tile, -1 for the unused tail; L = cdiv(N, block_m) + E, a bound
        on Σ_e cdiv(count_e, block_m).
        tile_start_L: int64 (L,) first row of each tile.
    """
    E = offsets_E1.numel() - 1
    device = offsets_E1.device
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    L = triton.cdiv(num_rows, block_m) + E
    tile_L = torch.arange(L, device=device)
    expert_L = torch.searchsorted(tile_end_E, tile_L, right=True)
    valid_L = expert_L < E
    expert_L = expert_L.clamp(max=max(E - 1, 0))
    first_tile_L = (tile_end_E - tiles_E)[expert_L]
    start_L = offsets_E1[expert_L] + (tile_L - first_tile_L) * block_m
    return torch.where(valid_L, expert_L, -1).to(torch.int32), start_L


def _launch_opts(cfg: TileConfig, dtype: torch.dtype, interpret: bool) -> dict:
    opts = {"BM": cfg.block_m, "BC": cfg.block_c, "BR": cfg.block_r, **_dot_flags(dtype, interpret)}
    if not interpret:
        opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return opts


def gate_up_swiglu(x_TH: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor, gate_up_EJH: torch.Tensor,
                   offsets_E1: torch.Tensor, cfg: TileConfig, interpret: bool,
                   limit: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """h_NJ = x_TH[token_N] @ gate_up[e]ᵀ per expert segment and a_NI = silu(gate)·up·weight_N, the SwiGLU clamped
    at ``limit`` when given (:mod:`deepseek_moe.glu`; h keeps the unclamped values).

    x_TH (T, H), token_N int64 (N,), weight_N fp32 (N,), gate_up_EJH (E, 2I, H), offsets_E1 int64 (E+1,).
    Returns (h_NJ (N, 2I), a_NI (N, I)) in x's dtype.
    """
    N = token_N.numel()
    E, J, H = gate_up_EJH.shape
    I = J // 2
    h_NJ = _empty((N, J), x_TH.dtype, x_TH.device)
    a_NI = _empty((N, I), x_TH.dtype, x_TH.device)
    if N == 0:
        return h_NJ, a_NI
    tile_expert_L, tile_start_L = expert_tiles(offsets_E1, N, cfg.block_m)
    grid = (tile_expert_L.numel(), triton.cdiv(I, cfg.block_c))
    _gate_up_swiglu_kernel[grid](
        x_TH, token_N, weight_N, gate_up_EJH, h_NJ, a_NI, tile_expert_L, tile_start_L, offsets_E1, H, I,
        0.0 if limit is None else limit, x_TH.stride(0), x_TH.stride(1), *gate_up_EJH.stride(), *h_NJ.stride(),
        *a_NI.stride(), CLAMP=limit is not None, **_launch_opts(cfg, x_TH.dtype, interpret))
    return h_NJ, a_NI


def grouped_gemm_scatter(a_NR: torch.Tensor, b_ERC: torch.Tensor, scatter_N: torch.Tensor, out_rows: int,
                         offsets_E1: torch.Tensor, zero_fill: bool, cfg: TileConfig,
                         interpret: bool) -> torch.Tensor:
    """out[scatter_N[n]] = a_NR[n] @ b_ERC[e(n)] for the sorted rows; out is (out_rows, C) in a's dtype (out_rows
    = P in the layer: one row per (token, slot)).

    ``b_ERC`` may be any strided view (e.g. ``down.transpose(1, 2)``). ``zero_fill``: rows of out that no pair
    writes (dropped pairs) must read as zero.
    """
    N, R = a_NR.shape
    E, _, C = b_ERC.shape
    out_PC = (torch.zeros if zero_fill else _empty)((out_rows, C), dtype=a_NR.dtype, device=a_NR.device)
    if N == 0:
        return out_PC
    tile_expert_L, tile_start_L = expert_tiles(offsets_E1, N, cfg.block_m)
    grid = (tile_expert_L.numel(), triton.cdiv(C, cfg.block_c))
    _grouped_gemm_scatter_kernel[grid](
        a_NR, b_ERC, out_PC, scatter_N, tile_expert_L, tile_start_L, offsets_E1, C, R,
        *a_NR.stride(), *b_ERC.stride(), *out_PC.stride(), **_launch_opts(cfg, a_NR.dtype, interpret))
    return out_PC


def down_swiglu_backward(grad_y_TH: torch.Tensor, token_N: torch.Tensor, down_EHI: torch.Tensor,
                         h_NJ: torch.Tensor, weight_N: torch.Tensor, offsets_E1: torch.Tensor,
                         cfg: TileConfig, interpret: bool,
                         limit: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through the down GEMM and SwiGLU·w (clamped at ``limit`` when given) for the sorted rows.

    Returns (grad_h_NJ (N, 2I) x dtype, a_NI (N, I) the weighted activation in x dtype, grad_w_N fp32 (N,)).
    """
    N = token_N.numel()
    E, H, I = down_EHI.shape
    grad_h_NJ = _empty((N, 2 * I), grad_y_TH.dtype, grad_y_TH.device)
    a_NI = _empty((N, I), grad_y_TH.dtype, grad_y_TH.device)
    Q = triton.cdiv(I, cfg.block_c)
    part_NQ = _empty((N, Q), torch.float32, grad_y_TH.device)
    if N > 0:
        tile_expert_L, tile_start_L = expert_tiles(offsets_E1, N, cfg.block_m)
        _down_swiglu_bwd_kernel[(tile_expert_L.numel(), Q)](
            grad_y_TH, token_N, down_EHI, h_NJ, weight_N, grad_h_NJ, a_NI, part_NQ, tile_expert_L, tile_start_L,
            offsets_E1, H, I, 0.0 if limit is None else limit, *grad_y_TH.stride(), *down_EHI.stride(),
            *h_NJ.stride(), *a_NI.stride(), *part_NQ.stride(), CLAMP=limit is not None,
            **_launch_opts(cfg, grad_y_TH.dtype, interpret))
    return grad_h_NJ, a_NI, part_NQ.sum(1)


def expert_weight_grad(a_RM: torch.Tensor, a_index_N: Optional[torch.Tensor], b_RC: torch.Tensor,
                       b_index_N: Optional[torch.Tensor], offsets_E1: torch.Tensor, out_dtype: torch.dtype,
                       cfg: TileConfig, interpret: bool) -> torch.Tensor:
    """out[e] = Σ_{n in segment e} a[ia(n)]ᵀ b[ib(n)], (E, M, C) in ``out_dtype``.

    a_RM, b_RC are row-indexed matrices (R rows: T or N); with an index (int64 (N,)) row n of the segment reads
    a[index[n]], otherwise a[n]. Experts without rows get zero.
    """
    E = offsets_E1.numel() - 1
    M, C = a_RM.shape[1], b_RC.shape[1]
    out_EMC = _empty((E, M, C), out_dtype, a_RM.device)
    grid = (E, triton.cdiv(M, cfg.block_m) * triton.cdiv(C, cfg.block_c))
    _expert_weight_grad_kernel[grid](
        a_RM, a_index_N if a_index_N is not None else offsets_E1, b_RC,
        b_index_N if b_index_N is not None else offsets_E1, out_EMC, offsets_E1, M, C,
        *a_RM.stride(), *b_RC.stride(), *out_EMC.stride(), GATHER_A=a_index_N is not None,
        GATHER_B=b_index_N is not None, **_launch_opts(cfg, a_RM.dtype, interpret))
    return out_EMC
