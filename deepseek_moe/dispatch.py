"""DispatchPlan: which (token, slot) pairs each expert processes, in expert-sorted order.

Legend: T tokens, K experts per token, E routed experts, H hidden size,
N kept (token, slot) pairs (N = T·K in dropless mode), P = T·K all pairs.
A pair p = t·K + k is token t's k-th choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class DispatchPlan:
    """Routing metadata handed from dispatch to the experts and back to combine.

    Attributes:
        topk_idx_TK: int64 (T, K) chosen experts (from :class:`~deepseek_moe.router.Routing`).
        weight_TK: (T, K) gate weights (differentiable); dropped pairs still carry their weight here.
        keep_TK: bool (T, K) False where capacity dropped the pair (all True when dropless).
        pair_N: int64 (N,) kept pair ids p = t·K + k, sorted by expert (stable: token order within an expert,
            or descending affinity when capacity applies).
        token_N: int64 (N,) token of each sorted pair (pair_N // K).
        slot_TK: int64 (T, K) position of each pair in the sorted order, N for dropped pairs (a zero row).
        counts_E: int64 (E,) kept pairs per expert. offsets_E1: int64 (E+1,) segment starts, offsets[0] = 0.
        routed_counts_E: int64 (E,) pairs per expert before dropping (the router's load).
        num_dropped: int64 0-dim tensor, pairs dropped by capacity.
    """

    topk_idx_TK: torch.Tensor
    weight_TK: torch.Tensor
    keep_TK: torch.Tensor
    pair_N: torch.Tensor
    token_N: torch.Tensor
    slot_TK: torch.Tensor
    counts_E: torch.Tensor
    offsets_E1: torch.Tensor
    routed_counts_E: torch.Tensor
    num_dropped: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def top_k(self) -> int:
        return self.topk_idx_TK.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.topk_idx_TK.shape[0]

    def counts_list(self) -> List[int]:
        """Host copy of counts_E (one device sync); for backends that loop over expert segments."""
        return self.counts_E.tolist()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(c · T · K / E): the most pairs one expert keeps when capacity applies."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def build_plan(topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int,
               capacity: Optional[int] = None, affinity_TK: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Sort the (token, slot) pairs by expert and, with ``capacity``, drop the lowest-affinity excess.

    Args:
        topk_idx_TK: int64 (T, K) chosen experts. weight_TK: (T, K) gate weights.
        num_experts: E.
        capacity: None for dropless; else each expert keeps at most this many pairs, those of highest
            ``affinity_TK`` (T, K) (ties: lower token index first).
    """
    T, K = topk_idx_TK.shape
    device = topk_idx_TK.device
    expert_P = topk_idx_TK.reshape(-1)
    # Not bincount: its output length depends on the data, which torch.compile(fullgraph=True) cannot trace.
    routed_counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, expert_P, torch.ones_like(expert_P))
    if capacity is None:
        pair_P = torch.argsort(expert_P, stable=True)
        keep_TK = torch.ones(T, K, dtype=torch.bool, device=device)
        pair_N = pair_P
        counts_E = routed_counts_E
    else:
        if affinity_TK is None:
            raise ValueError("build_plan: capacity needs affinity_TK to choose which pairs to drop")
        # Two stable sorts: by descending affinity, then by expert, so each expert's segment is best-first.
        by_affinity_P = torch.argsort(affinity_TK.detach().reshape(-1), descending=True, stable=True)
        pair_P = by_affinity_P[torch.argsort(expert_P[by_affinity_P], stable=True)]
        starts_E = torch.cumsum(routed_counts_E, 0) - routed_counts_E
        rank_P = torch.arange(T * K, device=device) - starts_E[expert_P[pair_P]]
        kept_P = rank_P < capacity
        pair_N = pair_P[kept_P]
        keep_TK = torch.zeros(T * K, dtype=torch.bool, device=device)
        keep_TK[pair_N] = True
        keep_TK = keep_TK.view(T, K)
        counts_E = torch.clamp(routed_counts_E, max=capacity)
    N = pair_N.numel()
    slot_P = torch.full((T * K,), N, dtype=torch.int64, device=device)
    slot_P[pair_N] = torch.arange(N, device=device)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)])
    return DispatchPlan(
        topk_idx_TK=topk_idx_TK, weight_TK=weight_TK, keep_TK=keep_TK, pair_N=pair_N,
        token_N=torch.div(pair_N, K, rounding_mode="floor"), slot_TK=slot_P.view(T, K), counts_E=counts_E,
        offsets_E1=offsets_E1, routed_counts_E=routed_counts_E, num_dropped=(T * K - N) * torch.ones(
            (), dtype=torch.int64, device=device))


# ----------------------------------------------------------------------------------------------------------
# Data movement with mirror-image backwards: gather(x) ↔ sum-combine. Both are exact (no arithmetic besides
# the K-way sum), deterministic, and free of index_put/atomics.


def _gather(x_TH: torch.Tensor, token_N: torch.Tensor) -> torch.Tensor:
    return x_TH.index_select(0, token_N)


def _combine(o_NH: torch.Tensor, slot_TK: torch.Tensor) -> torch.Tensor:
    """y_TH[t] = Σ_k o[slot[t, k]] added in slot order (k = 0, 1, ...) in fp32 (fp64 for fp64), o's dtype out;
    slot == N means a dropped pair (adds zero). The fixed order makes the compiled extension's combine
    bit-identical; it also never materialises the (T·K, H) gathered rows."""
    T, K = slot_TK.shape
    N, H = o_NH.shape
    acc = torch.promote_types(o_NH.dtype, torch.float32)
    src = o_NH if N == T * K else torch.cat([o_NH, o_NH.new_zeros(1, H)])  # fewer rows: some pairs dropped
    y_TH = torch.zeros(T, H, dtype=acc, device=o_NH.device)
    rows_TH = src.new_empty(T, H)
    for k in range(K):
        torch.index_select(src, 0, slot_TK[:, k], out=rows_TH)
        y_TH += rows_TH
    return y_TH.to(o_NH.dtype)


class GatherRows(torch.autograd.Function):
    """x_sorted_NH = x_TH[token_N]; backward sums the K copies of each token through ``slot_TK``."""

    @staticmethod
    def forward(ctx, x_TH, token_N, slot_TK):
        ctx.save_for_backward(token_N, slot_TK)
        return _gather(x_TH, token_N)

    @staticmethod
    def backward(ctx, grad_NH):
        token_N, slot_TK = ctx.saved_tensors
        return CombineRows.apply(grad_NH.contiguous(), token_N, slot_TK), None, None


class CombineRows(torch.autograd.Function):
    """y_TH[t] = Σ_k o_NH[slot[t, k]] (dropped pairs add zero); backward gathers through ``token_N``."""

    @staticmethod
    def forward(ctx, o_NH, token_N, slot_TK):
        ctx.save_for_backward(token_N, slot_TK)
        return _combine(o_NH, slot_TK)

    @staticmethod
    def backward(ctx, grad_TH):
        token_N, slot_TK = ctx.saved_tensors
        return GatherRows.apply(grad_TH.contiguous(), token_N, slot_TK), None, None


def gather_rows(x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, H) -> (N, H): each kept pair's token row, in expert-sorted order (differentiable)."""
    return GatherRows.apply(x_TH, plan.token_N, plan.slot_TK)


def combine_rows(o_NH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(N, H) -> (T, H): sum of each token's kept expert outputs (differentiable, same dtype as o_NH)."""
    return CombineRows.apply(o_NH, plan.token_N, plan.slot_TK)


def sorted_weights(plan: DispatchPlan) -> torch.Tensor:
    """(N,) gate weight of each kept pair in sorted order (differentiable w.r.t. plan.weight_TK)."""
    return plan.weight_TK.reshape(-1).index_select(0, plan.pair_N)
