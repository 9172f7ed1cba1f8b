"""Helpers over a whole model: every DeepSeekMoELayer in it, their aux losses, bias steps and statistics.

    loss = task_loss + dm.aux_loss(model)
    optimizer.step(); dm.update_biases(model)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Iterator, List, Mapping, Sequence

import torch
from torch import nn

from .experts import RoutedExperts
from .layer import DeepSeekMoELayer, aux_loss  # noqa: F401 (aux_loss: with the layer, re-exported here)
from .override import RouteTape
from .padding import attention_mask_padding
from .router import Router


def moe_layers(model: nn.Module) -> Dict[str, DeepSeekMoELayer]:
    """{qualified name: layer} of every DeepSeekMoELayer in ``model`` ("" names a bare layer)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DeepSeekMoELayer)}


def update_biases(model: nn.Module) -> None:
    """Aux-loss-free balancing step on every DeepSeekMoELayer (call after ``optimizer.step()``)."""
    for layer in moe_layers(model).values():
        layer.update_bias()


def expert_load(model: nn.Module) -> Dict[str, float]:
    """Per-layer load statistics of the last forward, flat for loggers: ``{"<name>/max_vio": .., "<name>/cv": ..}``."""
    out = {}
    for name, layer in moe_layers(model).items():
        for key, value in layer.last_stats.items():
            out[f"{name}/{key}"] = float(value)
    return out


@contextlib.contextmanager
def _taped(layers: Dict[str, DeepSeekMoELayer], field: str, values: Dict[str, list]) -> Iterator[None]:
    """Set ``field`` ("recorded" or "replay") of each named layer's RouteTape for the block, creating tapes as
    needed (record and replay blocks nest), and put everything back afterwards."""
    previous = {}
    for name, values_of in values.items():
        layer = layers[name]
        tape = layer.route_tape if layer.route_tape is not None else RouteTape(name)
        previous[name] = (layer.route_tape, tape.swap(field, values_of))
        layer.route_tape = tape
    try:
        yield
    finally:
        for name, (old_tape, saved) in previous.items():
            tape = layers[name].route_tape
            tape.restore(saved)
            # old_tape is this tape (blocks nest on one tape) or None (this block made it)
            layers[name].route_tape = tape if old_tape is not None or tape.needed else None


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[Dict[str, List[torch.Tensor]]]:
    """Record the experts every :class:`DeepSeekMoELayer` in ``model`` (a model or a layer) picks, for router
    replay (RL: the rollout's routing forced on the trainer's forward, as Megatron-Core's ``RouterReplay``).

    Yields ``routes``: {qualified layer name ("" for ``model`` itself): [one int64 tensor per forward call,
    shape ``x.shape[:-1] + (top_k,)``, −1 at padded positions]}. Recording changes no output and no gradient;
    activation checkpointing's re-runs are not new calls. Blocks nest (each block's routes get every call made
    inside it, also inside a replay block: the replayed ids). Under torch.compile each layer's call adds a graph
    break. Raises ValueError when ``model`` holds no DeepSeekMoELayer."""
    layers = _layers_of(model, "record_routing")
    routes: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    with _taped(layers, "recorded", routes):
        yield routes


@contextlib.contextmanager
def replay_routing(model: nn.Module, routes: Mapping[str, Sequence[torch.Tensor]]) -> Iterator[None]:
    """Inside the block, the i-th forward call of each layer named in ``routes`` uses ``routes[name][i]`` as its
    expert ids (what :func:`record_routing` yields; layers not named choose as usual).

    The gate weights come from the live router's scores at those ids (normalised and scaled as routing would),
    so the router keeps learning; balance losses, load counters, bias steps and capacity see the replayed ids.
    A checkpointed re-run uses the ids of the forward it re-runs. Raises ValueError for a name no layer of
    ``model`` has or entries that are not tensors, and (from the layer's forward, naming the layer) ValueError
    for ids that do not fit (:func:`deepseek_moe.forced_routing.forced_topk`) and RuntimeError for more forward calls
    than recorded."""
    layers = _layers_of(model, "replay_routing")
    unknown = sorted(set(routes) - set(layers))
    if unknown:
        raise ValueError(f"replay_routing: routes names {unknown}, which no DeepSeekMoELayer of the model has; its "
                         f"layers are {sorted(layers)[:8]}{' ...' if len(layers) > 8 else ''} (record and replay "
                         f"on the same module, e.g. both on the model wrapped by DDP or both unwrapped)")
    replay = {}
    for name, calls in routes.items():
        if isinstance(calls, torch.Tensor):
            raise ValueError(f"replay_routing: routes[{name!r}] must be a sequence of tensors (one per forward call), "
                             f"got a tensor; for one call pass [ids]")
        calls = list(calls)
        if not all(isinstance(ids, torch.Tensor) for ids in calls):
            raise ValueError(f"replay_routing: routes[{name!r}] must be a sequence of tensors (one per forward "
                             f"call), got {[type(ids).__name__ for ids in calls][:4]}")
        replay[name] = calls
    with _taped(layers, "replay", replay):
        yield


def _layers_of(model: nn.Module, caller: str) -> Dict[str, DeepSeekMoELayer]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{caller}: {type(model).__name__} holds no DeepSeekMoELayer")
    return layers


@contextlib.contextmanager
def inspecting(model: nn.Module) -> Iterator[None]:
    """Run ``model`` for inspection inside the block: eagerly (also when compiled) and with every submodule in eval
    mode; afterwards each module's own train/eval flag and each DeepSeekMoELayer's per-forward results
    (``aux_loss``, ``tokens_per_expert``, ``last_stats``) are as they were, so a pending training step is
    unaffected. Training counters (``load_since_update``, the balance window) move only in training forwards."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.load_state.last_forward()) for m in moe_layers(model).values()]
    model.eval()
    try:
        # Eager even for a compiled model: compiled code does not call hooks added after it was compiled.
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        for m, training in modes:
            m.training = training
        for m, results in saved:
            m.load_state.restore_last_forward(results)


def calibrate_routing(model: nn.Module, *args, **kwargs) -> Dict[str, Dict[str, float]]:
    """Run ``model(*args, **kwargs)`` once without gradient, in eval mode, and before each DeepSeekMoELayer runs,
    set its balancing bias so that its own inputs load its experts evenly (:meth:`DeepSeekMoELayer.calibrate_bias`).
    Layers are calibrated in the order they run, so each sees inputs routed by the calibrated layers before it; a
    layer the forward calls more than once is calibrated on its first call.

    Meant for right after ``deepseek_moe.hf.moefy`` with ``init="upcycle"`` (docs/integration.md, "Routing right
    after upcycling"). Padding is not counted: a 2-D ``attention_mask`` keyword becomes the layers' padding mask,
    and a mask set with :func:`deepseek_moe.padding_mask` or passed to a layer is used. With torch.distributed
    initialised, call it on every rank (each with its own batch): loads are summed over the world and every rank
    gets the same bias. Modes and the layers' last-forward results are left as they were (:func:`inspecting`).
    Hash-routed layers (``hash_vocab_size``: DeepSeek-V4's first layers) are left alone: their table picks the
    experts. Returns ``{layer name: {"max_vio_before": .., "max_vio_after": ..}}`` for the layers calibrated.
    Raises ValueError when the model has no DeepSeekMoELayer.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("calibrate_routing: the model has no DeepSeekMoELayer (moefy or replace_moe_blocks first)")
    results: Dict[str, Dict[str, float]] = {}

    def calibrate(name: str):
        def hook(layer, layer_args, layer_kwargs):
            if name in results:
                return
            x = layer_args[0] if layer_args else layer_kwargs["x"]
            mask = layer_args[1] if len(layer_args) > 1 else layer_kwargs.get("padding_mask")
            results[name] = layer.calibrate_bias(x, mask)
        return hook

    handles = [layer.register_forward_pre_hook(calibrate(name), with_kwargs=True) for name, layer in layers.items()
               if layer.config.hash_vocab_size is None]
    try:
        with inspecting(model), torch.no_grad(), attention_mask_padding(kwargs):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return results


def replace_modules(model: nn.Module, match: Callable[[str, nn.Module], bool],
                    make: Callable[[str, nn.Module], nn.Module]) -> List[str]:
    """Replace every submodule whose qualified name and module ``match`` by ``make(name, module)``, in place;
    returns the names replaced."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if match(full, child):
                setattr(parent, child_name, make(full, child))
                replaced.append(full)
    return replaced


def _init_weights_with_moe(self, module: nn.Module) -> None:
    """A transformers model's ``_init_weights``, extended to the converted layers' own modules (set, with ``self``
    bound, on each PreTrainedModel that holds one; transformers' init guards skip weights that were loaded)."""
    if isinstance(module, Router):
        # transformers' guards keep loaded tensors from torch.nn.init's functions; the hash table is written by a
        # copy, so a table the checkpoint filled is kept here.
        module.reset_parameters(hash_table=not getattr(getattr(module, "tid2eid", None), "_is_hf_initialized", False))
    elif isinstance(module, RoutedExperts):
        module.reset_parameters()
    elif isinstance(module, DeepSeekMoELayer):
        module.reset_counters()
    else:
        type(self)._init_weights(self, module)


def adopt_init(model: nn.Module) -> None:
    """Let ``model.init_weights()`` (and transformers' meta-device materialisation) initialise our layers too."""
    for sub in model.modules():
        if hasattr(sub, "_initialize_weights") and hasattr(type(sub), "_init_weights"):
            # A partial, not a bound method: it pickles (a bound method pickles by its name on the instance).
            sub._init_weights = functools.partial(_init_weights_with_moe, sub)
