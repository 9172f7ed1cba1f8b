"""Dispatchers: where the routed experts run. A dispatcher owns placement only; the experts implementation owns
permute -> compute -> unpermute (see :class:`deepseek_moe.backends.Backend`).

* :class:`LocalDispatcher`: every expert on this device. plan -> ``experts(x_TH, plan, impl)`` -> y_TH.
* ``deepseek_moe.parallel.AllToAllDispatcher``: exchange the rows with the ranks that hold their experts ->
  the received rows' plan -> ``experts(x_RH, plan, impl)`` -> exchange the outputs back.

The planner (:func:`deepseek_moe.plan.build_plan`, or the compiled extension's counting sort) is the selected
implementation's ``plan`` method, fixed when the implementation is selected.

Legend: T tokens, K experts per token, E routed experts, H hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple

import torch

from .plan import DispatchPlan, build_plan, expert_capacity, segment_ranks, sorted_weights  # noqa: F401 (re-exports)
from .rows import CombineRows, GatherRows, combine_rows, gather_rows  # noqa: F401 (re-exports)
from .stages import stage

if TYPE_CHECKING:
    from .backends.base import Backend
    from .router import Routing


@dataclass
class Dispatched:
    """What a dispatch leaves for the layer's statistics.

    Attributes:
        plan: this rank's tokens' (token, slot) pairs sorted by expert: the router's load and statistics.
        num_dropped: int64 0-dim, pairs dropped by expert capacity and device capacity.
        exchange: the all-to-all's bookkeeping (``AllToAllDispatcher``), else None.
        kept_counts_E: int64 (E,), this rank's pairs per expert that the experts processed where that is fewer than
            ``plan.counts_E`` (the receiving ranks dropped some over their device capacity), else None.
    """

    plan: DispatchPlan
    num_dropped: torch.Tensor
    exchange: Any = None
    kept_counts_E: Optional[torch.Tensor] = None

    @property
    def processed_counts_E(self) -> torch.Tensor:
        """int64 (E,): this rank's pairs per expert that the experts processed (``tokens_per_expert``)."""
        return self.plan.counts_E if self.kept_counts_E is None else self.kept_counts_E


# (x_TH, plan) -> y_TH: the routed experts, with their weights and implementation bound by the layer.
RunExperts = Callable[[torch.Tensor, DispatchPlan], torch.Tensor]


class Dispatcher:
    """Runs the routed experts on the tokens' rows wherever the experts live: ``dispatcher(x_TH, routing,
    run_experts, impl, training) -> (y_TH, Dispatched)``.

    ``capacity_factor`` c (None: dropless) caps each expert at C = ceil(c·T·K/E) pairs in training
    (:func:`~deepseek_moe.plan.expert_capacity`), dropping the lowest-affinity ones.
    """

    def __init__(self, num_experts: int, capacity_factor: Optional[float] = None):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def plan(self, routing: "Routing", impl: "Backend", training: bool) -> DispatchPlan:
        """The :class:`DispatchPlan` of ``routing``, from the implementation's planner."""
        topk_idx_TK = routing.topk_idx_TK
        if self.capacity_factor is None or not training:
            return impl.plan(topk_idx_TK, routing.topk_weight_TK, self.num_experts)
        T, K = topk_idx_TK.shape
        capacity = expert_capacity(T, K, self.num_experts, self.capacity_factor)
        affinity_TK = routing.scores_TE.gather(1, topk_idx_TK)
        return impl.plan(topk_idx_TK, routing.topk_weight_TK, self.num_experts, capacity, affinity_TK)

    def __call__(self, x_TH: torch.Tensor, routing: "Routing", run_experts: RunExperts, impl: "Backend",
                 training: bool) -> Tuple[torch.Tensor, Dispatched]:
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """Every routed expert on this device: plan, then the experts on all the pairs."""

    def __call__(self, x_TH: torch.Tensor, routing: "Routing", run_experts: RunExperts, impl: "Backend",
                 training: bool) -> Tuple[torch.Tensor, Dispatched]:
        """x_TH (T, H) -> (y_TH (T, H) the routed output, :class:`Dispatched`)."""
        with stage("plan"):
            plan = self.plan(routing, impl, training)
        return run_experts(x_TH, plan), Dispatched(plan, plan.num_dropped)
