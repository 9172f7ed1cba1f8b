"""Dispatch: which (token, slot) pairs each expert processes (DispatchPlan), the data movement between token
order and expert order (gather, the one weighted combine), and the local dispatcher.

The layer's forward is ``x, d = dispatcher.dispatch(x_TH, routing, experts, training)``; ``o =
experts(x, d.experts_plan)``; ``y_TH = dispatcher.combine(o, d, experts)``. :class:`LocalDispatcher` keeps every
expert on this device; ``deepseek_moe.parallel.AllToAllDispatcher`` sends the pairs to the ranks holding their
experts. An experts implementation that gathers its rows or weighs and sums its outputs itself says so
(``Backend.gathers``, ``Backend.reduces``), and the dispatcher then leaves that step to it.

Legend: T tokens, K experts per token, E routed experts, H hidden size,
N kept (token, slot) pairs (N = T·K in dropless mode), P = T·K all pairs.
A pair p = t·K + k is token t's k-th choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import torch

if TYPE_CHECKING:  # annotations only: backends import this module
    from .backends.base import Backend
    from .router import Routing


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


# ----------------------------------------------------------------------------------------------------------
# Data movement with mirror-image backwards: gather ↔ combine. Exact (no arithmetic besides the weighted K-way
# sum), deterministic (a fixed summation order, no atomics) and free of index_put.


def _combine(o_NH: torch.Tensor, slot_TK: torch.Tensor, weight_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y_TH[t] = Σ_k w[t, k] · o[slot[t, k]] (w = 1 without weights), added in slot order (k = 0, 1, ...) in fp32
    (fp64 for fp64), o's dtype out; slot == N means no pair (adds zero). The fixed order makes the compiled
    extension's combine bit-identical; it also never materialises the (T·K, H) gathered rows."""
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
        elif rows_TH.dtype == acc:  # w·o rounded, then added (no fused multiply-add: the compiled combine's sums)
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


def rows_for_experts(x_TH: torch.Tensor, plan: DispatchPlan, experts: "Backend") -> torch.Tensor:
    """What ``experts.run`` takes: the (N, H) rows in expert order, or x_TH itself for an implementation that
    gathers (``experts.gathers``)."""
    return x_TH if experts.gathers else gather_rows(x_TH, plan)


def combine_experts(o: torch.Tensor, plan: DispatchPlan, experts: "Backend") -> torch.Tensor:
    """``experts.run``'s output -> y_TH (T, H): the weighted combine of o_NH, or o itself for an implementation
    that weighs and sums (``experts.reduces``)."""
    return o if experts.reduces else combine_rows(o, plan, weighted=True)


def sorted_weights(plan: DispatchPlan) -> torch.Tensor:
    """(N,) gate weight of each kept pair in sorted order (differentiable w.r.t. plan.weight_TK)."""
    return plan.weight_TK.reshape(-1).index_select(0, plan.pair_N)


# ----------------------------------------------------------------------------------------------------------
# Dispatchers


@dataclass
class Dispatched:
    """What a dispatcher hands to the experts and back to its combine.

    Attributes:
        plan: this rank's tokens' (token, slot) pairs sorted by expert: the router's load and statistics.
        experts_plan: the pairs this rank's experts process (``plan`` itself unless experts are sharded).
        num_dropped: int64 0-dim, pairs dropped by expert capacity and device capacity.
        exchange: the all-to-all's bookkeeping (``AllToAllDispatcher``), else None.
    """

    plan: DispatchPlan
    experts_plan: DispatchPlan
    num_dropped: torch.Tensor
    exchange: Any = None


class Dispatcher:
    """Moves token rows to the experts and their outputs back: ``dispatch`` then ``combine``.

    ``capacity_factor`` c (None: dropless) caps each expert at C = ceil(c·T·K/E) pairs in training
    (:func:`expert_capacity`), dropping the lowest-affinity ones.
    """

    def __init__(self, num_experts: int, capacity_factor: Optional[float] = None):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def plan(self, routing: "Routing", experts: "Backend", training: bool) -> DispatchPlan:
        """The :class:`DispatchPlan` of ``routing`` (built by ``experts``, which may have a faster sort)."""
        topk_idx_TK = routing.topk_idx_TK
        if self.capacity_factor is None or not training:
            return experts.build_plan(topk_idx_TK, routing.topk_weight_TK, self.num_experts)
        T, K = topk_idx_TK.shape
        capacity = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        affinity_TK = routing.scores_TE.gather(1, topk_idx_TK)
        return experts.build_plan(topk_idx_TK, routing.topk_weight_TK, self.num_experts, capacity, affinity_TK)

    def dispatch(self, x_TH: torch.Tensor, routing: "Routing", experts: "Backend", training: bool
                 ) -> Tuple[torch.Tensor, Dispatched]:
        """x_TH (T, H) -> (the experts' input, :class:`Dispatched`)."""
        raise NotImplementedError

    def combine(self, o: torch.Tensor, d: Dispatched, experts: "Backend") -> torch.Tensor:
        """The experts' output -> y_TH (T, H), the routed output of the local tokens."""
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """Every routed expert on this device: sort the pairs by expert, gather their rows, and after the experts
    combine (weigh by the gate weights and sum each token's K outputs, fp32, deterministic)."""

    def dispatch(self, x_TH: torch.Tensor, routing: "Routing", experts: "Backend", training: bool
                 ) -> Tuple[torch.Tensor, Dispatched]:
        """x_TH (T, H) -> (the experts' input (:func:`rows_for_experts`), :class:`Dispatched`)."""
        plan = self.plan(routing, experts, training)
        return rows_for_experts(x_TH, plan, experts), Dispatched(plan, plan, plan.num_dropped)

    def combine(self, o: torch.Tensor, d: Dispatched, experts: "Backend") -> torch.Tensor:
        """The experts' output -> y_TH (T, H) (:func:`combine_experts`)."""
        return combine_experts(o, d.experts_plan, experts)
