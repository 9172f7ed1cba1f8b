"""transformers' experts interface, both ways.

(a) ``"deepseek_moe"`` in transformers' ``ExpertsInterface``: a stock model whose experts module carries
``@use_experts_implementation`` (about 70 families in transformers 5.25) runs its routed experts through this
package's grouped kernels with ``model.set_experts_implementation("deepseek_moe")`` or ``from_pretrained(...,
experts_implementation="deepseek_moe")``: no module swap, so stock save/load and stock PEFT stay as they are.
:func:`experts_forward` is that function; it runs exactly what transformers' own ``"eager"`` runs or raises
ValueError at the first forward (biases, transposed or interleaved weights, experts without a gate, a post-expert
norm, a module's own ``_apply_gate`` other than DeepSeek-V4's clamped SwiGLU (which is checked on values at the
first forward; gpt-oss's is another function), an activation the kernels lack).

(b) A converted model's ``experts_implementation`` picks the layers' backend
(:func:`deepseek_moe.backends.for_experts_implementation`).

The function is registered when transformers' ``integrations.moe`` is imported (a post-import hook that
``import deepseek_moe`` installs, :mod:`deepseek_moe.transformers_hook`), or at once if it already is.

Legend: T tokens, K experts per token, E experts, H hidden size, I expert width.
"""
from __future__ import annotations

import math

from typing import Dict, Tuple

import torch

from .. import backends
from ..config import ACTIVATIONS
from ..experts import check_dtype, compute_dtype
from ..glu import gated, glu_name
from ..plan import build_plan

NAME = backends.TRANSFORMERS_NAME

def _refusal(module) -> str:
    """Why ``module`` (a transformers experts module) cannot run here exactly, or ''."""
    flags = {"has_bias": True, "is_transposed": True, "has_post_expert_norm": True, "has_gate": False,
             "is_concatenated": False}
    wrong = [f"{flag}={getattr(module, flag)}" for flag, bad in flags.items() if getattr(module, flag, not bad) == bad]
    if wrong:
        return f"its layout ({', '.join(wrong)}) is not the fused [gate; up] GLU layout the kernels run"
    if _own_gate(module) and not isinstance(getattr(module, "limit", None), (int, float)):
        return f"{type(module).__name__} defines its own _apply_gate (and no clamp limit to check it against)"
    return ""


def _own_gate(module) -> bool:
    from transformers.integrations.moe import _default_apply_gate
    return getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate


def _clamped_name(module, activation: str) -> str:
    """The GLU name of a module with its own ``_apply_gate`` and a ``limit`` (DeepSeek-V4's clamped SwiGLU), once
    its ``_apply_gate`` is seen to compute exactly that on values on both sides of the clamps; ValueError if not
    (gpt-oss's gate, for one, is another function). An infinite limit clamps nothing (transformers' configs take
    no None for it): the plain GLU."""
    limit = float(module.limit)
    name = glu_name(activation, limit) if math.isfinite(limit) else activation
    # Values on both sides of the clamps, and finite: a huge limit is probed below it (no clamp active there).
    scale = 3 * min(limit, 1e3)
    gate_up = torch.randn(64, 2 * 16, generator=torch.Generator().manual_seed(0)) * scale
    with torch.no_grad():
        theirs = module._apply_gate(gate_up)
        ours = gated(gate_up[:, :16], gate_up[:, 16:], name)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-6, atol=1e-7):
        raise ValueError(f"experts_implementation={NAME!r}: {type(module).__name__}._apply_gate is not "
                         f"act(min(gate, limit)) · clamp(up, -limit, limit) with limit={module.limit}, the clamped "
                         f"GLU the kernels run. Use another experts_implementation for it")
    return name


# transformers' hidden_act names whose ACT2FN function is one of ours: how the activation is known inside a
# torch.compile trace, where the value probe of an eager first call cannot run.
_HIDDEN_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
               "gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh", "relu": "relu"}


def _check(module) -> None:
    reason = _refusal(module)
    if reason:
        raise ValueError(f"experts_implementation={NAME!r}: {type(module).__name__} cannot run through "
                         f"deepseek_moe's kernels: {reason}. Use another experts_implementation for it")


def _prepared(module) -> Tuple[str, Dict[tuple, backends.Backend]]:
    """(activation name, selected implementations) of a transformers experts module, checked once."""
    state = module.__dict__.get("_deepseek_moe")
    if state is None:
        from .families import _activation_name
        _check(module)
        try:
            activation = _activation_name(module.act_fn, "hidden_act")
        except ValueError:
            raise ValueError(f"experts_implementation={NAME!r}: {type(module).__name__}'s activation "
                             f"({type(module.act_fn).__name__}) is not one of the kernels' GLU activations "
                             f"{ACTIVATIONS}. Use another experts_implementation for it") from None
        if _own_gate(module):
            activation = _clamped_name(module, activation)
        state = module.__dict__["_deepseek_moe"] = (activation, {})
    return state


def _compiled_activation(module) -> str:
    """The activation inside a torch.compile trace: the eager first call's, or read from ``config.hidden_act``."""
    state = module.__dict__.get("_deepseek_moe")
    if state is not None:
        return state[0]
    _check(module)
    if _own_gate(module):
        raise ValueError(f"experts_implementation={NAME!r} under torch.compile: {type(module).__name__} has its own "
                         f"_apply_gate, which is checked on values; run one forward outside torch.compile first")
    hidden_act = getattr(getattr(module, "config", None), "hidden_act", None)
    if hidden_act not in _HIDDEN_ACT:
        raise ValueError(f"experts_implementation={NAME!r} under torch.compile: hidden_act={hidden_act!r} is "
                         f"not one of {sorted(_HIDDEN_ACT)}; run one forward outside torch.compile first so "
                         f"that the activation is identified from its values")
    return _HIDDEN_ACT[hidden_act]


def experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward through this package: hidden_states (T, H), top_k_index int (T, K),
    top_k_weights (T, K) -> (T, H) in hidden_states' dtype, Σ_k w[t, k] · down_e(act(gate_e x) · up_e x) with
    ``module.gate_up_proj`` (E, 2I, H) and ``module.down_proj`` (E, H, I).

    Under transformers' expert parallelism (``module._is_expert_parallel``) a slot whose expert id is
    ``num_experts`` is not this rank's: it contributes nothing and its weight gets no gradient. Raises ValueError
    for an experts module it cannot run exactly (see the module docstring)."""
    gate_up_EJH, down_EHI = module.gate_up_proj, module.down_proj
    E, H, I = gate_up_EJH.shape[0], gate_up_EJH.shape[2], down_EHI.shape[2]
    # The GEMMs' dtype as transformers' eager computes it: autocast's when on, else the weights' (and then the
    # hidden states must have it: eager's F.linear raises otherwise, so does check_dtype).
    check_dtype(hidden_states, gate_up_EJH)
    dtype = compute_dtype(hidden_states)
    if torch.compiler.is_compiling():  # nothing cached on the module inside a trace
        activation, impls = _compiled_activation(module), {}
    else:
        activation, impls = _prepared(module)
    impl = backends.selected(impls, "auto", hidden_states.device, dtype, activation, (H, I), hidden_states.shape[0])
    topk_idx_TK = top_k_index.long()
    keep_TK = topk_idx_TK < E if getattr(module, "_is_expert_parallel", False) else None
    if keep_TK is not None:
        topk_idx_TK = topk_idx_TK.clamp(max=E - 1)
    plan = build_plan(topk_idx_TK, top_k_weights, E, keep_TK=keep_TK)
    y_TH = impl.run(hidden_states.to(dtype), plan, gate_up_EJH.to(dtype), down_EHI.to(dtype))
    return y_TH.to(hidden_states.dtype)


def register() -> None:
    """Add :func:`experts_forward` to transformers' ``ExpertsInterface`` as ``"deepseek_moe"`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(NAME, experts_forward)
