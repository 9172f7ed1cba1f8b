"""Load balancing state of a layer: the load counters, the last forward's aux loss and drops, the aux-loss-free
bias step (DeepSeek-V3 §2.1.2) and its calibration. One owner for the state that must follow the layer through
moves, meta-device builds, ``to_empty``, deep copies and checkpointed re-runs.

Counters that count each training forward exactly once, whatever re-runs it: activation checkpointing runs a
forward a second time inside backward, and a Python check around the update cannot see that when the layer is
compiled (the graph decides once, at trace time). The update is therefore an opaque custom op
(:func:`count_load`) that asks the autograd engine at run time whether it is inside a backward pass.

Legend: E routed experts, T tokens, K experts per token.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Optional

import torch

from .config import MoEConfig
from .losses import aux_loss_from_routing, all_reduce_load, load_stats, update_bias_
from .router import balancing_bias


@torch.library.custom_op("deepseek_moe::count_load", mutates_args=("total_E",))
def count_load(total_E: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``total_E += counts_E`` unless autograd is recomputing this forward (activation checkpointing); returns a
    copy of ``total_E`` after the update. A recomputed forward gets the total as it is then, which equals the
    original forward's when no other forward ran in between; losses built on the total keep the original value on
    their autograd node (``losses._DotWithConstant``) so that they never depend on that."""
    if torch._C._current_graph_task_id() == -1:
        total_E.add_(counts_E.to(total_E.dtype))
    return total_E.clone()


@count_load.register_fake
def _(total_E: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(total_E)


class LoadState:
    """A layer's per-rank load counters (int64 (E,)) and its last forward's results.

    Plain tensors, not buffers: DDP broadcasts every buffer from rank 0 before each forward, which would replace
    each rank's own counts by rank 0's. The layer's ``_apply`` moves them with :meth:`apply`.

    Attributes:
        tokens_per_expert: pairs each expert processed in the last forward (after capacity dropping).
        load_since_update: the router's load over the training forwards since the last bias step.
        balance_window: ``balance_scope="global_batch"``: the load summed over ranks and micro-batches since then.
        num_dropped: int64 0-dim, pairs dropped in the last forward.
        aux_loss: 0-dim fp32, the last forward's balance losses (graph-connected in training, zero in eval).
    """

    COUNTERS = ("tokens_per_expert", "load_since_update", "balance_window", "num_dropped")

    def __init__(self, num_experts: int):
        E = num_experts
        # On the CPU even inside ``with torch.device("meta")``: a model built on meta and filled by a loader that
        # never calls ``Module._apply`` (transformers' from_pretrained) must not be left with meta counters.
        self.tokens_per_expert = torch.zeros(E, dtype=torch.int64, device="cpu")
        self.load_since_update = torch.zeros(E, dtype=torch.int64, device="cpu")
        self.balance_window = torch.zeros(E, dtype=torch.int64, device="cpu")
        # None stands for zero, read as a fresh zero: an eval forward allocates nothing for them (tens of
        # microseconds of a cold decode step), and no caller holds a tensor that a later forward returns again.
        self._num_dropped: Optional[torch.Tensor] = None
        self._aux_loss: Optional[torch.Tensor] = None
        self.warned_no_grad = False

    @property
    def num_dropped(self) -> torch.Tensor:
        dropped = self._num_dropped
        if dropped is None:
            return torch.zeros((), dtype=torch.int64, device=self.tokens_per_expert.device)
        return dropped

    @num_dropped.setter
    def num_dropped(self, value: Optional[torch.Tensor]) -> None:
        self._num_dropped = value

    @property
    def aux_loss(self) -> torch.Tensor:
        loss = self._aux_loss
        return torch.zeros((), device=self.tokens_per_expert.device) if loss is None else loss

    @aux_loss.setter
    def aux_loss(self, value: Optional[torch.Tensor]) -> None:
        self._aux_loss = value

    # Fresh counters are made outside inference_mode even when asked for inside it: an inference tensor cannot be
    # updated in place (count_load, update_bias) by a later training step.
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Move the counters with ``fn`` (a module's ``_apply``), keeping their values: ``to_empty``'s ``fn``
        returns uninitialised memory, so the values are copied over; counters on the meta device become zeros.
        The last aux_loss is kept, detached, as fp32 on the counters' new device."""
        with torch.inference_mode(False):
            for name in self.COUNTERS:
                t = getattr(self, name)
                src = torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t
                moved = fn(src)
                if moved is not src and not moved.is_meta:
                    moved.copy_(src)
                setattr(self, name, moved)
            device = self.tokens_per_expert.device
            loss = self.aux_loss.detach()
            self.aux_loss = (torch.zeros((), device=device) if loss.is_meta or device.type == "meta"
                             else loss.to(device, torch.float32))

    def on(self, device: torch.device) -> None:
        """Counters left behind on another device (a model loaded straight onto its device by a loader that
        bypasses ``Module._apply``, e.g. transformers' from_pretrained with a device_map) restart as zeros on
        ``device``."""
        for name in self.COUNTERS:
            t = getattr(self, name)
            if t.device != device:
                with torch.inference_mode(False):
                    setattr(self, name, torch.zeros_like(t, device=device))

    def reset(self) -> None:
        """Zero the counters (fresh zeros, not zero_(): counters may be inference tensors, e.g. a
        ``tokens_per_expert`` recorded under inference_mode, which cannot be written outside it)."""
        with torch.inference_mode(False):
            for name in self.COUNTERS:
                setattr(self, name, torch.zeros_like(getattr(self, name)))

    def last_forward(self) -> tuple:
        """The last forward's results (aux_loss, tokens_per_expert, num_dropped), for :meth:`restore_last_forward`."""
        return self.aux_loss, self.tokens_per_expert, self.num_dropped

    def restore_last_forward(self, saved: tuple) -> None:
        self.aux_loss, self.tokens_per_expert, self.num_dropped = saved

    def __deepcopy__(self, memo):
        # The last forward's aux_loss is copied without its autograd graph (deepcopy refuses non-leaf tensors;
        # EMA and best-model snapshots copy mid-training).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value.detach() if key == "_aux_loss" and value is not None else value,
                                              memo)
        return new

    def record(self, cfg: MoEConfig, routing, counts_E: torch.Tensor, routed_counts_E: torch.Tensor,
               num_dropped: Optional[torch.Tensor], training: bool, num_sequences: int,
               seq_T: Optional[torch.Tensor], group: Optional[object]) -> None:
        """Take one forward's load (``counts_E`` int64: the pairs each expert processed, ``routed_counts_E``: those
        the router sent it, before capacity; ``num_dropped`` int64 0-dim, None for none) and, in training, count it
        toward the bias step and compute the aux loss of ``routing`` (see
        :func:`deepseek_moe.losses.aux_loss_from_routing`)."""
        if not training:
            self.record_inference(counts_E, num_dropped)
            return
        self.on(counts_E.device)
        self.tokens_per_expert = counts_E
        self.num_dropped = num_dropped
        count_load(self.load_since_update, routed_counts_E)
        global_counts_E = None
        if cfg.aux_loss_alpha > 0 and cfg.resolved_balance_scope == "global_batch":
            global_counts_E = count_load(self.balance_window, all_reduce_load(routed_counts_E, group))
        self.aux_loss = aux_loss_from_routing(cfg, routing.scores_TE, routing.logits_TE, routing.topk_idx_TK,
                                              num_sequences, seq_T, global_counts_E)
        if (cfg.has_aux_loss and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not self.warned_no_grad):
            self.warned_no_grad = True
            warnings.warn("DeepSeekMoELayer: a training forward ran without autograd (torch.no_grad, or reentrant "
                          "activation checkpointing, which runs the forward without autograd): its aux_loss has no "
                          "gradient, so the balance losses will not train the router. Checkpoint with "
                          "use_reentrant=False, or call layer.eval() for forwards you do not train on.", stacklevel=4)

    def record_inference(self, counts_E: torch.Tensor, num_dropped: Optional[torch.Tensor] = None) -> None:
        """Take an eval forward's load: ``counts_E`` becomes ``tokens_per_expert``; no loss, nothing counted toward
        a bias step."""
        self.tokens_per_expert, self._num_dropped, self._aux_loss = counts_E, num_dropped, None

    def stats(self) -> Dict[str, float]:
        """num_dropped, max_vio and cv of the last forward's load (syncs the device)."""
        if self.tokens_per_expert.is_meta:  # a layer moved to the meta device has no load yet
            self.on(torch.device("cpu"))
        return {"num_dropped": int(self.num_dropped), **load_stats(self.tokens_per_expert)}

    @torch.no_grad()
    def update_bias(self, bias_E: torch.Tensor, speed: float, group: Optional[object]) -> torch.Tensor:
        """b += γ·sign(mean(load) − load) from the load since the last call summed over ``group`` (DeepSeek-V3
        §2.1.2; no step when γ = 0); then reset that load and the balance window. Returns ``bias_E``."""
        self.on(bias_E.device)
        if speed > 0:
            update_bias_(bias_E, all_reduce_load(self.load_since_update, group), speed)
        self.load_since_update.zero_()
        self.balance_window.zero_()
        return bias_E


@torch.no_grad()
def calibrate_bias(router, x: torch.Tensor, padding_T: Optional[torch.Tensor], iterations: int = 200,
                   group: Optional[object] = None, route=None) -> Dict[str, float]:
    """Set ``router.e_score_correction_bias`` so that routing x (..., H) loads the experts as evenly as the bias can
    make it (:func:`deepseek_moe.router.balancing_bias`); only which experts are picked changes, never the gate
    weights (DeepSeek-V3 §2.1.2), and the bias is kept only if it lowers the MaxVio of x.

    ``padding_T``: bool (T,) True at tokens not to count (padding), or None; tokens with non-finite values are not
    counted either. Use several thousand tokens. When torch.distributed is initialised, the loads are summed over
    ``group`` (default: the world): call it on every rank, each with its own tokens, and all get the same bias.
    ``route``: the module whose forward routes (default ``router``; a wrapper of it, e.g. PEFT's LoRA). Costs
    ``iterations`` top-k passes. Returns ``{"max_vio_before": .., "max_vio_after": ..}``. Raises ValueError
    for ``iterations`` < 1.
    """
    x_TH = x.reshape(-1, router.cfg.hidden_size)
    keep_T = torch.isfinite(x_TH).all(dim=-1)
    if padding_T is not None:
        keep_T &= ~padding_T
    scores_TE = (router if route is None else route)(x_TH[keep_T]).scores_TE
    new_bias_E, before, after = balancing_bias(scores_TE, router.e_score_correction_bias, router.cfg, iterations,
                                               group)
    router.e_score_correction_bias.copy_(new_bias_E)
    if bool(new_bias_E.ne(0).any()):
        router.keep_bias_in_checkpoints()
    return {"max_vio_before": before, "max_vio_after": after}
