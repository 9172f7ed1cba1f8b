"""Dense MLPs -> DeepSeekMoE layers: recognise gated and plain MLPs, upcycle one into a layer, replace them in a model.

Works on any nn.Module (a transformers model or your own); transformers is not needed.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layer import DeepSeekMoELayer
from .model import adopt_init, replace_modules


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama/Mistral/Qwen2-style MLP: ``gate_proj``, ``up_proj``, ``down_proj`` linear layers."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def is_plain_mlp(module: nn.Module) -> bool:
    """A GPT-2/BERT-style non-gated MLP (``c_fc``/``c_proj`` or ``fc1``/``fc2``)."""
    names = {n for n, _ in module.named_children()}
    return {"c_fc", "c_proj"} <= names or {"fc1", "fc2"} <= names


def _mlp_sizes(module: nn.Module) -> Tuple[int, int]:
    """(H, F) of a gated or plain MLP."""
    if is_gated_mlp(module):
        return module.gate_proj.in_features, module.gate_proj.out_features
    first = getattr(module, "c_fc", None) or getattr(module, "fc1")
    weight = first.weight
    # transformers' GPT-2 Conv1D stores (in, out); nn.Linear stores (out, in).
    if isinstance(first, nn.Linear):
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]


def _is_silu(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    if act is None:
        return False
    if isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"):
        return True
    probe = torch.linspace(-4, 4, 17)
    try:
        return torch.allclose(act(probe), F.silu(probe))
    except Exception:
        return False


def upcycle_(layer: DeepSeekMoELayer, mlp: nn.Module) -> None:
    """Function-preserving init of ``layer`` from a dense gated SiLU MLP (in place).

    The shared experts take the dense FFN's weights exactly (shared width = F); every routed expert starts
    with random gate/up projections and a **zero** down projection, so the routed output is exactly zero and
    layer(x) = mlp(x). Training then grows the routed experts from zero: the down projections get gradient at
    once, the gate/up projections and the router as soon as the down projections move.
    """
    cfg = layer.config
    if layer.shared_experts is None or cfg.shared_width != mlp.gate_proj.out_features:
        raise ValueError(f"upcycle: the layer's shared width {cfg.shared_width} must equal the dense width "
                         f"{mlp.gate_proj.out_features}")
    if layer.shared_expert_gate is not None:
        raise ValueError("upcycle: a gated shared expert (shared_expert_gate=True) would scale the dense FFN by "
                         "sigmoid(·) and break function preservation")
    with torch.no_grad():
        shared = layer.shared_experts
        shared.gate_proj.weight.copy_(mlp.gate_proj.weight)
        shared.up_proj.weight.copy_(mlp.up_proj.weight)
        shared.down_proj.weight.copy_(mlp.down_proj.weight)
        layer.experts.down_proj.zero_()


def moefy(model: nn.Module, config: MoEConfig, init: str = "upcycle", layers: Optional[Iterable[int]] = None,
          predicate: Optional[Callable[[str, nn.Module], bool]] = None) -> int:
    """Replace dense MLPs in ``model`` by DeepSeekMoE layers, in place. Returns how many were replaced.

    Args:
        model: any nn.Module (a transformers model or your own).
        config: the MoE layout; ``hidden_size`` is taken from each MLP. With ``init="upcycle"`` the shared
            experts become one MLP of the dense width F (``num_shared_experts`` >= 1,
            ``shared_expert_hidden_size`` = F).
        init: "upcycle" (function-preserving, see :func:`upcycle_`; gated SiLU MLPs without biases only) or
            "random" (fresh MoE weights; also accepts GPT-2/BERT-style non-gated MLPs).
        layers: indices, in module order, of the matched MLPs to convert (default: all).
        predicate: ``predicate(name, module) -> bool`` selecting the modules to replace (default: gated
            MLPs, plus non-gated ones when ``init="random"``).

    Raises ValueError for a bad ``init`` or ``layers``, when nothing matches (with ``init="upcycle"`` and
    non-gated MLPs present: that they cannot be upcycled, use ``init="random"``), and for MLPs upcycling cannot
    preserve (biases, an activation other than SiLU); TypeError for a ``config`` that is not a MoEConfig.
    """
    if init not in ("upcycle", "random"):
        raise ValueError(f"moefy: init={init!r} is invalid; expected 'upcycle' or 'random'")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"moefy: config must be a MoEConfig, got {type(config).__name__}")
    own_predicate = predicate is not None
    if predicate is None:
        predicate = (lambda n, m: is_gated_mlp(m)) if init == "upcycle" else \
            (lambda n, m: is_gated_mlp(m) or is_plain_mlp(m))
    # Never descend into layers that are already MoE (their shared experts look like a gated MLP).
    moe_names = [n for n, m in model.named_modules() if isinstance(m, DeepSeekMoELayer)]
    matched = [name for name, m in model.named_modules() if name and not isinstance(m, DeepSeekMoELayer)
               and not any(name.startswith(o + ".") for o in moe_names) and predicate(name, m)]
    # Keep only outermost matches (an MLP inside a matched module is replaced with it).
    matched = [n for n in matched if not any(n.startswith(o + ".") for o in matched if o != n)]
    if not matched:
        plain = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if n and is_plain_mlp(m)]
        if init == "upcycle" and plain and not own_predicate:
            raise ValueError(f"moefy: {plain[0]}{f' and {len(plain) - 1} more' if len(plain) > 1 else ''} "
                             f"is not a gated gate/up/down MLP; upcycling needs one. Use init='random' for "
                             f"non-gated (GPT-2-style) MLPs")
        raise ValueError(f"moefy: found no {'gated ' if init == 'upcycle' else ''}MLP to replace in "
                         f"{type(model).__name__}{' matching predicate' if own_predicate else ''}"
                         f"{f' (already MoE: {len(moe_names)} layers)' if moe_names else ''}; pass predicate= to "
                         f"choose the modules")
    if layers is not None:
        layers = list(layers)
        bad = [i for i in layers if not isinstance(i, int) or not -len(matched) <= i < len(matched)]
        if bad:
            raise ValueError(f"moefy: layers={layers} has indices {bad} outside the {len(matched)} matched MLPs "
                             f"({matched})")
    chosen = set(matched if layers is None else [matched[i] for i in layers])
    for name in chosen:
        module = model.get_submodule(name)
        if init == "upcycle":
            if not is_gated_mlp(module):
                raise ValueError(f"moefy: {name} ({type(module).__name__}) is not a gated gate/up/down MLP; "
                                 f"upcycling needs one. Use init='random' for non-gated (GPT-2-style) MLPs")
            if any(getattr(module, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError(f"moefy: {name} has biased projections; upcycling supports bias-free MLPs only "
                                 f"(use init='random')")
            if not _is_silu(module):
                raise ValueError(f"moefy: {name} does not use SiLU; upcycling into SwiGLU experts would change "
                                 f"its function (use init='random')")

    def make(name: str, module: nn.Module) -> nn.Module:
        H, F_width = _mlp_sizes(module)
        cfg = config.replace(hidden_size=H)
        if init == "upcycle":
            cfg = cfg.replace(num_shared_experts=max(1, cfg.num_shared_experts), shared_expert_hidden_size=F_width,
                              shared_expert_gate=False)
        ref = next(module.parameters())
        layer = DeepSeekMoELayer(cfg).to(device=ref.device, dtype=ref.dtype)
        if init == "upcycle":
            upcycle_(layer, module)
        layer.train(module.training)
        return layer

    count = len(replace_modules(model, lambda n, m: n in chosen, make))
    if count:
        adopt_init(model)
    return count

