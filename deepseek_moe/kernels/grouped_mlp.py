"""Triton kernels of the routed-experts MLP (``@triton.jit`` only; the launchers are in :mod:`.launch`).

The pairs (token, slot) are sorted by expert (see :class:`deepseek_moe.dispatch.DispatchPlan`). Tiles are
**expert-aligned**: every BM-row tile belongs to one expert, so a tile reads one weight matrix and the GEMM
needs no per-row weight lookup. The tile map (which expert and which first row each tile has) is built on the
device from the segment offsets, with a static upper bound on the number of tiles (L = cdiv(N, BM) + E), so
nothing here synchronises with the host. Tiles past the last real one exit at once.

Forward:   gate_up_swiglu   h = x[token] @ W_gu[e]ᵀ (gather fused into the A loads), a = silu(g)·u·w
           grouped_gemm     o[pair] = a @ W_d[e]ᵀ, rows stored at their (token, slot) position; y = Σ_K o
Backward:  down_swiglu_bwd  grad_a = grad_y[token] @ W_d[e], then the SwiGLU backward in the epilogue
                            (grad_h, the weighted activation a, per-tile partial sums of grad_w)
           expert_weight_grad  dW[e] = Σ_{rows of e} A[row]ᵀ B[row] (gathers fused), for W_d and W_gu
           grouped_gemm     gx[pair] = grad_h @ W_gu[e]; grad_x = Σ_K gx

Writing each pair's output row at its (token, slot) position and summing over K afterwards needs no atomics
and adds in a fixed order (deterministic); the sum reads the (T·K, H) rows once.

Legend: T tokens, K slots per token, P = T·K pairs, N kept pairs (sorted by expert), H hidden size,
I expert hidden size, J = 2·I, E experts (the package's letters). A GEMM here has M rows (the sorted pairs N
in the grouped GEMMs), C output columns and R the reduced dimension (for the weight gradients: the rows of
a and b). A program computes a BM × BC tile, stepping BR at a time through R (TileConfig's block_m, block_c,
block_r); L tiles in the tile map, Q = cdiv(I, BC) column tiles of I. Kernel locals: b_ blocks, p_ pointer
blocks, o_ offsets, m_ masks.
"""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def _cast(b_x, dtype: tl.constexpr, RNE: tl.constexpr):
    """b_x (fp32) -> dtype, rounding to nearest even also where the interpreter would truncate to bf16."""
    if RNE:
        if dtype == tl.bfloat16:
            b_bits = b_x.to(tl.uint32, bitcast=True)
            b_bits = (b_bits + (((b_bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            b_x = b_bits.to(tl.float32, bitcast=True)
    return b_x.to(dtype)


@triton.jit
def _clamp_gate_up(b_g, b_u, limit, CLAMP: tl.constexpr):
    """The clamped SwiGLU's inputs (min(g, L), clamp(u, −L, L)) with CLAMP, else (g, u); a NaN stays NaN, as in
    torch.clamp (tl.minimum's default drops it)."""
    if CLAMP:
        b_g = tl.minimum(b_g, limit, propagate_nan=tl.PropagateNan.ALL)
        b_u = tl.minimum(tl.maximum(b_u, -limit, propagate_nan=tl.PropagateNan.ALL), limit,
                         propagate_nan=tl.PropagateNan.ALL)
    return b_g, b_u


@triton.jit
def _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BM: tl.constexpr):
    """(expert, row offsets, row mask) of this program's tile; expert -1 marks an unused tile (the caller
    returns)."""
    pid_m = tl.program_id(0)
    e = tl.load(tile_expert_ptr + pid_m)
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(offsets_ptr + e + 1)  # e = -1 reads offsets[0]: in bounds, and unused
    o_m = start + tl.arange(0, BM)  # [BM]
    m_m = o_m < end  # [BM]
    return e, o_m, m_m


@triton.jit
def _gathered_tile(token_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, I, BM: tl.constexpr, BC: tl.constexpr):
    """This program's tile of sorted rows and its column tile of I: (expert (-1: unused tile), row offsets, row
    mask, the rows' token ids, column offsets, column mask)."""
    e, o_m, m_m = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BM)
    o_t = tl.load(token_ptr + o_m, mask=m_m, other=0)  # [BM]; an unused tile has no row in its mask
    o_c = tl.program_id(1) * BC + tl.arange(0, BC)  # [BC]
    return e, o_m, m_m, o_t, o_c, o_c < I


@triton.jit
def _tile_mainloop(a_ptr, o_a, m_m, stride_am, stride_ar, b_ptr, stride_br, stride_bc, o_c, m_c, R,
                   BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BM, BC] tile of A[o_a, :] @ B[:, o_c], A rows read where they lie (a gather when o_a are token ids),
    B (R, C) through its strides."""
    o_r = tl.arange(0, BR)  # [BR]
    p_a = a_ptr + o_a[:, None] * stride_am + o_r[None, :] * stride_ar  # [BM, BR]
    p_b = b_ptr + o_r[:, None] * stride_br + o_c[None, :] * stride_bc  # [BR, BC]
    b_acc = tl.zeros((BM, BC), dtype=tl.float32)  # [BM, BC]
    for r0 in range(0, R, BR):
        m_r = (r0 + o_r) < R  # [BR]
        b_a = tl.load(p_a, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_b = tl.load(p_b, mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BR, BC]
        if DOT_FP32:
            b_a, b_b = b_a.to(tl.float32), b_b.to(tl.float32)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=PRECISION)  # [BM, BC]
        p_a += BR * stride_ar
        p_b += BR * stride_br
    return b_acc


# ------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _gate_up_swiglu_kernel(
        x_ptr, token_ptr, weight_ptr, gate_up_ptr, h_ptr, a_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        H, I, limit,
        stride_xt, stride_xh, stride_ge, stride_gj, stride_gh, stride_hn, stride_hj, stride_an, stride_ai,
        BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, CLAMP: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """One (BM rows × BC columns of I) tile, reducing over H: gate and up accumulate side by side, so the epilogue
    has both halves of SwiGLU in registers (clamped at ``limit`` there with CLAMP; h keeps the unclamped values)."""
    e, o_m, m_m, o_t, o_c, m_c = _gathered_tile(token_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, I, BM, BC)
    if e < 0:
        return
    o_r = tl.arange(0, BR)  # [BR]
    p_x = x_ptr + o_t[:, None] * stride_xt + o_r[None, :] * stride_xh  # [BM, BR]
    p_wg = gate_up_ptr + e * stride_ge + o_c[None, :] * stride_gj + o_r[:, None] * stride_gh  # [BR, BC]
    p_wu = p_wg + I * stride_gj  # [BR, BC]
    b_acc_g = tl.zeros((BM, BC), dtype=tl.float32)  # [BM, BC]
    b_acc_u = tl.zeros((BM, BC), dtype=tl.float32)  # [BM, BC]
    for r0 in range(0, H, BR):
        m_r = (r0 + o_r) < H  # [BR]
        b_x = tl.load(p_x, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_wg = tl.load(p_wg, mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BR, BC]
        b_wu = tl.load(p_wu, mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BR, BC]
        if DOT_FP32:
            b_x, b_wg, b_wu = b_x.to(tl.float32), b_wg.to(tl.float32), b_wu.to(tl.float32)
        b_acc_g = tl.dot(b_x, b_wg, b_acc_g, input_precision=PRECISION)  # [BM, BC]
        b_acc_u = tl.dot(b_x, b_wu, b_acc_u, input_precision=PRECISION)  # [BM, BC]
        p_x += BR * stride_xh
        p_wg += BR * stride_gh
        p_wu += BR * stride_gh
    m_mc = m_m[:, None] & m_c[None, :]  # [BM, BC]
    # h is stored in the activation dtype and the backward reads it back: SwiGLU uses the same rounded values.
    b_g = _cast(b_acc_g, h_ptr.dtype.element_ty, RNE)  # [BM, BC]
    b_u = _cast(b_acc_u, h_ptr.dtype.element_ty, RNE)  # [BM, BC]
    p_h = h_ptr + o_m[:, None] * stride_hn + o_c[None, :] * stride_hj  # [BM, BC]
    tl.store(p_h, b_g, mask=m_mc)
    tl.store(p_h + I * stride_hj, b_u, mask=m_mc)
    b_gf, b_uf = _clamp_gate_up(b_g.to(tl.float32), b_u.to(tl.float32), limit, CLAMP)  # [BM, BC]
    b_w = tl.load(weight_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)  # [BM]
    b_a = b_gf * tl.sigmoid(b_gf) * b_uf * b_w[:, None]  # [BM, BC]
    p_a = a_ptr + o_m[:, None] * stride_an + o_c[None, :] * stride_ai  # [BM, BC]
    tl.store(p_a, _cast(b_a, a_ptr.dtype.element_ty, RNE), mask=m_mc)


@triton.jit
def _grouped_gemm_scatter_kernel(
        a_ptr, b_ptr, out_ptr, scatter_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        C, R,
        stride_an, stride_ar, stride_be, stride_br, stride_bc, stride_op, stride_oc,
        BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """out[scatter[n]] = a[n] @ b[e] for the rows n of expert e; b[e] is (R, C) through its strides."""
    pid_c = tl.program_id(1)
    e, o_m, m_m = _tile_rows(tile_expert_ptr, tile_start_ptr, offsets_ptr, BM)
    if e < 0:
        return
    o_c = pid_c * BC + tl.arange(0, BC)  # [BC]
    m_c = o_c < C  # [BC]
    b_out = _tile_mainloop(a_ptr, o_m, m_m, stride_an, stride_ar, b_ptr + e * stride_be, stride_br, stride_bc,
                           o_c, m_c, R, BM, BC, BR, DOT_FP32, PRECISION)  # [BM, BC]
    o_p = tl.load(scatter_ptr + o_m, mask=m_m, other=0)  # [BM]
    m_mc = m_m[:, None] & m_c[None, :]  # [BM, BC]
    p_out = out_ptr + o_p[:, None] * stride_op + o_c[None, :] * stride_oc  # [BM, BC]
    tl.store(p_out, _cast(b_out, out_ptr.dtype.element_ty, RNE), mask=m_mc)


@triton.jit
def _down_swiglu_bwd_kernel(
        grad_y_ptr, token_ptr, down_ptr, h_ptr, weight_ptr, grad_h_ptr, a_ptr, grad_w_part_ptr,
        tile_expert_ptr, tile_start_ptr, offsets_ptr,
        H, I, limit,
        stride_gyt, stride_gyh, stride_de, stride_dh, stride_di, stride_hn, stride_hj, stride_an, stride_ai,
        stride_pn, stride_pq,
        BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, CLAMP: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """grad_a = grad_y[token] @ W_d[e] for one tile, then in the epilogue, with g, u from h (clamped with CLAMP)
    and s = σ(g): grad_h = [grad_a·w·u·s(1 + g(1 − s)) ; grad_a·w·g·s] (each zero where its clamp is active),
    a = g·s·u·w, and Σ_cols grad_a·g·s·u as this column tile's part of grad_w."""
    e, o_m, m_m, o_t, o_c, m_c = _gathered_tile(token_ptr, tile_expert_ptr, tile_start_ptr, offsets_ptr, I, BM, BC)
    if e < 0:
        return
    b_grad_a = _tile_mainloop(grad_y_ptr, o_t, m_m, stride_gyt, stride_gyh, down_ptr + e * stride_de, stride_dh,
                              stride_di, o_c, m_c, H, BM, BC, BR, DOT_FP32, PRECISION)  # [BM, BC]
    m_mc = m_m[:, None] & m_c[None, :]  # [BM, BC]
    p_h = h_ptr + o_m[:, None] * stride_hn + o_c[None, :] * stride_hj  # [BM, BC]
    b_g0 = tl.load(p_h, mask=m_mc, other=0.0).to(tl.float32)  # [BM, BC]
    b_u0 = tl.load(p_h + I * stride_hj, mask=m_mc, other=0.0).to(tl.float32)  # [BM, BC]
    b_g, b_u = _clamp_gate_up(b_g0, b_u0, limit, CLAMP)  # [BM, BC]
    b_w = tl.load(weight_ptr + o_m, mask=m_m, other=0.0).to(tl.float32)  # [BM]
    b_s = tl.sigmoid(b_g)  # [BM, BC]
    b_silu = b_g * b_s  # [BM, BC]
    b_a0 = b_silu * b_u  # [BM, BC]
    tl.store(grad_w_part_ptr + o_m * stride_pn + tl.program_id(1) * stride_pq, tl.sum(b_grad_a * b_a0, axis=1),
             mask=m_m)
    b_dyw = b_grad_a * b_w[:, None]  # [BM, BC]
    p_grad_h = grad_h_ptr + o_m[:, None] * stride_hn + o_c[None, :] * stride_hj  # [BM, BC]
    b_grad_g = b_dyw * b_u * (b_s * (1.0 + b_g * (1.0 - b_s)))  # [BM, BC]
    b_grad_u = b_dyw * b_silu  # [BM, BC]
    if CLAMP:  # no gradient through an active clamp; it passes at the bound itself, as torch.clamp's
        b_grad_g = tl.where(b_g0 <= limit, b_grad_g, 0.0)
        b_grad_u = tl.where((b_u0 >= -limit) & (b_u0 <= limit), b_grad_u, 0.0)
    tl.store(p_grad_h, _cast(b_grad_g, grad_h_ptr.dtype.element_ty, RNE), mask=m_mc)
    tl.store(p_grad_h + I * stride_hj, _cast(b_grad_u, grad_h_ptr.dtype.element_ty, RNE), mask=m_mc)
    p_a = a_ptr + o_m[:, None] * stride_an + o_c[None, :] * stride_ai  # [BM, BC]
    tl.store(p_a, _cast(b_a0 * b_w[:, None], a_ptr.dtype.element_ty, RNE), mask=m_mc)


@triton.jit
def _expert_weight_grad_kernel(
        a_ptr, a_index_ptr, b_ptr, b_index_ptr, out_ptr, offsets_ptr,
        M, C,
        stride_ar, stride_am, stride_br, stride_bc, stride_oe, stride_om, stride_oc,
        GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
        BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr,
        DOT_FP32: tl.constexpr, RNE: tl.constexpr, PRECISION: tl.constexpr):
    """out[e] = Σ_{r in segment e} A[ia(r)]ᵀ B[ib(r)]: a [BM, BC] tile of the (M, C) output per program, looping
    over the expert's rows BR at a time; ia/ib gather rows through index arrays when GATHER_A/GATHER_B. Experts
    without rows get 0."""
    e = tl.program_id(0)
    pid = tl.program_id(1)
    num_c = tl.cdiv(C, BC)
    pid_m = pid // num_c
    pid_c = pid % num_c
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    o_m = pid_m * BM + tl.arange(0, BM)  # [BM]
    o_c = pid_c * BC + tl.arange(0, BC)  # [BC]
    m_m = o_m < M  # [BM]
    m_c = o_c < C  # [BC]
    b_acc = tl.zeros((BM, BC), dtype=tl.float32)  # [BM, BC]
    for r0 in range(start, end, BR):
        o_r = r0 + tl.arange(0, BR)  # [BR]
        m_r = o_r < end  # [BR]
        if GATHER_A:
            o_ra = tl.load(a_index_ptr + o_r, mask=m_r, other=0)  # [BR]
        else:
            o_ra = o_r
        if GATHER_B:
            o_rb = tl.load(b_index_ptr + o_r, mask=m_r, other=0)  # [BR]
        else:
            o_rb = o_r
        b_a = tl.load(a_ptr + o_ra[None, :] * stride_ar + o_m[:, None] * stride_am,
                      mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_b = tl.load(b_ptr + o_rb[:, None] * stride_br + o_c[None, :] * stride_bc,
                      mask=m_r[:, None] & m_c[None, :], other=0.0)  # [BR, BC]
        if DOT_FP32:
            b_a, b_b = b_a.to(tl.float32), b_b.to(tl.float32)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=PRECISION)  # [BM, BC]
    m_mc = m_m[:, None] & m_c[None, :]  # [BM, BC]
    p_out = out_ptr + e * stride_oe + o_m[:, None] * stride_om + o_c[None, :] * stride_oc  # [BM, BC]
    tl.store(p_out, _cast(b_acc, out_ptr.dtype.element_ty, RNE), mask=m_mc)
