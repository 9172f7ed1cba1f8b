"""The reference backend: a per-expert loop written to be read. Every other backend is tested against it.

Legend: T tokens, H hidden size, I expert hidden size, E routed experts, K experts per token,
n pairs routed to the current expert.
"""
from __future__ import annotations

import torch

from ..dispatch import DispatchPlan
from .base import Backend, acc_dtype, activate


class EagerBackend(Backend):
    """Loops over experts; uses only ``topk_idx_TK``, ``keep_TK`` and ``weight_TK`` of the plan (not its sort),
    so it also checks the dispatch sort of the fast backends. Slow: O(E) small ops and full-size gradient
    buffers per expert."""

    name = "eager"

    def routed_mlp(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        T, H = x_TH.shape
        I = down_EHI.shape[-1]
        acc = acc_dtype(x_TH.dtype)
        y_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
        for e in range(gate_up_EJH.shape[0]):
            tok_n, slot_n = torch.nonzero((plan.topk_idx_TK == e) & plan.keep_TK, as_tuple=True)
            if tok_n.numel() == 0:
                continue
            h_nJ = x_TH[tok_n] @ gate_up_EJH[e].T
            gate_nI, up_nI = h_nJ[:, :I].to(acc), h_nJ[:, I:].to(acc)
            act_nI = (activate(gate_nI, activation) * up_nI).to(x_TH.dtype)
            out_nH = act_nI @ down_EHI[e].T
            w_n1 = plan.weight_TK[tok_n, slot_n].to(acc).unsqueeze(1)
            y_TH = y_TH.index_add(0, tok_n, out_nH.to(acc) * w_n1)
        if not plan.keep_TK.any():
            # No pair at all (an empty or all-padding batch): zero gradients rather than none, as the fast
            # backends give, so data-parallel gradient reductions see every expert weight on every rank.
            y_TH = y_TH + 0.0 * (gate_up_EJH.sum() + down_EHI.sum()).to(acc)
        return y_TH.to(x_TH.dtype)
