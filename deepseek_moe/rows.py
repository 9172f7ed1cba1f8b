"""Data movement between token order and expert order, with mirror-image backwards: gather <-> combine.

Exact (no arithmetic besides the weighted K-way sum), deterministic (a fixed summation order, no atomics) and free
of index_put. :func:`combine_rows` is the package's one weighted combine outside the fused kernels: the reference
experts, the grouped-GEMM experts and the all-to-all dispatcher's return path use it.

Legend: T tokens, K experts per token, H hidden size, N kept (token, slot) pairs in expert order.
"""
from __future__ import annotations

from typing import Optional

import torch

from .plan import DispatchPlan


def _combine(o_NH: torch.Tensor, slot_TK: torch.Tensor, weight_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_TH[t] = Σ_k w[t, k] · o[slot[t, k]] (w = 1 without weights), added in slot order (k = 0, 1, ...) in fp32
    (fp64 for fp64), o's dtype out; slot == N means no pair (adds zero). The fixed order makes it deterministic;
    it also never materialises the (T·K, H) gathered rows."""
    T, K = slot_TK.shape
    N, H = o_NH.shape
    acc = torch.promote_types(o_NH.dtype, torch.float32)
    src = o_NH if N == T * K else torch.cat([o_NH, o_NH.new_zeros(1, H)])  # fewer rows: some slots hold no pair
    y_TH = torch.zeros(T, H, dtype=acc, device=o_NH.device)
    rows_TH = src.new_empty(T, H)
    for k in range(K):
        torch.index_select(src, 0, slot_TK[:, k], out=rows_TH)
        if weight_TK is None:
            y_TH += rows_TH
        elif rows_TH.dtype == acc:
            y_TH += torch.mul(rows_TH, weight_TK[:, k:k + 1].to(acc), out=rows_TH)
        else:
            y_TH += rows_TH.to(acc) * weight_TK[:, k:k + 1].to(acc)
    return y_TH.to(o_NH.dtype)


class GatherRows(torch.autograd.Function):
    """x_NH = x_TH[token_N]; backward sums the copies of each token through ``slot_TK`` (the unweighted
    combine)."""

    @staticmethod
    def forward(ctx, x_TH, token_N, slot_TK):
        ctx.save_for_backward(token_N, slot_TK)
        return x_TH.index_select(0, token_N)

    @staticmethod
    def backward(ctx, grad_NH):
        token_N, slot_TK = ctx.saved_tensors
        return CombineRows.apply(grad_NH.contiguous(), None, token_N, slot_TK, None), None, None


class CombineRows(torch.autograd.Function):
    """y_TH[t] = Σ_k w[t, k] · o_NH[slot[t, k]] (w = 1 when ``weight_TK`` is None); backward: grad_o = w · the
    gather of grad_y through ``token_N``, grad_w[t, k] = ⟨o[slot[t, k]], grad_y[t]⟩. ``pair_N`` maps sorted rows to
    (t, k) slots (weighted only)."""

    @staticmethod
    def forward(ctx, o_NH, weight_TK, token_N, slot_TK, pair_N):
        ctx.save_for_backward(o_NH if weight_TK is not None else None, weight_TK, token_N, slot_TK, pair_N)
        return _combine(o_NH, slot_TK, weight_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        o_NH, weight_TK, token_N, slot_TK, pair_N = ctx.saved_tensors
        grad_NH = GatherRows.apply(grad_TH.contiguous(), token_N, slot_TK)
        if weight_TK is None:
            return grad_NH, None, None, None, None
        acc = torch.promote_types(o_NH.dtype, torch.float32)
        grad_o = grad_w = None
        if ctx.needs_input_grad[0]:
            w_N = weight_TK.reshape(-1).index_select(0, pair_N).to(acc)
            grad_o = (grad_NH.to(acc) * w_N.unsqueeze(1)).to(o_NH.dtype)
        if ctx.needs_input_grad[1]:
            grad_w_N = (o_NH.to(acc) * grad_NH.to(acc)).sum(1)  # not vecdot: autocast would run it in 16 bits
            grad_w = torch.zeros(weight_TK.numel(), dtype=acc, device=o_NH.device).index_copy_(0, pair_N, grad_w_N)
            grad_w = grad_w.view(weight_TK.shape).to(weight_TK.dtype)
        return grad_o, grad_w, None, None, None


def gather_rows(x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, H) -> (N, H): each kept pair's token row, in expert-sorted order (differentiable)."""
    return GatherRows.apply(x_TH, plan.token_N, plan.slot_TK)


def combine_rows(o_NH: torch.Tensor, plan: DispatchPlan, weighted: bool = False) -> torch.Tensor:
    """(N, H) -> (T, H): the sum of each token's kept expert outputs, each times its gate weight when
    ``weighted`` (differentiable w.r.t. o and ``plan.weight_TK``), accumulated in fp32, o's dtype out. The one
    combine of the package: fused experts implementations are tested against it."""
    weight_TK = plan.weight_TK if weighted else None
    return CombineRows.apply(o_NH, weight_TK, plan.token_N, plan.slot_TK, plan.pair_N)
