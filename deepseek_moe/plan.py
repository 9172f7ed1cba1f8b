"""The dispatch plan: which (token, slot) pairs each expert processes, in expert-sorted order, and capacity.

Built once per forward from the router's choice (:func:`build_plan`, or a faster planner with the same result,
chosen with the experts implementation) and read by every later stage: the experts implementation, the combine,
the load statistics and the balance losses.

Legend: T tokens, K experts per token, E routed experts, N kept (token, slot) pairs (N = T·K in dropless mode),
P = T·K all pairs. A pair p = t·K + k is token t's k-th choice.
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
               capacity: Optional[int] = None, affinity_TK: Optional[torch.Tensor] = None,
               keep_TK: Optional[torch.Tensor] = None) -> DispatchPlan:
    """Sort the (token, slot) pairs by expert and, with ``capacity``, drop the lowest-affinity excess.

    Args:
        topk_idx_TK: int64 (T, K) chosen experts. weight_TK: (T, K) gate weights.
        num_experts: E.
        capacity: None for dropless; else each expert keeps at most this many pairs, those of highest
            ``affinity_TK`` (T, K) (ties: lower token index first).
        keep_TK: bool (T, K), False for slots that hold no pair (rows with fewer than K pairs, as the rows an
            expert-parallel rank receives); such slots count nowhere. Not combined with ``capacity``.

    Raises ValueError for ``capacity`` without ``affinity_TK`` or together with ``keep_TK``, and for a ``keep_TK``
    that is not a bool tensor of ``topk_idx_TK``'s shape.
    """
    T, K = topk_idx_TK.shape
    device = topk_idx_TK.device
    expert_P = topk_idx_TK.reshape(-1)
    if keep_TK is not None:
        if capacity is not None:
            raise ValueError("build_plan: capacity and keep_TK cannot be combined")
        if keep_TK.dtype != torch.bool or keep_TK.shape != topk_idx_TK.shape:
            raise ValueError(f"build_plan: keep_TK must be a bool tensor of topk_idx_TK's shape "
                             f"{tuple(topk_idx_TK.shape)}, got {keep_TK.dtype} {tuple(keep_TK.shape)}")
        return _masked_plan(topk_idx_TK, weight_TK, num_experts, keep_TK)
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
        kept_P = segment_ranks(expert_P[pair_P], routed_counts_E) < capacity
        pair_N = pair_P[kept_P]
        keep_TK = torch.zeros(T * K, dtype=torch.bool, device=device)
        keep_TK[pair_N] = True
        keep_TK = keep_TK.view(T, K)
        counts_E = torch.clamp(routed_counts_E, max=capacity)
    return _finish_plan(topk_idx_TK, weight_TK, keep_TK, pair_N, counts_E, routed_counts_E, T * K - pair_N.numel())


def segment_ranks(group_N: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Each element's position within its group, for elements sorted by group: group_N int64 (N,) ascending,
    counts_G (G,) elements per group -> int64 (N,)."""
    starts_G = torch.cumsum(counts_G, 0) - counts_G
    return torch.arange(group_N.numel(), device=group_N.device) - starts_G[group_N]


def _masked_plan(topk_idx_TK, weight_TK, num_experts, keep_TK) -> DispatchPlan:
    """build_plan for the pairs where ``keep_TK``: the other slots sort after every expert and are cut off."""
    key_P = torch.where(keep_TK.reshape(-1), topk_idx_TK.reshape(-1), num_experts)
    counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=key_P.device).scatter_add_(
        0, key_P, torch.ones_like(key_P))[:num_experts]
    N = int(counts_E.sum())
    pair_N = torch.argsort(key_P, stable=True)[:N]
    return _finish_plan(topk_idx_TK, weight_TK, keep_TK, pair_N, counts_E, counts_E, 0)


def _finish_plan(topk_idx_TK, weight_TK, keep_TK, pair_N, counts_E, routed_counts_E, num_dropped) -> DispatchPlan:
    T, K = topk_idx_TK.shape
    device = topk_idx_TK.device
    N = pair_N.numel()
    slot_P = torch.full((T * K,), N, dtype=torch.int64, device=device)
    slot_P[pair_N] = torch.arange(N, device=device)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)])
    return DispatchPlan(
        topk_idx_TK=topk_idx_TK, weight_TK=weight_TK, keep_TK=keep_TK, pair_N=pair_N,
        token_N=torch.div(pair_N, K, rounding_mode="floor"), slot_TK=slot_P.view(T, K), counts_E=counts_E,
        offsets_E1=offsets_E1, routed_counts_E=routed_counts_E,
        num_dropped=num_dropped * torch.ones((), dtype=torch.int64, device=device))


def sorted_weights(plan: DispatchPlan) -> torch.Tensor:
    """(N,) gate weight of each kept pair in sorted order (differentiable w.r.t. plan.weight_TK)."""
    return plan.weight_TK.reshape(-1).index_select(0, plan.pair_N)
