"""The float64 MoE output written from the formulas, shared by the routing tests (each writes its own routing):
y_t = shared(x_t) + Σ_k w[t, k] · expert_{idx[t, k]}(x_t), each a GLU down(act(gate x) · up x) (DeepSeekMoE eq. 9),
clamped with ``limit`` L as DeepSeek-V4: silu(min(gate x, L)) · clamp(up x, −L, L)."""
from typing import Dict, Optional

import torch
import torch.nn.functional as F


def swiglu(x, gate, up, down, limit: Optional[float] = None):
    g, u = x @ gate.T, x @ up.T
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (F.silu(g) * u) @ down.T


def moe_rows(p: Dict[str, torch.Tensor], x_TH, idx_TK, w_TK, limit: Optional[float] = None) -> torch.Tensor:
    """(T, H) from the layer's parameters ``p`` (state-dict names, float64, leaves where gradients are wanted), the
    chosen experts idx_TK and their weights w_TK; rows whose first id is −1 (padding) are zero."""
    I = p["experts.down_proj"].shape[-1]
    rows = []
    for t in range(x_TH.shape[0]):
        if int(idx_TK[t, 0]) == -1:
            rows.append(x_TH.new_zeros(x_TH.shape[1]))
            continue
        y = 0
        if "shared_experts.gate_proj.weight" in p:
            y = swiglu(x_TH[t], p["shared_experts.gate_proj.weight"], p["shared_experts.up_proj.weight"],
                       p["shared_experts.down_proj.weight"], limit)
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            gate, up = p["experts.gate_up_proj"][e].split(I)
            y = y + w_TK[t, k] * swiglu(x_TH[t], gate, up, p["experts.down_proj"][e], limit)
        rows.append(y)
    return torch.stack(rows)
