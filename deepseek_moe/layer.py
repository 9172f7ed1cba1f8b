"""DeepSeekMoELayer: router -> dispatch -> routed experts -> combine, plus shared experts; a drop-in for an MLP.

The dispatcher (local, or all-to-all after ``deepseek_moe.parallel.shard_experts``) is chosen at construction or
sharding, the experts implementation (``backends.select``) once per (device, compute dtype, with or without a
backward); the load state lives in :class:`~.balancing.LoadState`.
Legend: T tokens routed (the real, unpadded ones), H hidden size, E routed experts, A all positions of the input.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn

from . import backends, invariant
from .balancing import LoadState, calibrate_bias
from .config import MoEConfig
from .dispatch import Dispatcher, DispatchPlan, LocalDispatcher
from .experts import (InvariantLinear, RoutedExperts, SharedExperts, accelerate_offload_device, called_plainly,
                      check_invariant_projections, compute_dtype, runs_routed_experts_only)
from .glu import glu_name
from .override import RecomputeGuard, RouteTape, RoutingOverride
from .padding import active_input_ids, active_padding_mask, check_input, check_padding_mask, pack
from .forced_routing import forced_topk, hashed_topk
from .router import LogitsProbe, Router, Routing
from .stages import stage


class DeepSeekMoELayer(nn.Module):
    """Shared experts + fine-grained routed experts (DeepSeekMoE, arXiv 2401.06066), DeepSeek-V2/V3 routing.

    ``DeepSeekMoELayer(cfg)`` or ``DeepSeekMoELayer(hidden_size=1024, expert_hidden_size=352, ...)``;
    ``forward(x)``: (..., H) float -> same shape and dtype. After each forward: ``aux_loss`` (0-dim fp32, the
    enabled balance losses and z-loss; graph-connected in training, zero in eval), ``tokens_per_expert`` ((E,)
    int64 pairs each expert processed, after capacity dropping), ``last_stats`` (num_dropped, max_vio, cv).

    NaN/inf in x propagate to the affected tokens' rows only. Capacity dropping happens only in training.
    Parameter names follow transformers v5's DeepseekV3MoE (``gate.weight``, ``gate.e_score_correction_bias``,
    ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``); a layer
    converted from a family that names its shared experts otherwise keeps the family's name (Qwen2-MoE:
    ``shared_expert``; :meth:`name_shared_experts`), so module paths, checkpoints and adapters match the stock model.
    """

    shared_experts_name = "shared_experts"  # the child's name in module paths and state-dict keys

    def __init__(self, config: Optional[MoEConfig] = None, **fields):
        super().__init__()
        config = MoEConfig(**fields) if config is None else config.replace(**fields) if fields else config
        if not isinstance(config, MoEConfig):
            raise TypeError(f"DeepSeekMoELayer: config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts > 0 else None
        self.shared_expert_gate = (InvariantLinear(config.hidden_size, 1)
                                   if config.shared_expert_gate and config.num_shared_experts > 0 else None)
        self.logits_probe = LogitsProbe()
        self.load_state = LoadState(config.num_routed_experts)
        self.routing_override: Optional[RoutingOverride] = None  # deepseek_moe.analysis.disabled_experts sets it
        self.route_tape: Optional[RouteTape] = None  # deepseek_moe.record_routing / replay_routing set it
        self.balance_group = None  # ranks whose loads make up the global batch (None: the world)
        self.dispatcher: Dispatcher = LocalDispatcher(config.num_routed_experts, config.capacity_factor)
        # Set by deepseek_moe.hf.from_hf: the model's transformers config, and whether the stock block's experts
        # took transformers' experts_implementation (then its value picks the backend under backend="auto").
        self.hf_config = None
        self.follows_experts_implementation = False
        self._guard = RecomputeGuard()
        self._impls: Dict[tuple, backends.Backend] = {}  # selected implementations (this process's), per key

    @property
    def shared_experts(self) -> Optional[nn.Module]:
        """The shared experts (a :class:`SharedExperts`, a wrapper of it, or None), registered under
        :attr:`shared_experts_name`."""
        return self._modules.get(self.shared_experts_name)

    @shared_experts.setter
    def shared_experts(self, module: Optional[nn.Module]) -> None:
        # Reached for None while no child has the name yet (the constructor); __setattr__ sends the rest there.
        self._modules[self.shared_experts_name] = module

    def __setattr__(self, name: str, value) -> None:
        # ``layer.shared_experts = wrapper`` replaces the child under its registered name: nn.Module.__setattr__
        # would register a module value as a second child named ``shared_experts`` that the forward never calls.
        if name == "shared_experts" and self.shared_experts_name in self.__dict__.get("_modules", ()):
            name = self.shared_experts_name
        super().__setattr__(name, value)

    def name_shared_experts(self, name: str) -> None:
        """Register the shared experts under ``name`` (a stock block's, e.g. Qwen2-MoE's ``shared_expert``), in the
        same place among the children: module paths, ``state_dict`` keys and PEFT's adapter keys then read as in the
        stock model. Raises TypeError for a name that is not a str, ValueError for one that is not a Python
        identifier or that another child or attribute of the layer already has."""
        if not isinstance(name, str):
            raise TypeError(f"name_shared_experts: the name must be a str, got {type(name).__name__}")
        if name == self.shared_experts_name:
            return
        if not name.isidentifier():
            raise ValueError(f"name_shared_experts: {name!r} is not a Python identifier (module paths are dotted)")
        if name in self._modules or name in self.__dict__ or (
                name != type(self).shared_experts_name and hasattr(type(self), name)):
            raise ValueError(f"name_shared_experts: {name!r} is already an attribute of the layer")
        old = self.shared_experts_name
        self._modules = {(name if key == old else key): module for key, module in self._modules.items()}
        self.shared_experts_name = name

    aux_loss = property(lambda self: self.load_state.aux_loss)
    tokens_per_expert = property(lambda self: self.load_state.tokens_per_expert)
    load_since_update = property(lambda self: self.load_state.load_since_update)
    balance_window = property(lambda self: self.load_state.balance_window)
    last_stats = property(lambda self: self.load_state.stats(), doc="num_dropped, max_vio, cv of the last forward")

    def reset_parameters(self) -> None:
        """Draw every weight afresh as the constructor does, zero the selection bias and the counters: with
        ``to_empty`` it materialises a layer built on the meta device."""
        for module in (self.gate, self.experts, self.shared_experts, self.shared_expert_gate):
            if module is not None:
                module.reset_parameters()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the load counters (tokens_per_expert, the bias-step load, the balance window, drops)."""
        self.load_state.reset()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._impls = {}
        self.load_state.apply(fn)
        return self

    def __getstate__(self):
        # Pickling and deepcopy: implementations are selected again in the new process; a copy made inside a
        # record or replay block takes no part in it (the block belongs to the original).
        return {**super().__getstate__(), "_impls": {}, "route_tape": None}

    def use_dispatcher(self, dispatcher: Dispatcher, config: MoEConfig) -> None:
        """Run the routed experts through ``dispatcher`` with ``config`` (``shard_experts``)."""
        self.config = self.router.cfg = self.routed_experts.cfg = config
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                topk_idx: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., H) -> (..., H), same dtype.

        ``padding_mask``: bool ``x.shape[:-1]``, True at padded positions (default: an enclosing
        :func:`deepseek_moe.padding_mask`). Padded tokens are removed before routing: they count in no loss, load
        or capacity, and output exactly 0. The router logits of every position, (A, E) fp32 with zero rows at
        padding, pass through ``self.logits_probe`` for hooks (transformers' ``output_router_logits``). With
        ``router_jitter_noise`` ε, a training forward scales the router's and routed experts' input by
        u ~ U(1 − ε, 1 + ε) drawn over x's shape (transformers' Mixtral and DBRX).

        ``topk_idx``: integer ``x.shape[:-1] + (top_k,)``, −1 at padding: use these experts instead of choosing
        (router replay; default: the ids of an enclosing :func:`deepseek_moe.replay_routing`). The gate weights are
        the live router's scores gathered there, normalised and scaled as routing would (the selection bias never
        enters them), so the router still learns; losses, load counters, bias steps and capacity see these ids.
        Checked by :func:`deepseek_moe.forced_routing.forced_topk` (ValueError naming the position).

        ``input_ids``: integer ``x.shape[:-1]``, the token ids a hash-routed layer (``hash_vocab_size`` set;
        DeepSeek-V4's first MoE layers) routes by: experts ``gate.tid2eid[input_ids]``, weighted like replayed ids
        (default: an enclosing :func:`deepseek_moe.input_ids`; ignored by top-k layers; replayed ids win).
        Checked by :func:`deepseek_moe.forced_routing.hashed_topk`.

        Raises TypeError for x not a tensor or of another dtype than the experts outside autocast; ValueError for
        x not floating, of the wrong last dimension, on the meta device, a bad mask, and in training x not (B, S,
        H) when a balance loss is per sequence (``seq_aux``, ``balance_scope="sequence"``, ``seq_balance_alpha``).
        """
        if not (self.training or padding_mask is not None or topk_idx is not None or input_ids is not None
                or torch.is_grad_enabled()):
            y = self._inference_step(x)
            if y is not None:
                return y
        check_input(x, self.config, self.training, self._device())
        from_context = padding_mask is None
        padding_mask = active_padding_mask() if from_context else padding_mask
        override, tape = self.routing_override, self.route_tape
        replaying = tape is not None and tape.replay is not None and topk_idx is None
        if replaying:
            topk_idx = tape.ids_for(x, self.training)
        elif tape is not None and tape.closed and not torch.compiler.is_compiling():
            tape.check_late_rerun(x, self.training)  # eager only, as the RecomputeGuard
        hashed = self.config.hash_vocab_size is not None and topk_idx is None
        if hashed and input_ids is None:
            input_ids = context_ids = active_input_ids()
        else:
            context_ids = None
        self._guard.check(self.training, padding_mask if from_context else None, context_ids, override)
        x_TH, seq_T, unpack = pack(x, padding_mask)
        routed_TH = x_TH
        if self.training and self.config.router_jitter_noise > 0:
            eps = self.config.router_jitter_noise
            routed_TH = pack(x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps), padding_mask)[0]
        forced_TK = None
        if topk_idx is not None or self.config.hash_vocab_size is not None:
            padding_A = None if padding_mask is None else check_padding_mask(padding_mask, x)
            who = "DeepSeekMoELayer" if tape is None else f"DeepSeekMoELayer {tape.name!r}"
            if topk_idx is not None:
                forced_TK = forced_topk(topk_idx, x, padding_A, self.config, who)
            else:
                forced_TK = hashed_topk(self.router.tid2eid, input_ids, x, padding_A, self.config, who)
        dtype = compute_dtype(x_TH)
        impl = self._implementation(x_TH.device, dtype, x_TH.shape[0])
        shared = self._fused_shared(impl, dtype, override)
        with stage("router"):
            if self.gate is self.router and not torch.is_grad_enabled():  # the implementation's choice, if faster
                routing = self.gate(routed_TH, override, forced_TK, impl.selector(self.config), impl.router_gemm())
            else:
                routing = self.gate(routed_TH, override, forced_TK)
        y_TH, dispatched = self.dispatcher(routed_TH.to(dtype), routing,
                                           lambda x_in, plan: self.experts(x_in, plan, impl, shared), impl,
                                           self.training)
        if shared is None and self.shared_experts is not None and (override is None or override.shared):
            y_TH = y_TH + self._shared_output(x_TH)
        self.load_state.record(self.config, routing, dispatched.processed_counts_E, dispatched.plan.routed_counts_E,
                               dispatched.num_dropped, self.training, x.shape[0] if x.dim() == 3 else 1, seq_T,
                               self.balance_group)
        self.logits_probe(unpack(routing.logits_TE))
        if tape is not None and tape.active:
            recorded = (unpack(routing.topk_idx_TK + 1) - 1).view(*x.shape[:-1], self.config.top_k) \
                if tape.recorded else None
            tape.finish(x, recorded, self.training, replaying)
        y_AH = unpack(y_TH if y_TH.dtype == x.dtype else y_TH.to(x.dtype))
        # A fresh tensor, not a view: FSDP2 and autograd hooks expect a module to return its own output.
        return y_AH.reshape(x.shape).clone() if y_AH.shape != x.shape else y_AH

    def _inference_step(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole layer's output for x (..., H) from the implementation's one op (:meth:`Backend.fused_step`:
        gate GEMM, choice, plan, routed experts, shared experts where they fuse, combine) where the pipeline would
        compute exactly that: the caller's eval forward without autograd and without mask or ids arguments; here
        no routing override, no padding block, no replay, local dispatch, no autocast, x in the experts'
        dtype and on the device of the router and the experts, the router and experts called plainly (no PEFT
        wrapper, no subclass or instance forward, no hook: :func:`~deepseek_moe.experts.called_plainly`). Else
        None: the pipeline runs stage by stage. Routing stays visible: the logits probe's hooks,
        ``tokens_per_expert`` and a :func:`deepseek_moe.record_routing` block see what the pipeline would show them.

        This is a decode step's whole Python (a cold decode step pays several times a hot step's cost for every
        line and attribute read after its weights streamed through the caches), so it reads children and
        parameters from the module dicts: ``nn.Module.__getattr__`` is reached only after a failed lookup."""
        cfg, tape, modules = self.config, self.route_tape, self._modules
        if (self.routing_override is not None or cfg.hash_vocab_size is not None or active_padding_mask() is not None
                or (tape is not None and tape.replay is not None)
                or type(self.dispatcher) is not LocalDispatcher or not isinstance(x, torch.Tensor)):
            return None
        router, experts = modules["gate"], modules["experts"]
        if not (called_plainly(router, Router) and called_plainly(experts, RoutedExperts)):
            return None
        gate_up_EJH, down_EHI = experts._parameters.get("gate_up_proj"), experts._parameters.get("down_proj")
        weight_EH, bias_E = router._parameters.get("weight"), router._buffers.get("e_score_correction_bias")
        if gate_up_EJH is None or down_EHI is None or weight_EH is None or bias_E is None:  # e.g. parametrized
            return None
        # Elsewhere the pipeline raises, or says which weight is on another device (offloaded, meta).
        device, dtype = x.device, x.dtype
        if (dtype != gate_up_EJH.dtype or dtype != down_EHI.dtype or x.dim() < 1 or x.shape[-1] != cfg.hidden_size
                or device != weight_EH.device or device != bias_E.device or device != gate_up_EJH.device
                or device != down_EHI.device or x.is_meta or torch.is_autocast_enabled(device.type)):
            return None
        impl = self._implementation(device, dtype, x.numel() // cfg.hidden_size)
        step = impl.fused_step(cfg)
        if step is None:
            return None
        shared_experts = modules.get(self.shared_experts_name)
        shared = _fusable_shared(shared_experts, modules.get("shared_expert_gate"), impl, dtype)
        with stage("experts"):
            out = step(x, weight_EH, bias_E, gate_up_EJH, down_EHI, shared)
        if out is None:
            return None
        y, logits_AE, _, topk_idx_AK, _, counts_E = out
        if shared is None and shared_experts is not None:
            y = y + self._shared_output(x)
        self.load_state.record_inference(counts_E)
        probe = modules["logits_probe"]
        if not called_plainly(probe, LogitsProbe):  # hooks observe the logits
            probe(logits_AE)
        if tape is not None and tape.active:
            tape.finish(x, topk_idx_AK.view(*x.shape[:-1], cfg.top_k) if tape.recorded else None, False, False)
        return y

    def _shared_output(self, x_TH: torch.Tensor) -> torch.Tensor:
        """The shared experts' output for x_TH, scaled by the shared expert gate where there is one."""
        with stage("shared_experts"):
            shared_TH, gate = self.shared_experts(x_TH), self.shared_expert_gate
            if gate is not None:
                check_invariant_projections((gate,), self.training)
                sigmoid = invariant.sigmoid if invariant.enabled() else torch.sigmoid
                shared_TH = shared_TH * sigmoid(gate(x_TH))
        return shared_TH

    def _fused_shared(self, impl: backends.Backend, dtype: torch.dtype, override) -> Optional[tuple]:
        """The shared experts' weights when ``impl`` computes them in its pass over the routed experts: the experts
        see this layer's own tokens (local dispatch, no router jitter: that scales the routed experts' input only),
        no gate scales the shared output, they are not disabled, their projections are plain
        (:meth:`SharedExperts.fusable_weights`), the routed experts' call adds nothing to their output that the
        shared experts' would then share (:func:`~deepseek_moe.experts.runs_routed_experts_only`) and ``impl``
        takes them (:meth:`Backend.fuses_shared`)."""
        jitter = self.training and self.config.router_jitter_noise > 0
        if not (self.shared_experts is not None and not jitter and (override is None or override.shared)
                and isinstance(self.dispatcher, LocalDispatcher) and runs_routed_experts_only(self.experts)):
            return None
        return _fusable_shared(self.shared_experts, self.shared_expert_gate, impl, dtype)

    def _implementation(self, device: torch.device, dtype: torch.dtype,
                        tokens: Optional[int] = None) -> backends.Backend:
        """The experts implementation for (device, dtype, grad mode, whether ``tokens`` is a decode step), selected
        once per key (selection reads the environment and the filesystem); under torch.compile a trace-time
        constant."""
        cfg = self.config
        name = cfg.backend
        if self.follows_experts_implementation:
            name = backends.for_experts_implementation(getattr(self.hf_config, "_experts_implementation", None),
                                                       cfg.backend)
        return backends.selected(self._impls, name, device, dtype, glu_name(cfg.hidden_act, cfg.swiglu_limit),
                                 (cfg.hidden_size, cfg.expert_hidden_size), tokens)

    def __deepcopy__(self, memo):
        """A deep copy (an EMA or best-model snapshot) sharing ``balance_group``: a process group is a communicator,
        not state, and cannot be copied (the expert-parallel dispatcher shares its group likewise)."""
        if self.balance_group is not None:
            memo[id(self.balance_group)] = self.balance_group
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def _device(self) -> torch.device:
        """The device the layer computes on: its router weight's, or for weights that accelerate offloads (on
        'meta' between calls, brought in by its hooks when the modules are called) that hook's execution device."""
        weight = self.router.weight
        if weight.device.type == "meta":
            for module in (self.gate, self.router):
                device = accelerate_offload_device(module)
                if device is not None:
                    return device
        return weight.device

    @property
    def router(self) -> Router:
        """The :class:`~deepseek_moe.router.Router`, also where ``gate`` is a wrapper around it (PEFT's LoRA on
        ``gate.weight`` wraps the module; wrappers nest through ``get_base_layer()``, PEFT's API). ``gate`` is
        what the forward calls; this is where the bias and the config live."""
        return _unwrapped(self.gate, Router)

    @property
    def routed_experts(self) -> RoutedExperts:
        """The :class:`~deepseek_moe.experts.RoutedExperts`, also under PEFT's wrappers (see :attr:`router`)."""
        return _unwrapped(self.experts, RoutedExperts)

    @property
    def backend(self) -> backends.Backend:
        """The experts implementation a forward (with a backward) in the experts' device and dtype runs. Raises
        :class:`~deepseek_moe.BackendUnavailable` if none can run."""
        weight = next(self.experts.parameters())
        with torch.enable_grad():
            return self._implementation(weight.device, weight.dtype)

    backend_name = property(lambda self: self.backend.name, doc="``backend.name``")

    @property
    def expert_parallel(self) -> Optional[Dispatcher]:
        """The all-to-all dispatcher after :func:`deepseek_moe.parallel.shard_experts`, else None."""
        return None if isinstance(self.dispatcher, LocalDispatcher) else self.dispatcher

    def route(self, x_TH: torch.Tensor) -> "tuple[Routing, DispatchPlan]":
        """Routing and dispatch plan of x_TH (T, H) (capacity applied in training), without running experts."""
        routing = self.gate(x_TH, self.routing_override)
        return routing, self.dispatcher.plan(routing, self._implementation(x_TH.device, x_TH.dtype), self.training)

    @torch.no_grad()
    def update_bias(self, group: Optional[object] = None) -> torch.Tensor:
        """Close one optimizer step: b += γ·sign(mean(load) − load) (DeepSeek-V3 §2.1.2, fp32) from the router load
        of the real tokens since the last call, summed over ``group`` (default: the world) when torch.distributed
        is initialised; then reset that load and the global-batch window. Call after every ``optimizer.step()``
        (``dm.update_biases(model)`` for a model). Moves only when ``bias_update_speed`` > 0, and never in a
        hash-routed layer (its table picks the experts; a bias could not change the choice). Returns the bias."""
        speed = 0.0 if self.config.hash_vocab_size is not None else self.config.bias_update_speed
        return self.load_state.update_bias(self.router.e_score_correction_bias, speed, group)

    @torch.no_grad()
    def calibrate_bias(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, iterations: int = 200,
                       group: Optional[object] = None) -> Dict[str, float]:
        """Set ``gate.e_score_correction_bias`` so that routing x (..., H) loads the experts as evenly as a bias can
        (:func:`deepseek_moe.balancing.calibrate_bias`), e.g. right after upcycling. Padded (``padding_mask`` or
        :func:`deepseek_moe.padding_mask`) and non-finite tokens are not counted. Returns ``{"max_vio_before",
        "max_vio_after"}``. Raises as :meth:`forward` for x, ValueError for ``iterations`` < 1 and for a
        hash-routed layer (its table picks the experts: no bias changes its load)."""
        if self.config.hash_vocab_size is not None:
            raise ValueError("DeepSeekMoELayer.calibrate_bias: the layer is hash-routed (hash_vocab_size="
                             f"{self.config.hash_vocab_size}): its table picks the experts, no bias changes its load")
        check_input(x, self.config, False, self._device())
        mask = active_padding_mask() if padding_mask is None else padding_mask
        return calibrate_bias(self.router, x, None if mask is None else check_padding_mask(mask, x), iterations, group,
                              route=self.gate)

    def extra_repr(self) -> str:
        c = self.config
        try:
            backend = repr(self.backend)
        except (backends.BackendUnavailable, ValueError) as err:
            backend = f"{c.backend} (unavailable: {err})"
        return (f"hidden_size={c.hidden_size}, routed={c.num_routed_experts}x{c.expert_hidden_size} top{c.top_k}, "
                f"shared={c.num_shared_experts}, score={c.score_func}, act={c.hidden_act}, backend={backend}")


def _fusable_shared(shared_experts: Optional[SharedExperts], shared_expert_gate: Optional[nn.Module],
                    impl: backends.Backend, dtype: torch.dtype) -> Optional[tuple]:
    """The shared experts' weights for ``impl`` to compute in its pass (:meth:`Backend.fuses_shared`), or None: no
    shared experts, a gate scaling their output, a module in their place that is not a :class:`SharedExperts` (a
    user's wrapper, PEFT's ``modules_to_save``), projections that are not plain
    (:meth:`SharedExperts.fusable_weights`)."""
    if not isinstance(shared_experts, SharedExperts) or shared_expert_gate is not None:
        return None
    weights = shared_experts.fusable_weights(dtype)
    return weights if weights is not None and impl.fuses_shared(weights) else None


def _unwrapped(module: nn.Module, cls: type) -> nn.Module:
    while not isinstance(module, cls) and hasattr(module, "get_base_layer"):
        module = module.get_base_layer()
    if not isinstance(module, cls):
        raise TypeError(f"DeepSeekMoELayer: expected a {cls.__name__} (or a PEFT wrapper of one), found "
                        f"{type(module).__name__}")
    return module


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over every :class:`DeepSeekMoELayer` in ``model`` (0-dim tensor)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, DeepSeekMoELayer)]
    return torch.stack([loss.to(losses[0].device) for loss in losses]).sum() if losses else torch.zeros(())
