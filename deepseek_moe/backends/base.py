"""The interface every routed-experts backend implements, and the GLU math they share.

Legend: T tokens, H hidden size, I expert hidden size, J = 2·I (gate rows then up rows), E routed experts,
N kept (token, slot) pairs in expert-sorted order.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import ACTIVATIONS
from ..dispatch import DispatchPlan, build_plan, combine_experts, rows_for_experts


class Backend:
    """An implementation of the routed experts, the ``experts`` stage of the pipeline
    ``dispatch → experts → combine`` (see :mod:`deepseek_moe.dispatch`).

    :meth:`run` maps the dispatched rows to the experts' outputs. Two class attributes say which neighbouring steps
    a fused implementation does itself (as vLLM's ``TopKWeightAndReduce`` does), so the dispatcher skips them:

    * ``gathers``: False — ``run`` gets x_NH, the pairs' rows in expert order; True — it gets x_TH and reads each
      pair's row through ``plan.token_N`` itself.
    * ``reduces``: False — ``run`` returns o_NH, each pair's unweighted expert output, and the dispatcher's
      weighted combine makes y_TH; True — it returns y_TH = Σ_k w[t,k]·o, having weighed and summed itself.

    :meth:`unavailable_reason` returns None when the backend can run on that device and dtype, else a sentence
    saying why not and how to fix it. ``activations``: the GLU gate activations it implements.
    """

    name = "base"
    activations = ACTIVATIONS
    gathers = False
    reduces = False

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def activation_reason(self, activation: str) -> Optional[str]:
        """None if this backend implements the GLU gate ``activation``, else why not."""
        if activation in self.activations:
            return None
        if activation not in ACTIVATIONS:
            return f"hidden_act={activation!r} is invalid; expected one of {ACTIVATIONS}"
        return (f"the {self.name} backend implements the {'/'.join(self.activations)} GLU only, not "
                f"hidden_act={activation!r}; use backend='torch' or 'auto' (which picks it unless "
                f"DEEPSEEK_MOE_BACKEND names {self.name!r})")

    def check_activation(self, activation: str) -> None:
        """Raise ValueError when :meth:`activation_reason` has a reason."""
        reason = self.activation_reason(activation)
        if reason is not None:
            raise ValueError(reason)

    def prepare(self) -> None:
        """Called when the backend is selected by name, before :meth:`unavailable_reason`: a backend that needs
        a build or a load does it here (status queries never trigger one)."""

    def build_plan(self, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int,
                   capacity: Optional[int] = None, affinity_TK: Optional[torch.Tensor] = None,
                   keep_TK: Optional[torch.Tensor] = None) -> DispatchPlan:
        """The dispatch plan (see :func:`deepseek_moe.dispatch.build_plan`); a backend with a faster sort
        overrides it and must return the same plan."""
        return build_plan(topk_idx_TK, weight_TK, num_experts, capacity, affinity_TK, keep_TK)

    def run(self, x: torch.Tensor, plan: DispatchPlan, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
            activation: str = "silu") -> torch.Tensor:
        """The experts on the dispatched rows. ``x``: x_NH (N, H), or x_TH (T, H) when :attr:`gathers`;
        gate_up_EJH (E, 2I, H), down_EHI (E, H, I), all one dtype; ``activation``: one of :attr:`activations`.
        Returns o_NH (N, H), or y_TH (T, H) when :attr:`reduces`, in x's dtype; differentiable w.r.t. x, both
        weights and (when :attr:`reduces`) ``plan.weight_TK``."""
        raise NotImplementedError

    def routed_mlp(self, x_TH: torch.Tensor, plan: DispatchPlan, gate_up_EJH: torch.Tensor,
                   down_EHI: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        """y_TH (T, H) = Σ_k w[t,k]·GLU_e(x_t) over the kept pairs of ``plan``: :meth:`run` between the local
        dispatcher's gather and combine (the whole routed path on one device)."""
        o = self.run(rows_for_experts(x_TH, plan, self), plan, gate_up_EJH, down_EHI, activation)
        return combine_experts(o, plan, self)

    def __repr__(self) -> str:
        return f"<deepseek_moe backend {self.name!r}>"


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: fp32 for 16-bit floats, else the dtype itself (fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


# name -> (forward, ATen backward op computing grad · act'(g), its extra arguments)
_GLU_GATES = {
    "silu": (F.silu, torch.ops.aten.silu_backward, {}),
    "gelu": (F.gelu, torch.ops.aten.gelu_backward, {"approximate": "none"}),
    "gelu_pytorch_tanh": (partial(F.gelu, approximate="tanh"), torch.ops.aten.gelu_backward, {"approximate": "tanh"}),
    "relu": (F.relu, torch.ops.aten.threshold_backward, {"threshold": 0.0}),
}


def _gate(activation: str):
    try:
        return _GLU_GATES[activation]
    except KeyError:
        raise ValueError(f"activation={activation!r} is invalid; expected one of {ACTIVATIONS}") from None


def activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    """The GLU gate activation ``act(g)`` by its transformers name (see ``deepseek_moe.config.ACTIVATIONS``)."""
    return _gate(activation)[0](g)


def activate_backward(grad_NI: torch.Tensor, g_NI: torch.Tensor, activation: str,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad · act'(g), through ATen's own backward kernels (into ``out`` when given)."""
    _, op, kwargs = _gate(activation)
    if out is None:
        return op(grad_NI, g_NI, **kwargs)
    return op.grad_input(grad_NI, g_NI, **kwargs, grad_input=out)


def glu(h_NJ: torch.Tensor, activation: str = "silu", w_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The GLU of the package, a = act(gate) · up (· w), in the accumulation dtype: h_NJ (N, 2I) gate columns
    then up columns, w_N (N,) optional -> (N, I). Every fused kernel is tested against it."""
    I = h_NJ.shape[1] // 2
    acc = acc_dtype(h_NJ.dtype)
    gate_NI, up_NI = h_NJ[:, :I].to(acc), h_NJ[:, I:].to(acc)
    if torch.is_grad_enabled() and (h_NJ.requires_grad or (w_N is not None and w_N.requires_grad)):
        a_NI = activate(gate_NI, activation) * up_NI
        return a_NI if w_N is None else a_NI * w_N.to(acc).unsqueeze(1)
    # No autograd (inside the segment op, or inference): one buffer, updated in place.
    a_NI = activate(gate_NI, activation).mul_(up_NI)
    return a_NI if w_N is None else a_NI.mul_(w_N.to(acc).unsqueeze(1))


def glu_backward(h_NJ: torch.Tensor, w_N: Optional[torch.Tensor], grad_a_NI: torch.Tensor,
                 activation: str = "silu") -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`glu`, in the accumulation dtype (see :func:`acc_dtype`).

    ``w_N`` None means no weight (w = 1; the returned grad_w_N is None, and ``grad_a_NI`` is only read);
    with a weight, ``grad_a_NI`` may be overwritten (callers pass a temporary). Returns (grad_h_NJ (N, 2I),
    grad_w_N (N,), a_NI (N, I) the weighted activation, which the caller needs for the down-projection's weight
    gradient).
    """
    I = h_NJ.shape[1] // 2
    acc = acc_dtype(h_NJ.dtype)
    g_NI, u_NI = h_NJ[:, :I].to(acc), h_NJ[:, I:].to(acc)
    dy_NI = grad_a_NI.to(acc)
    act_NI = activate(g_NI, activation)
    a_NI = act_NI * u_NI
    grad_w_N = None
    if w_N is not None:
        w_N1 = w_N.to(acc).unsqueeze(1)
        grad_w_N = torch.linalg.vecdot(dy_NI, a_NI)
        dy_NI.mul_(w_N1)
        a_NI.mul_(w_N1)
    grad_h_NJ = torch.empty(h_NJ.shape, dtype=acc, device=h_NJ.device)
    torch.mul(dy_NI, act_NI, out=grad_h_NJ[:, I:])
    torch.mul(dy_NI, u_NI, out=act_NI)  # act(g) is no longer needed: reuse its buffer for dy·u
    activate_backward(act_NI, g_NI, activation, out=grad_h_NJ[:, :I])
    return grad_h_NJ, grad_w_N, a_NI
