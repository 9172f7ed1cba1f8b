"""Expert specialisation analysis: disable experts at inference, count load and co-activation, and run
DeepSeekMoE's redundancy experiment (arXiv 2401.06066 §4.5 and Fig. 4).

    with dm.analysis.disabled_experts(model, top_fraction=2 / 64):   # each token loses its 2 best experts
        loss = evaluate(model)
    with dm.analysis.disabled_experts(model, shared=True):            # shared experts off
        ...
    stats = dm.analysis.routing_statistics(model, batches)            # per layer: load, co-activation, MaxVio
    curve = dm.analysis.redundancy_curve(model, loss_fn, batches, [0, 1 / 64, 2 / 64, 4 / 64])

Masking changes no weight and no module: within the block each layer carries a
:class:`~deepseek_moe.override.RoutingOverride`, so its router excludes the masked experts from its choice
(the token then picks its top-K among the rest, with their unchanged scores as gate weights), and a layer can skip
its shared experts. Everything is restored on exit, also after an exception. The masks live on the model, so every
thread using it sees them; they are meant for evaluation (in training, the load counters, bias updates and aux
loss see the masked choices); with activation checkpointing, call backward() inside the block too (the
recomputed forward must see the same masks; an eager layer whose re-run sees other masks than its last
training forward raises RuntimeError, a compiled one is not checked). Do not save or deep-copy the model inside
the block.

Legend: T tokens, E routed experts, K experts per token.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .model import inspecting, moe_layers
from .override import RoutingOverride
from .layer import DeepSeekMoELayer
from .padding import attention_mask_padding

Experts = Union[Sequence[int], Mapping[str, Sequence[int]]]


def _layers(model: nn.Module) -> Dict[str, DeepSeekMoELayer]:
    """:func:`deepseek_moe.moe_layers` ("" names a bare layer); ValueError when there is none."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} contains no DeepSeekMoELayer")
    return layers


def _top_fraction_filter(count: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def exclude(scores_TE: torch.Tensor) -> torch.Tensor:
        top_TM = scores_TE.topk(count, dim=-1).indices
        return torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, top_TM, True)
    return exclude


def _fixed_filter(excluded_E: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def exclude(scores_TE: torch.Tensor) -> torch.Tensor:
        return excluded_E.to(scores_TE.device).expand(scores_TE.shape[0], -1)
    return exclude


def _expert_indices(experts, E: int, name: str) -> List[int]:
    """Expert indices from a sequence of ints, an integer tensor/array, or a bool (E,) mask."""
    if isinstance(experts, (str, bytes)):
        raise TypeError(f"disabled_experts: experts of layer {name!r} must be integer indices or a bool mask, "
                        f"not {experts!r}")
    if hasattr(experts, "dtype"):  # a tensor or an array
        experts = torch.as_tensor(experts)
        if experts.dtype == torch.bool:
            if experts.shape != (E,):
                raise ValueError(f"disabled_experts: the bool mask of layer {name!r} has shape "
                                 f"{tuple(experts.shape)}; expected ({E},), one entry per routed expert")
            return experts.nonzero().flatten().tolist()
        if experts.dtype == torch.uint8:  # torch's old mask dtype: indices or a mask?
            raise TypeError(f"disabled_experts: experts of layer {name!r} are uint8, which could mean a mask or "
                            "indices: pass .bool() for a mask or .long() for indices")
        if experts.dtype.is_floating_point or experts.dtype.is_complex:
            raise TypeError(f"disabled_experts: experts of layer {name!r} must be integer indices or a bool mask, "
                            f"not a {experts.dtype} tensor")
        if experts.dim() > 1:
            raise ValueError(f"disabled_experts: the indices of layer {name!r} have shape {tuple(experts.shape)}; "
                             "expected a 1-D list of expert indices")
        return experts.flatten().tolist()
    indices = [i.item() if isinstance(i, torch.Tensor) and i.numel() == 1 and not i.dtype.is_floating_point
               and i.dtype != torch.bool else i for i in experts]  # e.g. list(tensor), [scores.argmax()]
    wrong = [i for i in indices if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if wrong:
        raise TypeError(f"disabled_experts: experts of layer {name!r} must be integer indices or a bool mask; got "
                        f"{wrong[0]!r} ({type(wrong[0]).__name__})")
    return [int(i) for i in indices]


@contextlib.contextmanager
def disabled_experts(model: nn.Module, experts: Optional[Experts] = None, top_fraction: float = 0.0,
                     shared: bool = False) -> Iterator[Dict[str, DeepSeekMoELayer]]:
    """Disable experts of every DeepSeekMoELayer in ``model`` (a model or one layer) inside the ``with`` block.

    Args:
        experts: the routed experts no token may pick, as indices (ints, or an integer tensor/array) or as a bool
            mask of shape (E,): one for every layer, or ``{layer name: indices or mask}`` (names as in
            ``model.named_modules()``; layers not named lose no fixed expert).
        top_fraction: for every layer and token, also exclude the token's ⌊top_fraction · E + ½⌋ best routed
            experts by score + balancing bias (the order its routing uses) and pick the top-K of the rest
            (DeepSeekMoE §4.5: "we mask a certain ratio of experts with the highest routing probability, and then
            select top-K experts from the remaining routed experts").
        shared: run without the shared experts (and the shared-expert gate).

    Gate weights stay the experts' own scores (renormalised over the K picked when ``norm_topk_prob``). Yields
    ``{name: layer}``. Raises TypeError for experts given as anything but integers or a bool mask (floats,
    strings, Python bools); ValueError for unknown layer names, expert indices outside [0, E), a mask not of
    shape (E,), a ``top_fraction`` outside [0, 1), ``shared=True`` when no layer has shared experts, a model
    without DeepSeekMoELayer, and (from the router) when the masks leave a token fewer than K experts;
    RuntimeError when a layer already has a routing override (nested masking contexts, or a copy of a model made
    inside a block).
    """
    layers = _layers(model)
    if isinstance(experts, Mapping):
        unknown = sorted(set(experts) - set(layers))
        if unknown:
            raise ValueError(f"disabled_experts: {unknown[0]!r} is not a DeepSeekMoELayer of the model; its layers are "
                             f"{sorted(layers)}")
        per_layer = {name: experts.get(name, ()) for name in layers}
    else:
        per_layer = {name: () if experts is None else experts for name in layers}
    if not 0.0 <= top_fraction < 1.0:
        raise ValueError(f"disabled_experts: top_fraction={top_fraction} must be in [0, 1)")
    if shared and not any(layer.config.num_shared_experts for layer in layers.values()):
        raise ValueError("disabled_experts: shared=True, but no DeepSeekMoELayer of the model has shared experts")
    filters = {}
    for name, layer in layers.items():
        E = layer.config.num_routed_experts
        per_layer[name] = _expert_indices(per_layer[name], E, name)
        bad = [i for i in per_layer[name] if not 0 <= i < E]
        if bad:
            raise ValueError(f"disabled_experts: expert {bad[0]} of layer {name!r} is outside [0, {E})")
        if layer.routing_override is not None:
            raise RuntimeError(f"disabled_experts: layer {name!r} already has experts disabled (nested contexts, or "
                               "a copy of the model made inside a block, which keeps that block's masks)")
        count = int(top_fraction * E + 0.5)
        if per_layer[name]:
            excluded_E = torch.zeros(E, dtype=torch.bool)
            excluded_E[torch.tensor(per_layer[name], dtype=torch.long)] = True
            fixed = _fixed_filter(excluded_E)
            filters[name] = fixed if count == 0 else (
                lambda s, fixed=fixed, top=_top_fraction_filter(count): fixed(s) | top(s))
        elif count:
            filters[name] = _top_fraction_filter(count)
    try:
        for name, layer in layers.items():
            layer.routing_override = RoutingOverride(filters.get(name), shared=not shared)
        yield layers
    finally:
        for layer in layers.values():
            layer.routing_override = None


@dataclass
class LayerRouting:
    """Routing counts of one layer over some tokens.

    Attributes:
        tokens: number of tokens routed (padding excluded).
        load_E: int64 (E,), tokens that picked each expert (before any capacity dropping).
        coactivation_EE: int64 (E, E), tokens that picked both i and j; the diagonal is ``load_E``.
    """

    tokens: int
    load_E: torch.Tensor
    coactivation_EE: torch.Tensor

    @property
    def share_E(self) -> torch.Tensor:
        """fp64 (E,): each expert's share of the routed pairs (sums to 1; all 0 without tokens)."""
        load = self.load_E.double()
        return load / load.sum().clamp_min(1)

    @property
    def max_vio(self) -> float:
        """MaxVio = max load / mean load − 1 (DeepSeek-V3 §4.5.2); 0 without tokens."""
        load = self.load_E.double()
        return 0.0 if self.tokens == 0 else (load.max() / load.mean() - 1).item()

    @property
    def load_entropy(self) -> float:
        """Entropy of ``share_E`` in bits: log2(E) for an even load, 0 when one expert takes everything."""
        share = self.share_E
        share = share[share > 0]
        return float(-(share * share.log2()).sum()) if share.numel() else 0.0

    @property
    def coactivation_lift_EE(self) -> torch.Tensor:
        """fp64 (E, E): P(i and j picked) / (P(i) · P(j)) per token, 1 where two experts co-occur as often as
        independent picks would; NaN where an expert was never picked. The diagonal is 1 / P(i)."""
        p_E = self.load_E.double() / max(self.tokens, 1)
        joint_EE = self.coactivation_EE.double() / max(self.tokens, 1)
        return joint_EE / torch.outer(p_E, p_E)


@torch.no_grad()
def routing_statistics(model: nn.Module, batches: Iterable, forward: Optional[Callable] = None
                       ) -> Dict[str, LayerRouting]:
    """Per-layer expert load and co-activation over ``batches``, in eval mode without gradient.

    ``forward(model, batch)`` runs one batch (default: ``model(batch)``, or ``model(**batch)`` for a dict, whose
    2-D ``attention_mask`` then marks the padding). The counts come from each router's choice of experts on the
    real tokens (padding excluded, as in training); a compiled model runs eager here, so the counting hooks fire.
    Returns ``{layer name: LayerRouting}``; modes and the layers' per-forward results are restored
    (:func:`inspecting`). Raises ValueError for a model without DeepSeekMoELayer.
    """
    layers = _layers(model)
    stats = {name: LayerRouting(0, torch.zeros(l.config.num_routed_experts, dtype=torch.int64),
                                torch.zeros(l.config.num_routed_experts, l.config.num_routed_experts,
                                            dtype=torch.int64)) for name, l in layers.items()}

    def count(name: str):
        def hook(router, args, routing):
            topk_idx_TK = routing.topk_idx_TK.cpu()
            E = stats[name].load_E.numel()
            picked_TE = torch.zeros(topk_idx_TK.shape[0], E, dtype=torch.float64).scatter_(1, topk_idx_TK, 1.0)
            s = stats[name]
            s.tokens += picked_TE.shape[0]
            s.load_E += picked_TE.sum(0).long()
            s.coactivation_EE += (picked_TE.T @ picked_TE).long()
        return hook

    handles = [layer.gate.register_forward_hook(count(name)) for name, layer in layers.items()]
    with inspecting(model):
        try:
            for batch in batches:
                _run(model, batch, forward)
        finally:
            for handle in handles:
                handle.remove()
    return stats


def _run(model: nn.Module, batch, forward: Optional[Callable]):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Mapping):
        with attention_mask_padding(batch):
            return model(**batch)
    return model(batch)


@torch.no_grad()
def redundancy_curve(model: nn.Module, loss_fn: Callable, batches: Iterable, fractions: Sequence[float],
                     shared: bool = False) -> List[Dict[str, float]]:
    """DeepSeekMoE's redundancy experiment (§4.5, Fig. 4): the loss with each token's top ``f · E`` routed experts
    disabled, for each fraction f in ``fractions`` (0 = the model as it is).

    ``loss_fn(model, batch)`` returns a 0-dim loss tensor (e.g. mean cross-entropy); ``batches`` (any iterable)
    is read once and reused for every fraction. The reported loss is the mean over batches; ``experts_disabled``
    counts them for the layers with the most routed experts. ``shared=True`` also disables
    the shared experts (the paper's other ablation: removing DeepSeekMoE's shared expert raised its Pile loss
    from 1.808 to 2.414). Returns ``[{"fraction": f, "experts_disabled": n, "loss": mean loss}, ...]``; the model
    runs in eval mode (:func:`inspecting`). A higher loss at the same fraction means the top experts held
    knowledge the others cannot replace, i.e. less redundancy among them.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("redundancy_curve: no batches")
    E = {l.config.num_routed_experts for l in _layers(model).values()}
    curve = []
    with inspecting(model):
        for fraction in fractions:
            with disabled_experts(model, top_fraction=fraction, shared=shared):
                losses = [float(loss_fn(model, batch)) for batch in batches]
            curve.append({"fraction": float(fraction), "experts_disabled": int(fraction * max(E) + 0.5),
                          "loss": math.fsum(losses) / len(losses)})
    return curve


def plot_redundancy(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Union[str, os.PathLike],
                    title: str = "Redundancy among routed experts (DeepSeekMoE Fig. 4)") -> str:
    """Plot ``{model label: redundancy_curve(...)}`` (loss against the fraction of top routed experts disabled)
    to ``path``, a PNG written to exactly that path (which is returned), whatever its suffix. Leaves pyplot and
    matplotlib's backend alone. Needs matplotlib (``pip install 'deepseek-moe[bench]'``); raises ImportError
    saying so."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_redundancy needs matplotlib: pip install 'deepseek-moe[bench]'") from err

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, curve in curves.items():
        ax.plot([p["fraction"] for p in curve], [p["loss"] for p in curve], marker="o", label=label)
    ax.set_xlabel("ratio of disabled top routed experts")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return str(path)
