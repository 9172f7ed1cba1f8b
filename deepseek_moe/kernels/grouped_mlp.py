"""Triton kernels of the routed-experts MLP, and their launchers (no autograd, no modules).

The pairs (token, slot) are sorted by expert (see :class:`deepseek_moe.dispatch.DispatchPlan`). Tiles are
**expert-aligned**: every BLOCK_M-row tile belongs to one expert, so a tile reads one weight matrix and the
GEMM needs no per-row weight lookup. The tile map (which expert and which first row each tile has) is built on
the device from the segment offsets, with a static upper bound on the number of tiles (cdiv(N, BLOCK_M) + E),
so nothing here synchronises with the host. Tiles past the last real one exit at once.

Forward:   gate_up_swiglu   h = x[token] @ W_gu[e]ᵀ (gather fused into the A loads), a = silu(g)·u·w
           grouped_gemm     o[pair] = a @ W_d[e]ᵀ, rows stored at their (token, slot) position; y = Σ_K o
Backward:  down_swiglu_bwd  grad_a = grad_y[token] @ W_d[e], then the SwiGLU backward in the epilogue
                            (grad_h, the weighted activation a, per-tile partial sums of grad_w)
           expert_weight_grad  dW[e] = Σ_{rows of e} A[row]ᵀ B[row] (gathers fused), for W_d and W_gu
           grouped_gemm     gx[pair] = grad_h @ W_gu[e]; grad_x = Σ_K gx

Writing each pair's output row at its (token, slot) position and summing over K afterwards needs no atomics
and adds in a fixed order (deterministic); the sum reads the (T·K, H) rows once.

Legend: T tokens, K slots per token, P = T·K pairs, N kept pairs (sorted by expert), H hidden size,
I expert hidden size, J = 2·I, E experts, M tiles.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .heuristics import TileConfig, tile_config

# Tests set this so that every output buffer starts as NaN: a row a kernel fails to write then fails the test.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _dot_flags(dtype: torch.dtype) -> dict:
    # The interpreter computes bf16 tl.dot wrongly (cast the operands to fp32 there) and converts fp32 to bf16
    # by truncation, which doubles the rounding error (round to nearest even by hand there). fp32 inputs use
    # IEEE fp32 products unless the user allowed TF32 for matmuls in PyTorch.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return {"DOT_FP32": interpreting(), "RNE": interpreting(), "PRECISION": "tf32" if tf32 else "ieee"}


@triton.jit
def _cast(x, dtype: tl.constexpr, RNE: tl.constexpr):
    """x (fp32) -> dtype, rounding to nearest even also where the interpreter would truncate to bf16."""
    if RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M: tl.constexpr):
    """(expert, rows, row mask) of this program's tile; expert -1 marks an unused tile (the caller returns)."""
    pid_m = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid_m)
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)  # e = -1 reads offsets[0]: in bounds, and unused
    rows = start + tl.arange(0, BLOCK_M)
    return e, rows, rows < end


@triton.jit
def _tile_mainloop(a_ptr, a_rows, row_mask, stride_ar, stride_ak, b_ptr, stride_bk, stride_bn, cols, col_mask, K_IN,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A[a_rows, :] @ B[:, cols], A rows read where they lie (a gather when
    a_rows are token ids), B (K_IN, ·) through its strides."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_ar + ks[None, :] * stride_ak
    b_ptrs = b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_IN, BLOCK_K):
        k_mask = (k0 + ks) < K_IN
        at = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


# ---------------------------------------------------------------------------------------------- tile map
def expert_tiles(offsets_E1: torch.Tensor, num_rows: int, block_m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Expert-aligned tiles of the sorted rows, built on the device (no host sync).

    Args:
        offsets_E1: int64 (E+1,) segment starts of the sorted rows, offsets[0] = 0, offsets[E] = num_rows.
        num_rows: N (static). block_m: rows per tile.
    Returns:
        tile_expert_M: int32 (M,) expert of each tile, -1 for the unused tail; M = cdiv(N, block_m) + E, a bound
        on Σ_e cdiv(count_e, block_m).
        tile_start_M: int64 (M,) first row of each tile.
    """
    E = offsets_E1.numel() - 1
    device = offsets_E1.device
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    M = triton.cdiv(num_rows, block_m) + E
    tile_M = torch.arange(M, device=device)
    expert_M = torch.searchsorted(tile_end_E, tile_M, right=True)
    valid_M = expert_M < E
    expert_M = expert_M.clamp(max=max(E - 1, 0))
    first_tile_M = (tile_end_E - tiles_E)[expert_M]
    start_M = offsets_E1[expert_M] + (tile_M - first_tile_M) * block_m
    return torch.where(valid_M, expert_M, -1).to(torch.int32), start_M


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _gate_up_swiglu_kernel(
        x_ptr, token_ptr, weight_ptr, gate_up_ptr, h_ptr, a_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        H, I,
        stride_xt, stride_xh, stride_ge, stride_gj, stride_gh, stride_hn, stride_hj, stride_an, stride_ai,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_M rows × BLOCK_N columns of I) tile: gate and up accumulate side by side, so the epilogue has
    both halves of SwiGLU in registers."""
    pid_n = tl.program_id(1)
    e, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    token = tl.load(token_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xh
    wg_ptrs = gate_up_ptr + e * stride_ge + cols[None, :] * stride_gj + ks[:, None] * stride_gh
    wu_ptrs = wg_ptrs + I * stride_gj
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_mask = (k0 + ks) < H
        xa = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            xa, wg, wu = xa.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(xa, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xa, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        wg_ptrs += BLOCK_K * stride_gh
        wu_ptrs += BLOCK_K * stride_gh
    mask = row_mask[:, None] & col_mask[None, :]
    # h is stored in the activation dtype and the backward reads it back: SwiGLU uses the same rounded values.
    g = _cast(acc_g, h_ptr.dtype.element_ty, RNE)
    u = _cast(acc_u, h_ptr.dtype.element_ty, RNE)
    h_ptrs = h_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hj
    tl.store(h_ptrs, g, mask=mask)
    tl.store(h_ptrs + I * stride_hj, u, mask=mask)
    gf = g.to(tl.float32)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    a = gf * tl.sigmoid(gf) * u.to(tl.float32) * w[:, None]
    tl.store(a_ptr + rows[:, None] * stride_an + cols[None, :] * stride_ai, _cast(a, a_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _grouped_gemm_scatter_kernel(
        a_ptr, b_ptr, c_ptr, scatter_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        N_OUT, K_IN,
        stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """c[scatter[row]] = a[row] @ b[e] for the rows of expert e; b[e] is (K_IN, N_OUT) through its strides."""
    pid_n = tl.program_id(1)
    e, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    acc = _tile_mainloop(a_ptr, rows, row_mask, stride_am, stride_ak, b_ptr + e * stride_be, stride_bk, stride_bn,
                         cols, col_mask, K_IN, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    out_rows = tl.load(scatter_ptr + rows, mask=row_mask, other=0)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + cols[None, :] * stride_cn, _cast(acc, c_ptr.dtype.element_ty, RNE),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_swiglu_bwd_kernel(
        grad_y_ptr, token_ptr, down_ptr, h_ptr, weight_ptr, grad_h_ptr, a_ptr, grad_w_part_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        H, I,
        stride_gyt, stride_gyh, stride_de, stride_dh, stride_di, stride_hn, stride_hj, stride_an, stride_ai,
        stride_pn, stride_pb,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """grad_a = grad_y[token] @ W_d[e] for one tile, then in the epilogue, with g, u from h and s = σ(g):
    grad_h = [grad_a·w·u·s(1 + g(1 − s)) ; grad_a·w·g·s], a = g·s·u·w, and Σ_cols grad_a·g·s·u as this column
    block's part of grad_w."""
    pid_n = tl.program_id(1)
    e, rows, row_mask = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BLOCK_M)
    if e < 0:
        return
    token = tl.load(token_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < I
    acc = _tile_mainloop(grad_y_ptr, token, row_mask, stride_gyt, stride_gyh, down_ptr + e * stride_de, stride_dh,
                         stride_di, cols, col_mask, H, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    h_ptrs = h_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hj
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + I * stride_hj, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    a0 = silu * u
    tl.store(grad_w_part_ptr + rows * stride_pn + pid_n * stride_pb, tl.sum(acc * a0, axis=1), mask=row_mask)
    dyw = acc * w[:, None]
    grad_h_ptrs = grad_h_ptr + rows[:, None] * stride_hn + cols[None, :] * stride_hj
    tl.store(grad_h_ptrs, _cast(dyw * u * (s * (1.0 + g * (1.0 - s))), grad_h_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(grad_h_ptrs + I * stride_hj, _cast(dyw * silu, grad_h_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(a_ptr + rows[:, None] * stride_an + cols[None, :] * stride_ai,
             _cast(a0 * w[:, None], a_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit
def _expert_weight_grad_kernel(
        a_ptr, a_index_ptr, b_ptr, b_index_ptr, out_ptr, offsets_ptr,
        M_OUT, N_OUT,
        stride_ar, stride_ac, stride_br, stride_bc, stride_oe, stride_om, stride_on,
        GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """out[e] = Σ_{r in segment e} A[ia(r)]ᵀ B[ib(r)]: an (M_OUT, N_OUT) tile per program, looping over the
    expert's rows; ia/ib gather rows through index arrays when GATHER_A/GATHER_B. Experts without rows get 0."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    num_n = tl.cdiv(N_OUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M_OUT
    n_mask = ns < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        r_mask = rs < end
        if GATHER_A:
            ra = tl.load(a_index_ptr + rs, mask=r_mask, other=0)
        else:
            ra = rs
        if GATHER_B:
            rb = tl.load(b_index_ptr + rs, mask=r_mask, other=0)
        else:
            rb = rs
        at = tl.load(a_ptr + ra[None, :] * stride_ar + ms[:, None] * stride_ac,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + rb[:, None] * stride_br + ns[None, :] * stride_bc,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            at, bt = at.to(tl.float32), bt.to(tl.float32)
        acc = tl.dot(at, bt, acc, input_precision=PRECISION)
    tl.store(out_ptr + e * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on,
             _cast(acc, out_ptr.dtype.element_ty, RNE), mask=m_mask[:, None] & n_mask[None, :])


# ---------------------------------------------------------------------------------------------- launchers
def _launch_opts(cfg: TileConfig) -> dict:
    opts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
    if not interpreting():
        opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return opts


def gate_up_swiglu(x_TH: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor, gate_up_EJH: torch.Tensor,
                   offsets_E1: torch.Tensor, cfg: Optional[TileConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """h_NJ = x_TH[token_N] @ gate_up[e]ᵀ per expert segment and a_NI = silu(gate)·up·weight_N.

    x_TH (T, H), token_N int64 (N,), weight_N fp32 (N,), gate_up_EJH (E, 2I, H), offsets_E1 int64 (E+1,).
    Returns (h_NJ (N, 2I), a_NI (N, I)) in x's dtype.
    """
    N = token_N.numel()
    E, J, H = gate_up_EJH.shape
    I = J // 2
    cfg = cfg or tile_config("gate_up", E, H, I, x_TH.dtype, x_TH.device)
    h_NJ = _empty((N, J), x_TH.dtype, x_TH.device)
    a_NI = _empty((N, I), x_TH.dtype, x_TH.device)
    if N == 0:
        return h_NJ, a_NI
    tile_expert, tile_start = expert_tiles(offsets_E1, N, cfg.block_m)
    grid = (tile_expert.numel(), triton.cdiv(I, cfg.block_n))
    _gate_up_swiglu_kernel[grid](
        x_TH, token_N, weight_N, gate_up_EJH, h_NJ, a_NI, tile_expert, tile_start, offsets_E1, H, I,
        x_TH.stride(0), x_TH.stride(1), *gate_up_EJH.stride(), *h_NJ.stride(), *a_NI.stride(),
        **_launch_opts(cfg), **_dot_flags(x_TH.dtype))
    return h_NJ, a_NI


def grouped_gemm_scatter(a_NK: torch.Tensor, b_EKO: torch.Tensor, scatter_N: torch.Tensor, out_rows: int,
                         offsets_E1: torch.Tensor, zero_fill: bool, cfg: Optional[TileConfig] = None,
                         kind: str = "down") -> torch.Tensor:
    """c[scatter_N[n]] = a_NK[n] @ b_EKO[e(n)] for the sorted rows; c is (out_rows, O) in a's dtype.

    ``b_EKO`` may be any strided view (e.g. ``down.transpose(1, 2)``). ``zero_fill``: rows of c that no pair
    writes (dropped pairs) must read as zero.
    """
    N, K_in = a_NK.shape
    E, _, O = b_EKO.shape
    cfg = cfg or tile_config(kind, E, O, K_in, a_NK.dtype, a_NK.device)
    c = (torch.zeros if zero_fill else _empty)((out_rows, O), dtype=a_NK.dtype, device=a_NK.device)
    if N == 0:
        return c
    tile_expert, tile_start = expert_tiles(offsets_E1, N, cfg.block_m)
    grid = (tile_expert.numel(), triton.cdiv(O, cfg.block_n))
    _grouped_gemm_scatter_kernel[grid](
        a_NK, b_EKO, c, scatter_N, tile_expert, tile_start, offsets_E1, O, K_in,
        *a_NK.stride(), *b_EKO.stride(), *c.stride(), **_launch_opts(cfg), **_dot_flags(a_NK.dtype))
    return c


def down_swiglu_backward(grad_y_TH: torch.Tensor, token_N: torch.Tensor, down_EHI: torch.Tensor,
                         h_NJ: torch.Tensor, weight_N: torch.Tensor, offsets_E1: torch.Tensor,
                         cfg: Optional[TileConfig] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward through the down GEMM and SwiGLU·w for the sorted rows.

    Returns (grad_h_NJ (N, 2I) x dtype, a_NI (N, I) the weighted activation in x dtype, grad_w_N fp32 (N,)).
    """
    N = token_N.numel()
    E, H, I = down_EHI.shape
    cfg = cfg or tile_config("down_bwd", E, H, I, grad_y_TH.dtype, grad_y_TH.device)
    grad_h = _empty((N, 2 * I), grad_y_TH.dtype, grad_y_TH.device)
    a_NI = _empty((N, I), grad_y_TH.dtype, grad_y_TH.device)
    blocks = triton.cdiv(I, cfg.block_n)
    part_NB = _empty((N, blocks), torch.float32, grad_y_TH.device)
    if N > 0:
        tile_expert, tile_start = expert_tiles(offsets_E1, N, cfg.block_m)
        _down_swiglu_bwd_kernel[(tile_expert.numel(), blocks)](
            grad_y_TH, token_N, down_EHI, h_NJ, weight_N, grad_h, a_NI, part_NB, tile_expert, tile_start,
            offsets_E1, H, I, *grad_y_TH.stride(), *down_EHI.stride(), *h_NJ.stride(), *a_NI.stride(),
            *part_NB.stride(), **_launch_opts(cfg), **_dot_flags(grad_y_TH.dtype))
    return grad_h, a_NI, part_NB.sum(1)


def expert_weight_grad(a_RM: torch.Tensor, a_index_N: Optional[torch.Tensor], b_RN: torch.Tensor,
                       b_index_N: Optional[torch.Tensor], offsets_E1: torch.Tensor, out_dtype: torch.dtype,
                       cfg: Optional[TileConfig] = None, kind: str = "wgrad") -> torch.Tensor:
    """out[e] = Σ_{n in segment e} a[ia(n)]ᵀ b[ib(n)], (E, M, N_out) in ``out_dtype``.

    a_RM, b_RN are row-indexed matrices; with an index (int64 (N,)) row n of the segment reads a[index[n]],
    otherwise a[n]. Experts without rows get zero.
    """
    E = offsets_E1.numel() - 1
    M, Nn = a_RM.shape[1], b_RN.shape[1]
    cfg = cfg or tile_config(kind, E, M, Nn, a_RM.dtype, a_RM.device)
    out = _empty((E, M, Nn), out_dtype, a_RM.device)
    grid = (E, triton.cdiv(M, cfg.block_m) * triton.cdiv(Nn, cfg.block_n))
    _expert_weight_grad_kernel[grid](
        a_RM, a_index_N if a_index_N is not None else offsets_E1, b_RN,
        b_index_N if b_index_N is not None else offsets_E1, out, offsets_E1, M, Nn,
        *a_RM.stride(), *b_RN.stride(), *out.stride(), GATHER_A=a_index_N is not None,
        GATHER_B=b_index_N is not None, **_launch_opts(cfg), **_dot_flags(a_RM.dtype))
    return out
