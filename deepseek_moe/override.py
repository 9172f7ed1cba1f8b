"""What a forward reads besides its arguments, and the check that a checkpointed re-run reads the same.

:class:`RoutingOverride` is the one hook through which code outside the layer changes its routing for a while
(``deepseek_moe.analysis.disabled_experts`` masks experts and turns shared experts off); the layer reads it from
its ``routing_override`` attribute and passes it to the router. :class:`RecomputeGuard` makes activation
checkpointing safe with it and with a padding mask set by :func:`deepseek_moe.padding_mask`.

Legend: T tokens, E routed experts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

# One number per override, never reused: the checkpointing guard compares them (an id() of a freed override can
# come back for the next one).
_SERIALS = itertools.count(1)


@dataclass(frozen=True)
class RoutingOverride:
    """A temporary change to a layer's routing.

    Attributes:
        exclude: (scores + bias)_TE fp32 -> bool (T, E), True where the token may not pick the expert (the token
            then picks its top-K among the rest, with their unchanged scores as gate weights); None: no mask.
        shared: False turns the shared experts off.
        serial: a number no other override has (set on construction).
    """

    exclude: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    shared: bool = True
    serial: int = field(default_factory=lambda: next(_SERIALS))


class RecomputeGuard:
    """Activation checkpointing re-runs a forward during backward. The re-run must see the same padding mask (one
    set by ``dm.padding_mask`` may have ended) and the same routing override, or it would silently route
    differently. Compared with the layer's last training forward (the original forward of reentrant
    checkpointing runs without autograd, so a no-grad forward counts too), in eager mode only: a compiled layer
    is not checked."""

    def __init__(self):
        self._context_mask = False
        self._serial = 0

    def check(self, training: bool, uses_context_mask: bool, has_mask: bool,
              override: Optional[RoutingOverride]) -> None:
        """Raise RuntimeError when this forward is a re-run whose context differs from its original's."""
        if torch.compiler.is_compiling() or not training:
            return
        serial = 0 if override is None else override.serial
        if torch._C._current_graph_task_id() == -1:  # an original forward, not a re-run
            self._context_mask, self._serial = uses_context_mask, serial
        elif not has_mask and self._context_mask:
            raise RuntimeError("DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                               "backward after the `with dm.padding_mask(m)` block had ended, so the re-run would "
                               "route the padding. Call backward() inside the block, or pass padding_mask= to "
                               "the layer.")
        elif serial != self._serial:
            raise RuntimeError("DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                               "backward with other experts disabled than its last training forward had (a "
                               "`with deepseek_moe.analysis.disabled_experts(...)` block ended or began in "
                               "between), so the re-run could route differently. Call backward() inside the "
                               "block, and run probes between a forward and its backward in eval mode.")
