"""Expert weights: RoutedExperts (fused 3-D tensors, transformers-v5 layout) and SharedExperts (dense GLU).

Legend: T tokens, H hidden size, I expert hidden size, J = 2·I (gate rows, then up rows), E routed experts
(those on this rank), N dispatched rows, Ks shared experts.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _nn_module

from . import invariant
from .backends import Backend
from .config import MoEConfig
from .glu import gated, glu_name
from .plan import DispatchPlan

# Per-expert checkpoint layouts accepted on load: DeepSeek/Qwen names and Mixtral's w1 (gate) / w3 (up) / w2.
_PER_EXPERT_KEY = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def check_dtype(x: torch.Tensor, weight: torch.Tensor) -> None:
    """The package's one dtype rule, nn.Linear's: an expert's input has its parameters' dtype, unless torch.autocast
    chooses the compute dtype. Checked where the weights are used (FSDP2 casts them only then).

    Raises TypeError naming both dtypes."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"DeepSeekMoELayer: x has dtype {x.dtype} and the layer's parameters {weight.dtype}; "
                        f"cast one to the other (layer.to({x.dtype}) or x.to({weight.dtype})) or run under "
                        f"torch.autocast")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in for input x: autocast's when it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class RoutedExperts(nn.Module):
    """E GLU experts (gate activation ``cfg.hidden_act``) stored fused: ``gate_up_proj`` (E, 2I, H) with gate rows
    first, ``down_proj`` (E, H, I).

    ``load_state_dict`` also accepts per-expert keys ``{i}.gate_proj/up_proj/down_proj.weight`` and Mixtral's
    ``{i}.w1/w3/w2.weight`` and fuses them.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, I, H = cfg.num_routed_experts, cfg.expert_hidden_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.first_expert = 0  # experts [first_expert, first_expert + len(gate_up_proj)) live here
        # Expert parallelism: the weights' gradient is scaled by this (1/W: the mean over the ranks' losses).
        self.grad_scale = 1.0
        self.reset_parameters()

    def shard_(self, first: int, count: int, grad_scale: float = 1.0) -> None:
        """Keep only experts [first, first + count) (expert parallelism), their gradients scaled by ``grad_scale``;
        a full checkpoint still loads. Frozen weights (``requires_grad`` False) stay frozen."""
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(self, name)
            setattr(self, name, nn.Parameter(param.detach()[first:first + count].clone(), param.requires_grad))
        self.first_expert = first
        self.grad_scale = grad_scale

    def reset_parameters(self) -> None:
        """Every weight from N(0, initializer_range²). A shard of experts [first, first + local) of E (expert
        parallelism) draws every expert in turn and keeps its own: ranks hold distinct experts (drawing only their
        own gave every rank the same ones), and on the CPU, where an expert's element count is a multiple of 16
        (``normal_`` fills 16 values at a time), exactly those an unsharded layer initialised from the same
        generator state holds, as a layer built on 'meta', sharded and then initialised should."""
        E, local, std = self.cfg.num_routed_experts, self.gate_up_proj.shape[0], self.cfg.initializer_range
        for param in (self.gate_up_proj, self.down_proj):
            if local == E:
                nn.init.normal_(param, std=std)
                continue
            scratch = torch.empty_like(param[0])
            for e in range(E):
                own = self.first_expert <= e < self.first_expert + local
                nn.init.normal_(param[e - self.first_expert] if own else scratch, std=std)

    def forward(self, x_TH: torch.Tensor, plan: DispatchPlan, impl: Backend,
                shared: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """y_TH (T, H) = Σ_k w[t, k] · expert_k(x_t) over the pairs of ``plan``: ``impl.run`` with these weights in
        x's dtype (the compute dtype: the weights' dtype unless autocast chose it, :func:`check_dtype`). The
        weights are read here, so a wrapper that substitutes them (PEFT's LoRA on ``gate_up_proj``/``down_proj``)
        changes what every implementation computes; the one other reader is the layer's fused inference step, only
        for a module :func:`called_plainly` (no wrapper, hook or overriding subclass). ``shared``: the shared
        experts' weights (:meth:`SharedExperts.fusable_weights`) for an implementation that adds them in its pass."""
        check_dtype(x_TH, self.gate_up_proj)
        gate_up_EJH, down_EHI = self.gate_up_proj.to(x_TH.dtype), self.down_proj.to(x_TH.dtype)
        if self.grad_scale != 1.0:
            gate_up_EJH = _ScaleGrad.apply(gate_up_EJH, self.grad_scale)
            down_EHI = _ScaleGrad.apply(down_EHI, self.grad_scale)
        if shared is not None:
            return impl.run(x_TH, plan, gate_up_EJH, down_EHI, shared=shared)
        return impl.run(x_TH, plan, gate_up_EJH, down_EHI)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        per_expert = {}
        names = {}  # our name -> the checkpoint's (gate_proj or w1, ...), for errors in the user's key names
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _PER_EXPERT_KEY.match(key[len(prefix):])
            if m:
                name = _ALIASES.get(m.group(2), m.group(2))
                names[name] = m.group(2)
                per_expert[(int(m.group(1)), name)] = state_dict.pop(key)
        if per_expert:
            E = self.cfg.num_routed_experts
            mixtral = any(n in _ALIASES for n in names.values())
            key_of = {ours: theirs for theirs, ours in _ALIASES.items()} if mixtral else {}
            missing = [f"{prefix}{i}.{key_of.get(name, name)}.weight" for name in ("gate_proj", "up_proj", "down_proj")
                       for i in range(E) if (i, name) not in per_expert]
            if missing:
                # Missing keys in the checkpoint's own names: load_state_dict raises on them (strict) or reports them
                # (strict=False), as for any missing parameter. The experts then keep their current weights.
                missing_keys.extend(missing)
                return
            I, H = self.cfg.expert_hidden_size, self.cfg.hidden_size
            expected = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
            wrong = [f"{prefix}{i}.{key_of.get(name, name)}.weight {tuple(t.shape)}"
                     for (i, name), t in sorted(per_expert.items()) if i < E and tuple(t.shape) != expected[name]]
            if wrong:
                error_msgs.append(f"per-expert checkpoint under {prefix!r}: {', '.join(wrong[:6])}"
                                  f"{' ...' if len(wrong) > 6 else ''} do not have the config's shapes (gate/up "
                                  f"{(I, H)}, down {(H, I)} for hidden_size={H}, expert_hidden_size={I})")
                return
            gate = torch.stack([per_expert.pop((i, "gate_proj")) for i in range(E)])
            up = torch.stack([per_expert.pop((i, "up_proj")) for i in range(E)])
            down = torch.stack([per_expert.pop((i, "down_proj")) for i in range(E)])
            if per_expert:
                extra = sorted({f"{prefix}{i}.{key_of.get(n, n)}.weight" for i, n in per_expert})
                error_msgs.append(f"per-expert checkpoint under {prefix!r} has experts beyond E={E}: "
                                  f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
                return
            state_dict[prefix + "gate_up_proj"] = torch.cat([gate, up], dim=1)
            state_dict[prefix + "down_proj"] = down
        local = self.gate_up_proj.shape[0]
        if local < self.cfg.num_routed_experts:  # a shard: take this rank's experts from a full checkpoint
            for name in ("gate_up_proj", "down_proj"):
                full = state_dict.get(prefix + name)
                if full is not None and full.shape[0] == self.cfg.num_routed_experts:
                    state_dict[prefix + name] = full[self.first_expert:self.first_expert + local]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# The registries of global forward hooks (``register_module_forward_[pre_]hook``): torch.nn.modules.module's private
# dicts, updated in place; a torch without them has none to check (tests/test_cpu_inference_ops.py registers one).
_GLOBAL_FORWARD_HOOKS = tuple(getattr(_nn_module, name) for name in ("_global_forward_pre_hooks",
                                                                      "_global_forward_hooks")
                              if isinstance(getattr(_nn_module, name, None), dict))


def called_plainly(module: nn.Module, cls: type) -> bool:
    """Whether calling ``module`` is calling ``cls.forward`` and nothing else: its class keeps that forward (a
    parametrization's subclass does, a user's override does not), no ``forward`` is set on the instance
    (accelerate's hooks, which bring offloaded weights in, are) and no forward hook runs around it, its own or a
    global one (FSDP2 gathers its parameters in one; ``analysis.routing_statistics`` counts through one). Only then
    may an implementation's fused op stand in for the call."""
    return (type(module).forward is cls.forward and "forward" not in module.__dict__
            and not (module._forward_pre_hooks or module._forward_hooks) and not any(_GLOBAL_FORWARD_HOOKS))


def accelerate_offload_device(module: nn.Module) -> Optional[torch.device]:
    """The execution device of an accelerate hook that offloads ``module``'s weights (``cpu_offload``,
    ``disk_offload``, a ``device_map`` with "cpu" or "disk" entries: the weights sit on 'meta' between calls and the
    hook brings them in for each call), or None where no such hook is attached."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        if getattr(each, "offload", False) and getattr(each, "execution_device", None) is not None:
            return torch.device(each.execution_device)
    return None


def runs_routed_experts_only(module: nn.Module) -> bool:
    """Whether calling ``module`` (a layer's ``experts``) computes :meth:`RoutedExperts.forward` and nothing on top:
    a :class:`RoutedExperts` :func:`called_plainly`, possibly inside PEFT ``ParamWrapper``s without hooks (they
    substitute a weight and run the module). Only then may the shared experts join its output."""
    while not isinstance(module, RoutedExperts):
        if not (hasattr(module, "parameter_name") and hasattr(module, "get_base_layer")
                and called_plainly(module, type(module))):
            return False
        module = module.get_base_layer()
    return called_plainly(module, RoutedExperts)


class InvariantLinear(nn.Linear):
    """A bias-free nn.Linear that computes batch-invariantly under ``torch.use_deterministic_algorithms(True)``
    (:func:`deepseek_moe.invariant.linear`); the shared experts' projections and the shared-expert gate."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariant.linear(x, self.weight) if invariant.enabled() else super().forward(x)


class _Projection(InvariantLinear):
    """An :class:`InvariantLinear` whose weight its owner draws: the constructor consumes no random numbers, so a
    layer's ``reset_parameters`` after ``to_empty`` redraws exactly what its constructor drew under the same seed."""

    def reset_parameters(self) -> None:
        pass


def _invariant(module: nn.Module) -> bool:
    """An :class:`InvariantLinear`, or PEFT's wrapper of one that adds no computation of its own: a ``ParamWrapper``
    (``parameter_name``: it substitutes the weight and runs the module itself), or a LoRA layer whose adapters are
    disabled or merged into the weight."""
    while not isinstance(module, InvariantLinear) and hasattr(module, "get_base_layer") and (
            hasattr(module, "parameter_name") or getattr(module, "disable_adapters", False)
            or getattr(module, "merged", False)):
        module = module.get_base_layer()
    return isinstance(module, InvariantLinear)


def check_invariant_projections(modules, training: bool) -> None:
    """In the deterministic mode's eval, the projections must compute batch-invariantly (:func:`_invariant`): a
    wrapper that adds its own computation (PEFT's ``lora.Linear`` from ``target_modules``: factors run by
    ``nn.Linear``) is outside the batch-invariant arithmetic. Raises RuntimeError naming the remedy (a warning under
    ``warn_only=True``, as PyTorch's mode)."""
    if training or not invariant.enabled():
        return
    wrapped = sorted({type(m).__name__ for m in modules if m is not None and not _invariant(m)})
    if wrapped:
        invariant.refuse(f"DeepSeekMoELayer: under torch.use_deterministic_algorithms(True) outputs are to be "
                         f"batch-invariant, but the shared experts' projections or their gate are wrapped "
                         f"({', '.join(wrapped)}, e.g. by PEFT's target_modules), and what the wrapper adds runs "
                         f"outside the batch-invariant arithmetic. Adapt them by their weights instead "
                         f"(target_parameters=['shared_experts.gate_proj.weight', 'shared_experts.up_proj.weight', "
                         f"'shared_experts.down_proj.weight', 'shared_expert_gate.weight']; 'shared_expert.' in a "
                         f"converted Qwen2-MoE layer) or merge the adapter")


class SharedExperts(nn.Module):
    """The Ks shared experts as one dense GLU MLP of width ``cfg.shared_width`` (Ks·I unless
    ``shared_expert_hidden_size`` says otherwise): ``down(act(gate(x)) * up(x))``, act = ``cfg.hidden_act``.
    :meth:`dense` builds the same MLP from its sizes (a dense FFN)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        width = cfg.shared_width
        self.activation = glu_name(cfg.hidden_act, cfg.swiglu_limit)  # clamped with swiglu_limit (glu.py)
        self.gate_proj = _Projection(cfg.hidden_size, width)
        self.up_proj = _Projection(cfg.hidden_size, width)
        self.down_proj = _Projection(width, cfg.hidden_size)
        self.initializer_range = cfg.initializer_range
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=self.initializer_range)

    @classmethod
    def dense(cls, hidden_size: int, width: int, activation: str = "silu", std: float = 0.02) -> "SharedExperts":
        """A dense GLU FFN (H -> width -> H), weights drawn from N(0, std²): one shared expert of that width."""
        return cls(MoEConfig(hidden_size=hidden_size, expert_hidden_size=width, num_shared_experts=1,
                             hidden_act=activation, initializer_range=std))

    def fusable_weights(self, dtype: torch.dtype) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(gate (Is, H), up (Is, H), down (H, Is)) for an experts implementation that computes these shared
        experts in its own pass (``Backend.fuses_shared``), or None where that would compute another function:
        a projection wrapped or replaced (PEFT's LoRA), a hook on these modules (:func:`called_plainly`), or
        weights not in the compute ``dtype`` (autocast)."""
        if not called_plainly(self, SharedExperts):
            return None
        # The module dicts, not attributes: asked on every inference call, and nn.Module's __getattr__ is reached
        # only after a failed lookup (microseconds each in a cold decode step).
        weights = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            projection = self._modules.get(name)
            plain = type(projection) is _Projection and called_plainly(projection, _Projection)
            weight = projection._parameters.get("weight") if plain else None
            if weight is None or weight.dtype != dtype:
                return None
            weights.append(weight)
        return tuple(weights)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., H), in x's dtype (as transformers' dense MLPs compute it). Raises TypeError when x's
        dtype is not the weights' outside autocast (:func:`check_dtype`)."""
        check_dtype(x_TH, self.gate_proj.weight)
        check_invariant_projections((self.gate_proj, self.up_proj, self.down_proj), self.training)
        # Two GEMMs, not one over concatenated weights: the concatenation copies both weights every call, which
        # measured 1.4-2.7x slower at decode sizes and no faster at T = 4096 (docs/benchmarks.md).
        return self.down_proj(gated(self.gate_proj(x_TH), self.up_proj(x_TH), self.activation,
                                    invariant.enabled()))
