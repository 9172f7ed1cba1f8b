"""The reference experts, written to be read: gather -> per-expert loop -> combine. Every other implementation is
tested against it.

Legend: T tokens, N dispatched rows (pairs in expert order), H hidden size, I expert hidden size, J = 2·I,
E routed experts, n rows of the current expert.
"""
from __future__ import annotations

from typing import List

import torch

from .. import invariant
from ..glu import glu
from ..plan import DispatchPlan
from ..rows import combine_rows, gather_rows
from .base import Backend


class EagerBackend(Backend):
    """x_NH = the pairs' rows in expert order; o_n = down_e · GLU(gate_up_e · x_n) per expert segment; y_TH = the
    weighted combine. Slow: two small GEMMs per expert and a host sync."""

    name = "eager"

    def run(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI):
        o_NH = expert_loop(gather_rows(x_TH, plan), plan.counts_list(), gate_up_EJH, down_EHI, self.activation,
                           self.batch_invariant)
        return combine_rows(o_NH, plan, weighted=True)


def expert_loop(x_NH: torch.Tensor, counts: List[int], gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
                activation: str, batch_invariant: bool = False) -> torch.Tensor:
    """o_NH: each expert's segment of the sorted rows (``counts`` rows per expert) through its GLU MLP
    (``batch_invariant``: GEMMs in fixed row tiles and position-independent activations,
    :mod:`~deepseek_moe.invariant`)."""
    mm = invariant.tiled_mm if batch_invariant else torch.mm
    # Every expert runs, also on zero rows, so every expert weight gets a gradient (zeros for an idle expert), as
    # data-parallel gradient reductions expect.
    return torch.cat([mm(glu(mm(x_nH, gate_up_EJH[e].T), activation, batch_invariant=batch_invariant).to(x_NH.dtype),
                         down_EHI[e].T)
                      for e, x_nH in enumerate(x_NH.split(counts))])
