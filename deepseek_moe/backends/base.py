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
from ..dispatch import DispatchPlan, build_plan


class Backend:
    """A way to run the routed experts: y_TH = Σ_k w[t,k] · GLU_e(x_t) over the kept pairs of ``plan``.

    Subclasses set ``name`` and implement :meth:`routed_mlp`; :meth:`unavailable_reason` returns None when
    the backend can run on that device and dtype, else a sentence saying why not and how to fix it.
    ``activations``: the GLU gate activations it implements (fused kernels: SiLU only).
    """

    name = "base"
    activations = ACTIVATIONS

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
                   capacity: Optional[int] = None, affinity_TK: Optional[torch.Tensor] = None) -> DispatchPlan:
        """The dispatch plan this backend consumes (see :func:`deepseek_moe.dispatch.build_plan`); backends with
        a faster sort override it and must return the same plan."""
        return build_plan(topk_idx_TK, weight_TK, num_experts, capacity, affinity_TK)

    def routed_mlp(self, x_TH: torch.Tensor, plan: DispatchPlan, gate_up_EJH: torch.Tensor,
                   down_EHI: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        """x_TH (T, H), gate_up_EJH (E, 2I, H), down_EHI (E, H, I), all one dtype -> y_TH (T, H), x's dtype.
        ``activation``: one of :attr:`activations`.

        The weighted K-way combine accumulates in fp32; gradients flow to x, both weights and
        ``plan.weight_TK``.
        """
        raise NotImplementedError

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


def glu_weighted(h_NJ: torch.Tensor, w_N: torch.Tensor, out_dtype: torch.dtype,
                 activation: str = "silu") -> torch.Tensor:
    """a = act(gate) · up · w in the accumulation dtype, cast to ``out_dtype``. h_NJ (N, 2I), w_N (N,) -> (N, I)."""
    I = h_NJ.shape[1] // 2
    acc = acc_dtype(h_NJ.dtype)
    gate_NI, up_NI, w_N1 = h_NJ[:, :I].to(acc), h_NJ[:, I:].to(acc), w_N.to(acc).unsqueeze(1)
    if torch.is_grad_enabled() and (h_NJ.requires_grad or w_N.requires_grad):
        return (activate(gate_NI, activation) * up_NI * w_N1).to(out_dtype)
    # No autograd (inside the segment op): one buffer, updated in place.
    return activate(gate_NI, activation).mul_(up_NI).mul_(w_N1).to(out_dtype)


def glu_weighted_backward(h_NJ: torch.Tensor, w_N: Optional[torch.Tensor], grad_a_NI: torch.Tensor,
                          activation: str = "silu") -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Gradients of :func:`glu_weighted`, in the accumulation dtype (see :func:`acc_dtype`).

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


class GLU(torch.autograd.Function):
    """a_TI = act(h_TJ[:, :I]) · h_TJ[:, I:] (h's dtype), for a (T, 2I) gate/up product.

    The gradient of h is built in one (T, 2I) buffer; autograd through ``chunk`` would concatenate the two
    halves, a full extra copy (measured ~2% of a shared-expert layer's forward+backward on CPU).
    """

    @staticmethod
    def forward(ctx, h_TJ: torch.Tensor, activation: str = "silu") -> torch.Tensor:
        ctx.save_for_backward(h_TJ)
        ctx.activation = activation
        I = h_TJ.shape[-1] // 2
        return activate(h_TJ[..., :I], activation) * h_TJ[..., I:]

    @staticmethod
    def backward(ctx, grad_a_TI: torch.Tensor):
        (h_TJ,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            # Traceable form (no out= into slices); the compiler fuses it into one kernel anyway.
            I = h_TJ.shape[-1] // 2
            acc = acc_dtype(h_TJ.dtype)
            g, u, dy = h_TJ[..., :I].to(acc), h_TJ[..., I:].to(acc), grad_a_TI.to(acc)
            grad_h = torch.cat([activate_backward(dy * u, g, ctx.activation), dy * activate(g, ctx.activation)], -1)
            return grad_h.to(h_TJ.dtype), None
        h_2d = h_TJ.reshape(-1, h_TJ.shape[-1])
        grad_h, _, _ = glu_weighted_backward(h_2d, None, grad_a_TI.reshape(-1, grad_a_TI.shape[-1]), ctx.activation)
        return grad_h.to(h_TJ.dtype).view(h_TJ.shape), None
