"""The GLU of the package and its gradients, written once: every experts implementation computes its activation
here (or in a fused kernel epilogue tested against :func:`glu`).

a = act(gate) · up (· w), gate and up the two halves of the gate_up projection (gate columns first, as
transformers' fused ``gate_up_proj``); act is named as in transformers (``deepseek_moe.config.ACTIVATIONS``).

A GLU name is that activation name, or ``"<act>@<L>"`` for the clamped GLU of DeepSeek-V4 and gpt-oss
(``swiglu_limit`` L): act(min(gate, L)) · clamp(up, −L, L), whose gradient is zero where a clamp is active
(torch.clamp's convention: it passes at the bound itself). :func:`glu_name` builds one from a config.

Legend: N rows, I expert hidden size, J = 2·I.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import invariant
from .config import ACTIVATIONS


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


def glu_name(activation: str, limit: Optional[float] = None) -> str:
    """The GLU name of ``activation`` clamped at ``limit`` (None: not clamped)."""
    return activation if limit is None else f"{activation}@{float(limit)!r}"


def split_name(name: str) -> Tuple[str, Optional[float]]:
    """(activation, limit or None) of a GLU name."""
    activation, _, limit = name.partition("@")
    return activation, (float(limit) if limit else None)


def _gate(activation: str):
    try:
        return _GLU_GATES[split_name(activation)[0]]
    except KeyError:
        raise ValueError(f"activation={activation!r} is invalid; expected one of {ACTIVATIONS}") from None


def _clamped(gate_NI: torch.Tensor, up_NI: torch.Tensor, limit: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min(gate, L), clamp(up, −L, L)), or both unchanged without a limit."""
    if limit is None:
        return gate_NI, up_NI
    return gate_NI.clamp(max=limit), up_NI.clamp(min=-limit, max=limit)


def gated(gate_NI: torch.Tensor, up_NI: torch.Tensor, name: str, batch_invariant: bool = False) -> torch.Tensor:
    """act(gate) · up for the GLU ``name`` (clamped first when it has a limit), in the inputs' dtype;
    differentiable. The shared experts' GLU; :func:`glu` is the routed experts'."""
    activation, limit = split_name(name)
    gate_NI, up_NI = _clamped(gate_NI, up_NI, limit)
    return activate(gate_NI, activation, batch_invariant) * up_NI


def activate(g: torch.Tensor, activation: str, batch_invariant: bool = False) -> torch.Tensor:
    """The GLU gate activation ``act(g)`` by its transformers name (see ``deepseek_moe.config.ACTIVATIONS``); with
    ``batch_invariant``, from kernels whose bits do not depend on the element's position
    (:func:`deepseek_moe.invariant.activate`)."""
    fn = _gate(activation)[0]
    return invariant.activate(g, split_name(activation)[0]) if batch_invariant else fn(g)


def activate_backward(grad_NI: torch.Tensor, g_NI: torch.Tensor, activation: str,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad · act'(g), through ATen's own backward kernels (into ``out`` when given)."""
    _, op, kwargs = _gate(activation)
    if out is None:
        return op(grad_NI, g_NI, **kwargs)
    return op.grad_input(grad_NI, g_NI, **kwargs, grad_input=out)


def glu(h_NJ: torch.Tensor, activation: str = "silu", w_N: Optional[torch.Tensor] = None,
        batch_invariant: bool = False) -> torch.Tensor:
    """The GLU of the package, a = act(gate) · up (· w), in the accumulation dtype: h_NJ (N, 2I) gate columns
    then up columns, w_N (N,) optional -> (N, I). Every fused kernel is tested against it. ``batch_invariant``:
    see :func:`activate`."""
    I = h_NJ.shape[1] // 2
    acc = acc_dtype(h_NJ.dtype)
    gate_NI, up_NI = h_NJ[:, :I].to(acc), h_NJ[:, I:].to(acc)
    if torch.is_grad_enabled() and (h_NJ.requires_grad or (w_N is not None and w_N.requires_grad)):
        a_NI = gated(gate_NI, up_NI, activation, batch_invariant)
        return a_NI if w_N is None else a_NI * w_N.to(acc).unsqueeze(1)
    # No autograd (inside the segment op, or inference): one buffer, updated in place.
    gate_NI, up_NI = _clamped(gate_NI, up_NI, split_name(activation)[1])
    a_NI = activate(gate_NI, activation, batch_invariant).mul_(up_NI)
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
    limit = split_name(activation)[1]
    if limit is not None:  # where the clamps pass the gradient (bounds included), then the clamped values
        pass_g, pass_u = g_NI <= limit, (u_NI >= -limit) & (u_NI <= limit)
    g_NI, u_NI = _clamped(g_NI, u_NI, limit)
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
    if limit is not None:
        grad_h_NJ[:, :I].mul_(pass_g)
        grad_h_NJ[:, I:].mul_(pass_u)
    return grad_h_NJ, grad_w_N, a_NI
