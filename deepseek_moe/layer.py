"""DeepSeekMoELayer: router + dispatch + routed experts + shared experts, a drop-in for a transformer MLP.

The forward is one pipeline (``_moe``): router → dispatcher.dispatch → experts → dispatcher.combine, plus the shared
experts. The dispatcher (local, or all-to-all after ``deepseek_moe.parallel.shard_experts``) and the experts
implementation (a backend, selected once per device and compute dtype) are objects chosen outside the forward.

Legend: T tokens routed (the real, unpadded ones), H hidden size, E routed experts, K experts per token,
R positions of the real tokens in the flattened input, A all positions of the flattened input (real and padded).
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from . import backends
from .config import MoEConfig
from .dispatch import Dispatched, Dispatcher, DispatchPlan, LocalDispatcher
from .experts import RoutedExperts, SharedExperts
from .counters import count_load
from .losses import aux_loss_from_routing, load_stats, update_bias_, all_reduce_load
from .padding import active_padding_mask, check_padding_mask
from .router import LogitsProbe, Router, Routing, balancing_bias


class DeepSeekMoELayer(nn.Module):
    """Shared experts + fine-grained routed experts (DeepSeekMoE), with DeepSeek-V2/V3 routing.

    Build from a :class:`MoEConfig` or from its fields: ``DeepSeekMoELayer(cfg)`` or
    ``DeepSeekMoELayer(hidden_size=1024, expert_hidden_size=352)``.

    ``forward(x)``: x of shape (..., H) and a floating dtype -> same shape and dtype. After each forward:

    * ``aux_loss``: 0-dim fp32 tensor, the sum of the enabled balance losses and z-loss (graph-connected in
      training; zero in eval). Add it to the task loss, or use ``deepseek_moe.aux_loss(model)``.
    * ``tokens_per_expert``: (E,) int64 pairs each expert processed (after capacity dropping).
    * ``last_stats``: dict with ``num_dropped``, ``max_vio`` and ``cv`` of the routed load (computed on access).

    NaN/inf in x propagate: the rows of affected tokens come out non-finite, other tokens are unaffected
    (routing and experts work row by row). Capacity dropping happens only in training.

    Parameter names follow transformers v5's DeepseekV3MoE (``gate.weight``, ``gate.e_score_correction_bias``,
    ``experts.gate_up_proj``, ``experts.down_proj``, ``shared_experts.{gate,up,down}_proj.weight``).
    """

    def __init__(self, config: Optional[MoEConfig] = None, **fields):
        super().__init__()
        if config is None:
            config = MoEConfig(**fields)
        elif fields:
            config = config.replace(**fields)
        if not isinstance(config, MoEConfig):
            raise TypeError(f"DeepSeekMoELayer: config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = SharedExperts(config) if config.num_shared_experts > 0 else None
        self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                   if config.shared_expert_gate and config.num_shared_experts > 0 else None)
        self.logits_probe = LogitsProbe()
        # False only inside deepseek_moe.analysis.disabled_experts(shared=True): the forward skips the shared path.
        self.shared_enabled = True
        E = config.num_routed_experts
        # Per-rank load counters (int64). Plain tensor attributes, not buffers: DDP broadcasts every buffer from
        # rank 0 before each forward (broadcast_buffers=True, its default), which would replace each rank's own
        # counts by rank 0's. _apply moves them with the module.
        self.tokens_per_expert = torch.zeros(E, dtype=torch.int64)
        # Router load accumulated over the training forwards since the last update_bias().
        self.load_since_update = torch.zeros(E, dtype=torch.int64)
        # balance_scope="global_batch": router load summed over ranks and micro-batches since the last update_bias().
        self.balance_window = torch.zeros(E, dtype=torch.int64)
        self._num_dropped = torch.zeros((), dtype=torch.int64)
        self.aux_loss = torch.zeros(())
        self._warned_no_grad = False
        self._context_mask_in_forward = False
        # Which deepseek_moe.analysis.disabled_experts block is active (0: none; each block a new number, restored
        # on exit), and which one was in the last training forward.
        self.masks_token = 0
        self._masks_in_forward = 0
        # Ranks whose loads make up the global batch (None: the default group, when torch.distributed is up).
        self.balance_group = None
        # How token rows reach the routed experts: all on this device, or (deepseek_moe.parallel.shard_experts) an
        # all-to-all to the ranks that hold them.
        self.dispatcher: Dispatcher = LocalDispatcher(E, config.capacity_factor)
        # Set by deepseek_moe.hf.from_hf: the transformers config of the model the layer came from (its
        # experts_implementation steers backend "auto"; deepseek_moe.hf.to_hf rebuilds the stock block from it).
        self.hf_config = None
        # {(backend name asked for, device, compute dtype): backend}: a backend is selected once per key (selection
        # reads the environment and looks for a prebuilt extension on disk), again after a move (_apply).
        self._backends: Dict[tuple, backends.Backend] = {}

    _COUNTERS = ("tokens_per_expert", "load_since_update", "balance_window", "_num_dropped")

    def _counters_on(self, device: torch.device) -> None:
        """Counters left behind on another device (a model materialised from the meta device by a loader that
        bypasses ``Module._apply``, e.g. transformers' from_pretrained) restart as zeros on ``device``."""
        for name in self._COUNTERS:
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, torch.zeros_like(t, device=device))

    def reset_parameters(self) -> None:
        """Draw every weight afresh as the constructor does (N(0, initializer_range²); the shared-expert gate as
        nn.Linear), zero the selection bias and the counters: with ``to_empty`` it materialises a layer built on
        the meta device."""
        self.gate.reset_parameters()
        self.experts.reset_parameters()
        for module in (self.shared_experts, self.shared_expert_gate):
            if module is not None:
                module.reset_parameters()
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the load counters (tokens_per_expert, the bias-step load, the balance window, drops)."""
        for name in self._COUNTERS:
            # Fresh zeros, not zero_(): after a forward under inference_mode the counters are inference tensors,
            # which cannot be written outside it.
            setattr(self, name, torch.zeros_like(getattr(self, name)))

    def __deepcopy__(self, memo):
        # The default copy, except that the last forward's aux_loss is copied without its autograd graph
        # (deepcopy refuses non-leaf tensors; EMA and best-model snapshots copy mid-training).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_backends":  # selected backends are shared objects of this process, not state to copy
                new.__dict__[key] = {}
                continue
            new.__dict__[key] = copy.deepcopy(value.detach() if key == "aux_loss" else value, memo)
        return new

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._backends = {}
        for name in self._COUNTERS:
            t = getattr(self, name)
            moved = fn(t)
            # A module materialised from the meta device gets zeros, not uninitialised memory.
            setattr(self, name, torch.zeros_like(moved) if t.is_meta else moved)
        return self

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        self._check_tensor(x)
        cfg, H = self.config, self.config.hidden_size
        per_sequence_loss = ((cfg.aux_loss_alpha > 0 and cfg.resolved_balance_scope == "sequence")
                             or cfg.seq_balance_alpha > 0)
        if self.training and per_sequence_loss and x.dim() != 3:
            raise ValueError(f"DeepSeekMoELayer: x has shape {tuple(x.shape)}, but this config's balance loss is "
                             f"computed per sequence (seq_aux / balance_scope='sequence' / seq_balance_alpha) and "
                             f"needs x as (batch, seq, hidden_size); reshape the tokens of one sequence to "
                             f"(1, T, {H})")

    def _check_tensor(self, x: torch.Tensor) -> None:
        H = self.config.hidden_size
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"DeepSeekMoELayer: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"DeepSeekMoELayer: x must have a floating dtype, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != H:
            raise ValueError(f"DeepSeekMoELayer: x has shape {tuple(x.shape)}; its last dimension must be "
                             f"hidden_size={H}")
        if x.device.type == "meta" or self.experts.gate_up_proj.device.type == "meta":
            # Routing decides data-dependent shapes (how many rows each expert gets): there is no meta kernel.
            raise ValueError(f"DeepSeekMoELayer: x is on device {x.device} and the layer's parameters on "
                             f"{self.experts.gate_up_proj.device}; the layer runs on a real device (a layer built "
                             f"on 'meta' needs layer.to_empty(device=...) and layer.reset_parameters() first)")

    def _backend(self, device: torch.device, dtype: torch.dtype) -> backends.Backend:
        cfg = self.config
        name = cfg.backend
        # A layer converted from transformers with backend "auto" follows the model's experts_implementation:
        # "eager" is the reference loop here too; any other name (grouped_mm, batched_mm, ...) means "auto".
        if name == "auto" and getattr(self.hf_config, "_experts_implementation", None) == "eager":
            name = "eager"
        if torch.compiler.is_compiling():
            return backends.from_spec(backends.selected_spec(name, device, dtype, cfg.hidden_act))
        key = (name, device, dtype)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = backends.select(name, device, dtype, cfg.hidden_act)
        return backend

    @property
    def backend(self) -> backends.Backend:
        """The experts backend a forward in the parameters' device and dtype runs (``config.backend`` resolved:
        "auto" becomes the backend it picks, configured for that device and dtype). Raises
        :class:`~deepseek_moe.BackendUnavailable` if none can run."""
        weight = self.experts.gate_up_proj
        return self._backend(weight.device, weight.dtype)

    @property
    def backend_name(self) -> str:
        """``backend.name``: the name of the backend a forward in the parameters' device and dtype runs."""
        return self.backend.name

    @property
    def expert_parallel(self) -> Optional[Dispatcher]:
        """The all-to-all dispatcher after :func:`deepseek_moe.parallel.shard_experts`, else None."""
        return None if isinstance(self.dispatcher, LocalDispatcher) else self.dispatcher

    def route(self, x_TH: torch.Tensor) -> "tuple[Routing, DispatchPlan]":
        """Routing and dispatch plan of x_TH (T, H) (capacity applied in training), without running experts."""
        routing = self.gate(x_TH)
        return routing, self.dispatcher.plan(routing, self._backend(x_TH.device, x_TH.dtype), self.training)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (..., H) -> (..., H), same dtype.

        ``padding_mask``: optional bool tensor of shape ``x.shape[:-1]``, True at padded positions (default: the
        mask of an enclosing :func:`deepseek_moe.padding_mask` block). Padded tokens are removed before routing:
        they count in no balance loss, load, MaxVio, bias update or capacity, the real tokens' outputs equal a
        run on the real tokens alone, and padded positions output exactly 0 (gradient 0). Raises ValueError for a
        mask of the wrong shape, dtype or device.

        Also raises TypeError when x's dtype is not the experts' parameter dtype outside ``torch.autocast``
        (nn.Linear's rule, on the routed and shared paths alike), and ValueError for x of the wrong last dimension,
        for the meta device, and in training for x that is not (batch, seq, H) when a balance loss is computed per
        sequence (``seq_aux`` / ``balance_scope="sequence"``: DeepSeek-V2's per-sequence expert loss;
        ``seq_balance_alpha``: DeepSeek-V3 eq. 17-20).

        With ``router_jitter_noise`` ε > 0, a training forward scales the routed path's input (router and routed
        experts, not the shared experts) by u ~ U(1 − ε, 1 + ε) elementwise, drawn over x's whole shape as
        transformers' Mixtral and DBRX do (same seed, same noise). The router logits of every position, (A, E)
        fp32 (fp64 for fp64 x) with zero rows at padded positions, pass through ``self.logits_probe`` for forward hooks
        (transformers' ``output_router_logits``).
        """
        self._check_input(x)
        cfg = self.config
        H = cfg.hidden_size
        from_context = padding_mask is None
        if from_context:
            padding_mask = active_padding_mask()
        self._check_recompute_context(from_context and padding_mask is not None, padding_mask is not None)
        routed_x = x
        if self.training and cfg.router_jitter_noise > 0:
            eps = cfg.router_jitter_noise
            routed_x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        x_TH, routed_TH = x.reshape(-1, H), routed_x.reshape(-1, H)
        num_sequences = x.shape[0] if x.dim() == 3 else 1
        seq_T = None
        if padding_mask is not None:
            real_R = torch.nonzero(~check_padding_mask(padding_mask, x)).squeeze(1)
            seq_T = torch.div(real_R, x_TH.shape[0] // max(num_sequences, 1), rounding_mode="floor")
            x_TH = x_TH.index_select(0, real_R)
            routed_TH = x_TH if routed_x is x else routed_TH.index_select(0, real_R)
        y_TH, logits_TE = self._moe(x_TH, routed_TH, num_sequences, seq_T)
        if padding_mask is not None:
            A = x.numel() // H
            y_TH = y_TH.new_zeros(A, H).index_copy(0, real_R, y_TH)
            logits_TE = logits_TE.new_zeros(A, logits_TE.shape[1]).index_copy(0, real_R, logits_TE)
        self.logits_probe(logits_TE)
        # A fresh tensor, not a view of y_TH: FSDP2 and autograd hooks expect a module to return its own output.
        return y_TH.reshape(x.shape).clone() if y_TH.shape != x.shape else y_TH

    def _check_recompute_context(self, uses_context: bool, has_mask: bool) -> None:
        """Activation checkpointing re-runs the forward in backward; a mask set by ``dm.padding_mask`` must still be
        set then, or the re-run would route the padding, and the experts disabled by
        ``deepseek_moe.analysis.disabled_experts`` must be the same, or the re-run would route differently: either
        would silently differ from the original forward. Compared with the layer's last training forward (the
        original forward of reentrant checkpointing runs without autograd, so a no-grad forward counts too), in
        eager mode only: a compiled layer is not checked."""
        if torch.compiler.is_compiling() or not self.training:
            return
        if torch._C._current_graph_task_id() == -1:  # an original forward, not a re-run
            self._context_mask_in_forward, self._masks_in_forward = uses_context, self.masks_token
        elif not has_mask and self._context_mask_in_forward:
            raise RuntimeError("DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                               "backward after the `with dm.padding_mask(m)` block had ended, so the re-run would "
                               "route the padding. Call backward() inside the block, or pass padding_mask= to "
                               "the layer.")
        elif self.masks_token != self._masks_in_forward:
            raise RuntimeError("DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                               "backward with other experts disabled than its last training forward had (a "
                               "`with deepseek_moe.analysis.disabled_experts(...)` block ended or began in "
                               "between), so the re-run could route differently. Call backward() inside the "
                               "block, and run probes between a forward and its backward in eval mode.")

    def _moe(self, x_TH: torch.Tensor, routed_TH: torch.Tensor, num_sequences: int,
             seq_T: Optional[torch.Tensor]) -> "tuple[torch.Tensor, torch.Tensor]":
        """router → dispatch → routed experts → combine, plus shared experts, on the real tokens x_TH (T, H);
        the router and routed experts read ``routed_TH`` (x_TH, or x_TH jittered). Returns (y_TH, router logits)."""
        compute_dtype = self._compute_dtype(x_TH)
        experts = self._backend(x_TH.device, compute_dtype)
        routing = self.gate(routed_TH)
        x_in, dispatched = self.dispatcher.dispatch(routed_TH.to(compute_dtype), routing, experts, self.training)
        o = self.experts(x_in, dispatched.experts_plan, experts)
        y_TH = self.dispatcher.combine(o, dispatched, experts)
        if self.shared_experts is not None and self.shared_enabled:
            y_TH = y_TH + self._shared(x_TH)
        self._record(routing, dispatched, num_sequences, seq_T)
        return y_TH.to(x_TH.dtype), routing.logits_TE

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype

    def _shared(self, x_TH: torch.Tensor) -> torch.Tensor:
        shared_TH = self.shared_experts(x_TH)
        if self.shared_expert_gate is not None:
            shared_TH = shared_TH * torch.sigmoid(self.shared_expert_gate(x_TH))
        return shared_TH

    def _record(self, routing: Routing, dispatched: Dispatched, num_sequences: int,
                seq_T: Optional[torch.Tensor]) -> None:
        cfg = self.config
        plan = dispatched.plan
        self._counters_on(plan.counts_E.device)
        self.tokens_per_expert = plan.counts_E.detach()
        if self.training:
            # count_load skips the update when activation checkpointing re-runs this forward (see counters.py).
            count_load(self.load_since_update, plan.routed_counts_E.detach())
            global_counts_E = None
            if cfg.aux_loss_alpha > 0 and cfg.resolved_balance_scope == "global_batch":
                global_counts_E = count_load(self.balance_window,
                                             all_reduce_load(plan.routed_counts_E, self.balance_group))
            self.aux_loss = aux_loss_from_routing(cfg, routing.scores_TE, routing.logits_TE, routing.topk_idx_TK,
                                                  num_sequences, seq_T, global_counts_E)
            if (cfg.has_aux_loss and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                    and not self._warned_no_grad):
                self._warned_no_grad = True
                warnings.warn("DeepSeekMoELayer: a training forward ran without autograd (torch.no_grad, or "
                              "reentrant activation checkpointing, which runs the forward without autograd): its "
                              "aux_loss has no gradient, so the balance losses will not train the router. "
                              "Checkpoint with use_reentrant=False, or call layer.eval() for forwards you do not "
                              "train on.", stacklevel=3)
        else:
            self.aux_loss = torch.zeros((), device=plan.counts_E.device)
        self._num_dropped = dispatched.num_dropped

    @property
    def last_stats(self) -> Dict[str, float]:
        """Load statistics of the last forward: num_dropped, max_vio, cv (computed on access: syncs the device)."""
        return {"num_dropped": int(self._num_dropped), **load_stats(self.tokens_per_expert)}

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_bias(self, group: Optional[object] = None) -> torch.Tensor:
        """Close one optimizer step: the aux-loss-free balancing step b += γ·sign(mean(load) − load) (DeepSeek-V3
        §2.1.2, in fp32) from the router load of the real tokens since the last call, summed over ``group``
        (default: the world) when torch.distributed is initialised; then reset that load and the global-batch
        balance window.

        Call after every ``optimizer.step()`` (``deepseek_moe.hf.update_biases(model)`` does it for a model). The
        bias moves only when ``bias_update_speed`` > 0; with no tokens counted it does not move. Returns the
        bias (E,).
        """
        bias = self.gate.e_score_correction_bias
        self._counters_on(bias.device)
        if self.config.bias_update_speed > 0:
            load = all_reduce_load(self.load_since_update, group)
            update_bias_(bias, load, self.config.bias_update_speed)
        self.load_since_update.zero_()
        self.balance_window.zero_()
        return bias

    @torch.no_grad()
    def calibrate_bias(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, iterations: int = 200,
                       group: Optional[object] = None) -> Dict[str, float]:
        """Set the balancing bias ``gate.e_score_correction_bias`` so that routing ``x`` loads the experts as
        evenly as the bias can make it (:func:`deepseek_moe.router.balancing_bias`), e.g. right after upcycling,
        where a random router sends most tokens to the same experts. Only which experts are picked changes, never
        the gate weights (DeepSeek-V3 §2.1.2); the bias is kept only if it lowers the MaxVio of ``x``.

        x: (..., H) float, inputs of this layer; padded tokens (``padding_mask`` or an enclosing
        :func:`deepseek_moe.padding_mask`, as in :meth:`forward`) and tokens with non-finite values are not counted.
        Use several thousand tokens. When torch.distributed is initialised, the loads are summed over ``group``
        (default: the world, as :meth:`update_bias`): call it on every rank, each with its own tokens, and all get
        the same bias. Costs ``iterations`` top-k passes over the tokens. Touches no training counter. Returns
        ``{"max_vio_before": .., "max_vio_after": ..}``. Raises ValueError for x not floating, of the wrong last
        dimension or on the meta device, a bad mask, and ``iterations`` < 1; TypeError for x not a tensor.
        """
        self._check_tensor(x)
        x_TH = x.reshape(-1, self.config.hidden_size)
        padding_mask = active_padding_mask() if padding_mask is None else padding_mask
        keep_T = torch.isfinite(x_TH).all(dim=-1)
        if padding_mask is not None:
            keep_T &= ~check_padding_mask(padding_mask, x).reshape(-1)
        scores_TE = self.gate(x_TH[keep_T]).scores_TE
        new_bias_E, before, after = balancing_bias(scores_TE, self.gate.e_score_correction_bias, self.config,
                                                   iterations, group)
        self.gate.e_score_correction_bias.copy_(new_bias_E)
        return {"max_vio_before": before, "max_vio_after": after}

    def extra_repr(self) -> str:
        c = self.config
        try:
            backend = repr(self.backend)
        except (backends.BackendUnavailable, ValueError) as err:
            backend = f"{c.backend} (unavailable: {err})"
        return (f"hidden_size={c.hidden_size}, routed={c.num_routed_experts}x{c.expert_hidden_size} top{c.top_k}, "
                f"shared={c.num_shared_experts}, score={c.score_func}, act={c.hidden_act}, backend={backend}")

    def _set_config(self, config: MoEConfig) -> None:
        """Give the layer and its parts one new config (``shard_experts``: num_devices becomes the group size)."""
        self.config = self.gate.cfg = self.experts.cfg = config
        self.dispatcher.capacity_factor = config.capacity_factor

    def __getstate__(self):
        # Selected backends belong to this process (a loaded extension, the environment): select again after loading.
        return {**super().__getstate__(), "_backends": {}}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``aux_loss`` over every :class:`DeepSeekMoELayer` in ``model`` (0-dim tensor)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, DeepSeekMoELayer)]
    if not losses:
        return torch.zeros(())
    return torch.stack([l.to(losses[0].device) for l in losses]).sum()
