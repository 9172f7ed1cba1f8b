"""What a forward reads besides its arguments, and the check that a checkpointed re-run reads the same.

:class:`RoutingOverride` is the one hook through which code outside the layer changes its routing for a while
(``deepseek_moe.analysis.disabled_experts`` masks experts and turns shared experts off); the layer reads it from
its ``routing_override`` attribute and passes it to the router. :class:`RouteTape` records the experts a layer
picks and hands back recorded ones (``deepseek_moe.record_routing`` / ``replay_routing``); the layer reads it from
its ``route_tape`` attribute. :class:`RecomputeGuard` makes activation checkpointing safe with both and with a
padding mask set by :func:`deepseek_moe.padding_mask`.

Legend: T tokens, E routed experts, K experts per token, A all positions of the input.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

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


def is_recompute(training: bool) -> bool:
    """Whether this training forward is activation checkpointing's re-run during backward (it runs inside the
    autograd engine's graph task; an original forward never does)."""
    return training and torch._C._current_graph_task_id() != -1


def _fingerprint(x: torch.Tensor) -> torch.Tensor:
    """Three fp64 numbers that tell apart the inputs of a layer's forwards: a checkpointed re-run recomputes its
    original's input, bitwise when the recomputation is deterministic."""
    flat = x.detach().reshape(-1)
    return torch.stack([flat.sum(dtype=torch.float32), flat.abs().sum(dtype=torch.float32),
                        flat[::97].sum(dtype=torch.float32)]).double().cpu()


class RouteTape:
    """One layer's part in :func:`deepseek_moe.record_routing` and :func:`deepseek_moe.replay_routing`.

    ``recorded``: the lists each forward appends its expert ids to, int64 ``x.shape[:-1] + (K,)``, −1 at padding
    (one per enclosing record block, innermost last; empty: not recording). ``replay``: the ids its i-th forward
    uses (None: the layer chooses). A forward takes its ids with :meth:`ids_for` and, only once it has finished,
    counts as a call (:meth:`finish`): a forward that raised uses up nothing.

    Checkpointed re-runs neither record nor count: each takes the ids of the original forward whose input it
    recomputes, found by the input's shape and fingerprint, which must be equal bitwise (a deterministic
    recomputation reproduces it). Re-runs need not come in any order, other forwards may run in between, and one
    checkpointed region may call the layer several times. What cannot be told apart is refused: a re-run matching
    no forward of the block (``closed``: the unfinished forwards of the block that ended, to recognise a re-run
    after it), or matching several forwards with different ids (identical inputs).
    """

    def __init__(self, name: str):
        self.name = name
        self.recorded: List[List[torch.Tensor]] = []
        self.replay: Optional[List[torch.Tensor]] = None
        self.calls = 0
        self._pending: List[tuple] = []  # (call index, input shape, input fingerprint) of training forwards
        self.closed: List[tuple] = []  # (input shape, fingerprint) of the last ended block's unfinished forwards
        # Bookkeeping runs eagerly, one graph break under torch.compile (traced, every new call index would be a
        # recompile). Wrapped here, not at import: torch.compiler.disable imports dynamo.
        self.ids_for = torch.compiler.disable(self._ids_for)
        self.finish = torch.compiler.disable(self._finish)

    @property
    def active(self) -> bool:
        return bool(self.recorded) or self.replay is not None

    @property
    def needed(self) -> bool:
        """Whether the layer must keep the tape: a block is open, or an ended one may still see re-runs."""
        return self.active or bool(self.closed)

    def swap(self, field: str, value: List[torch.Tensor]) -> tuple:
        """Record into the list ``value`` too (``field`` "recorded"; enclosing record blocks keep recording), or
        replay it (``field`` "replay", from call 0). Returns what :meth:`restore` needs to put
        the tape back as it was."""
        saved = (field, getattr(self, field), self.calls, self._pending)
        if field == "recorded":
            self.recorded = self.recorded + [value]
        else:
            self.replay, self.calls, self._pending = value, 0, []
            self.closed = []
        return saved

    def restore(self, saved: tuple) -> None:
        field, value, calls, pending = saved
        setattr(self, field, value)
        if field == "replay":
            self.closed = [(shape, fingerprint) for _, shape, fingerprint in self._pending]
            self.calls, self._pending = calls, pending

    def _ids_for(self, x: torch.Tensor, training: bool) -> Optional[torch.Tensor]:
        """The recorded ids for the forward of x, or None when not replaying. Raises RuntimeError for more forward
        calls than recorded, and for a checkpointed re-run it cannot pair with its original (see the class)."""
        if self.replay is None:
            return None
        if is_recompute(training):
            # Taken off now: a non-reentrant re-run may stop inside this forward (checkpoint's early stop).
            return self.replay[self._pending.pop(self._original_of(x))[0]]
        if self.calls >= len(self.replay):
            raise RuntimeError(f"DeepSeekMoELayer {self.name!r}: forward call {self.calls + 1} inside "
                               f"replay_routing, but routes[{self.name!r}] holds {len(self.replay)} recorded "
                               f"call(s)")
        return self.replay[self.calls]

    def check_late_rerun(self, x: torch.Tensor, training: bool) -> None:
        """Raise RuntimeError when this forward is a re-run, after its replay block ended, of a forward in it."""
        if is_recompute(training):
            fingerprint = _fingerprint(x)
            if any(shape == tuple(x.shape) and torch.equal(fp, fingerprint) for shape, fp in self.closed):
                raise RuntimeError(f"DeepSeekMoELayer {self.name!r}: activation checkpointing re-ran, after its "
                                   f"replay_routing block had ended, a forward that ran inside it; the re-run "
                                   f"would route freely. Call backward() inside the block")

    def _original_of(self, x: torch.Tensor) -> int:
        fingerprint = _fingerprint(x)
        exact = [i for i, (_, shape, fp) in enumerate(self._pending)
                 if shape == tuple(x.shape) and torch.equal(fp, fingerprint)]
        if not exact:
            raise RuntimeError(f"DeepSeekMoELayer {self.name!r}: activation checkpointing re-ran a forward whose "
                               f"input matches no unfinished training forward of this replay_routing block: it ran "
                               f"outside the block, or its recomputation changed the input (e.g. dropout with "
                               f"preserve_rng_state=False, or nondeterministic kernels); the ids cannot be chosen")
        calls = {self._pending[i][0] for i in exact}
        if len({tuple(self.replay[c].reshape(-1).tolist()) for c in calls}) > 1:
            raise RuntimeError(f"DeepSeekMoELayer {self.name!r}: activation checkpointing re-ran a forward whose "
                               f"input equals that of forward calls {sorted(c + 1 for c in calls)} of this "
                               f"replay_routing block, which were given different ids; which ones to use cannot be "
                               f"told. Run each micro-batch's backward before the next identical forward, or do "
                               f"not checkpoint the layer")
        return exact[-1]

    def _finish(self, x: torch.Tensor, ids_AK: Optional[torch.Tensor], training: bool, replayed: bool) -> None:
        """After the forward of x: count it as a replayed call (``replayed``; a re-run forgets its original) and
        record its ids ``ids_AK``."""
        if is_recompute(training):
            return
        if replayed:
            if training:
                self._pending.append((self.calls, tuple(x.shape), _fingerprint(x)))
            self.calls += 1
        for recorded in self.recorded:
            recorded.append(ids_AK.detach())


class RecomputeGuard:
    """Activation checkpointing re-runs a forward during backward. The re-run must see the same padding mask and
    token ids where they came from a ``with`` block (``dm.padding_mask``, ``dm.input_ids``: the block may have
    ended, or another one begun) and the same routing override, or it would silently route differently. Compared
    with the layer's last training forward (the original forward of reentrant checkpointing runs without autograd,
    so a no-grad forward counts too), in eager mode only: a compiled layer is not checked."""

    _BLOCKS = {"mask": ("padding mask", "dm.padding_mask(m)", "padding_mask="),
               "ids": ("token ids", "dm.input_ids(ids)", "input_ids=")}

    def __init__(self):
        self._context: Dict[str, Optional[torch.Tensor]] = {"mask": None, "ids": None}
        self._serial = 0

    def check(self, training: bool, context_mask: Optional[torch.Tensor], context_ids: Optional[torch.Tensor],
              override: Optional[RoutingOverride]) -> None:
        """Raise RuntimeError when this forward is a re-run whose context differs from its original's (replayed
        routing pairs re-runs with their originals itself: :class:`RouteTape`). ``context_mask`` /
        ``context_ids``: the tensors this forward took from an enclosing block (None: none, or given as
        arguments)."""
        if torch.compiler.is_compiling() or not training:
            return
        serial = 0 if override is None else override.serial
        now = {"mask": context_mask, "ids": context_ids}
        if not is_recompute(training):
            self._context, self._serial = now, serial
            return
        for key, original in self._context.items():
            if original is not None and now[key] is not original:  # the same tensor object, not an equal one
                what, block, argument = self._BLOCKS[key]
                where = (f"after the `with {block}` block its forward ran in had ended" if now[key] is None else
                         f"inside another `with {block}` block than the one its forward ran in")
                raise RuntimeError(f"DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                                   f"backward {where}, so the re-run would route by other {what}. Call backward() "
                                   f"inside the same block, or pass {argument} to the layer.")
        if serial != self._serial:
            raise RuntimeError("DeepSeekMoELayer: activation checkpointing re-ran this layer's forward during "
                               "backward with other experts disabled than its last training forward had (a "
                               "`with deepseek_moe.analysis.disabled_experts(...)` block ended or began in "
                               "between), so the re-run could route differently. Call backward() inside the "
                               "block, and run probes between a forward and its backward in eval mode.")
