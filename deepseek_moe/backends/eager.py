"""The reference experts: a per-expert loop written to be read. Every other backend is tested against it.

Legend: N dispatched rows (pairs in expert order), H hidden size, I expert hidden size, J = 2·I, E routed
experts, n rows of the current expert.
"""
from __future__ import annotations

from typing import List

import torch

from ..dispatch import DispatchPlan
from .base import Backend, glu


class EagerBackend(Backend):
    """o_n = down_e · GLU(gate_up_e · x_n) for each expert's segment of the dispatched rows; the dispatcher
    gathers the rows and makes the weighted combine. Slow: two small GEMMs per expert and a host sync."""

    name = "eager"

    def run(self, x_NH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        return expert_loop(x_NH, plan.counts_list(), gate_up_EJH, down_EHI, activation)


def expert_loop(x_NH: torch.Tensor, counts: List[int], gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
                activation: str) -> torch.Tensor:
    """o_NH: each expert's segment of the sorted rows (``counts`` rows per expert) through its GLU MLP."""
    # Every expert runs, also on zero rows, so every expert weight gets a gradient (zeros for an idle expert), as
    # data-parallel gradient reductions expect.
    return torch.cat([glu(x_nH @ gate_up_EJH[e].T, activation).to(x_NH.dtype) @ down_EHI[e].T
                      for e, x_nH in enumerate(x_NH.split(counts))])
