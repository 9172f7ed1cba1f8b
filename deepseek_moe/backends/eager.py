"""The reference experts: a per-expert loop written to be read. Every other backend is tested against it.

Legend: N dispatched rows (pairs in expert order), H hidden size, I expert hidden size, J = 2·I, E routed
experts, n rows of the current expert.
"""
from __future__ import annotations

import torch

from ..dispatch import DispatchPlan
from .base import Backend, glu


class EagerBackend(Backend):
    """o_n = down_e · GLU(gate_up_e · x_n) for each expert's segment of the dispatched rows; the dispatcher
    gathers the rows and makes the weighted combine. Slow: two small GEMMs per expert and a host sync."""

    name = "eager"

    def run(self, x_NH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        # Every expert runs, also on zero rows, so every expert weight gets a gradient (zeros for an idle
        # expert), as data-parallel gradient reductions expect.
        o_nH = [glu(x_nH @ gate_up_EJH[e].T, activation).to(x_NH.dtype) @ down_EHI[e].T
                for e, x_nH in enumerate(x_NH.split(plan.counts_list()))]
        return torch.cat(o_nH) if o_nH else x_NH.new_zeros(0, x_NH.shape[1])
