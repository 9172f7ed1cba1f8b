"""Checkpoint key layouts: each family's stock keys against the layer's own, as data, and the two places that use it.

A converted layer's ``state_dict()`` holds its parameters themselves under its own names, which are the stock
names in every family but DBRX (a Qwen2-MoE layer registers its shared experts as ``shared_expert``, as the stock
block does: :meth:`~deepseek_moe.layer.DeepSeekMoELayer.name_shared_experts`). DBRX keeps MegaBlocks' stacked GLU
weights, so :data:`KEYMAPS` lists, per family, the keys it renames and the tensors it converts (block-relative).
The table is applied

* by transformers' own loader and saver (``from_pretrained``/``save_pretrained``, with sharding, dtype,
  ``low_cpu_mem_usage``, device maps and PEFT's key lookups): :func:`register_with_transformers` turns it into
  transformers' ``WeightRenaming``/``WeightConverter`` transforms for every model holding a converted layer, so a
  converted model loads stock checkpoints and saves the stock layout;
* by :func:`to_ours`/:func:`to_stock` on plain state dicts (``from_hf``, ``to_hf``, ``from_megablocks``, and a
  converted layer's ``load_state_dict``, which accepts either layout).

transformers' public ``register_checkpoint_conversion_mapping`` is keyed by model class or ``model_type``, which a
converted model shares with the stock one: a mapping registered there would rename the keys of stock models too.
The transforms are therefore attached per converted layer, through the hook transformers uses for its own fused
modules (``transformers.fusion_mapping``), when that exists (transformers >= 5.25).

Legend: E routed experts, I expert width, H hidden size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..layer import DeepSeekMoELayer
from .families import FAMILIES, Family


# ------------------------------------------------------------------------------------------ conversions
def _stacked_glu_to_fused(tensors: Sequence[torch.Tensor], E: int) -> torch.Tensor:
    """MegaBlocks' w1, v1 (E·I, H) each (expert e: rows e·I..(e+1)·I) -> gate_up_proj (E, 2I, H), gate rows first."""
    w1, v1 = tensors
    H = w1.shape[-1]
    return torch.cat([w1.reshape(E, -1, H), v1.reshape(E, -1, H)], dim=1)


def _fused_to_stacked_glu(gate_up_EJH: torch.Tensor, E: int) -> Tuple[torch.Tensor, torch.Tensor]:
    I, H = gate_up_EJH.shape[1] // 2, gate_up_EJH.shape[2]
    return (gate_up_EJH[:, :I].reshape(E * I, H).contiguous(), gate_up_EJH[:, I:].reshape(E * I, H).contiguous())


def _stacked_down_to_fused(tensors: Sequence[torch.Tensor], E: int) -> torch.Tensor:
    """MegaBlocks' w2 (E·I, H) (expert e's down projection, transposed) -> down_proj (E, H, I)."""
    (w2,) = tensors
    return w2.reshape(E, -1, w2.shape[-1]).transpose(1, 2).contiguous()


def _fused_to_stacked_down(down_EHI: torch.Tensor, E: int) -> Tuple[torch.Tensor]:
    return (down_EHI.transpose(1, 2).reshape(-1, down_EHI.shape[1]).contiguous(),)


# name -> (stock tensors -> ours, ours -> stock tensors), each given E
CONVERSIONS: Dict[str, Tuple[Callable, Callable]] = {
    "stacked_glu": (_stacked_glu_to_fused, _fused_to_stacked_glu),
    "stacked_down": (_stacked_down_to_fused, _fused_to_stacked_down),
}


@dataclass(frozen=True)
class KeyMap:
    """A family's checkpoint layout against the layer's, block-relative: ``renames`` (stock key, our key) and
    ``converts`` (stock keys, our key, a :data:`CONVERSIONS` name)."""

    renames: Tuple[Tuple[str, str], ...] = ()
    converts: Tuple[Tuple[Tuple[str, ...], str, str], ...] = ()


KEYMAPS: Dict[str, KeyMap] = {
    "dbrx": KeyMap(renames=(("router.layer.weight", "gate.weight"),),
                   converts=((("experts.mlp.w1", "experts.mlp.v1"), "experts.gate_up_proj", "stacked_glu"),
                             (("experts.mlp.w2",), "experts.down_proj", "stacked_down"))),
}


def keymap(family: Family) -> KeyMap:
    return KEYMAPS.get(family.name, KeyMap())


# ------------------------------------------------------------------------------------------ plain state dicts
def to_ours(state: Dict[str, torch.Tensor], prefix: str, family: Family, E: int) -> None:
    """A block's keys under ``prefix`` in the family's stock layout -> ours, in place (ours pass unchanged; a
    conversion applies only when all its stock keys are there)."""
    kmap = keymap(family)
    for stock, ours in kmap.renames:
        if prefix + stock in state:
            state[prefix + ours] = state.pop(prefix + stock)
    for stock_keys, ours, name in kmap.converts:
        if all(prefix + k in state for k in stock_keys):
            state[prefix + ours] = CONVERSIONS[name][0]([state.pop(prefix + k) for k in stock_keys], E)


def to_stock(state: Dict[str, torch.Tensor], prefix: str, family: Family, E: int) -> None:
    """The inverse of :func:`to_ours`: our keys under ``prefix`` -> the family's stock layout, in place (a bare
    layer's ``shared_experts.*`` keys too, for a family that names its shared experts otherwise)."""
    if family.shared is not None:
        _bare_shared_keys_to(state, prefix, family.shared)
    kmap = keymap(family)
    for stock, ours in kmap.renames:
        if prefix + ours in state:
            state[prefix + stock] = state.pop(prefix + ours)
    for stock_keys, ours, name in kmap.converts:
        if prefix + ours in state:
            state.update(zip((prefix + k for k in stock_keys), CONVERSIONS[name][1](state.pop(prefix + ours), E)))


def _bare_shared_keys_to(state: Dict[str, torch.Tensor], prefix: str, name: str) -> None:
    """A bare layer's shared-expert keys (``shared_experts.*``) under ``prefix`` -> ``name.*``, in place, where the
    state has no key of that name already (with both, the bare ones stay: unexpected for a strict load)."""
    shared, bare = f"{prefix}{name}.", f"{prefix}{DeepSeekMoELayer.shared_experts_name}."
    if shared == bare or any(k.startswith(shared) for k in state):
        return
    for key in [k for k in state if k.startswith(bare)]:
        state[shared + key[len(bare):]] = state.pop(key)


def _load_from_family_layout(module, state, prefix, *args) -> None:
    """load_state_dict pre-hook of converted layers: accept the family's stock layout (and ours), a bare layer's
    name for shared experts the family names otherwise, and a correction bias saved beside a family's keys that has
    none (a calibrated or balancing layer's: it becomes persistent, as in the layer it was saved from)."""
    to_ours(state, prefix, module.hf_family, module.config.num_routed_experts)
    _bare_shared_keys_to(state, prefix, module.shared_experts_name)
    if prefix + "gate.e_score_correction_bias" in state:
        module.router.keep_bias_in_checkpoints()


# ------------------------------------------------------------------------------------------ transformers
_TRANSFORMERS_HOOK = "deepseek_moe"


def _expert_layout_class():
    """:class:`ExpertLayout`, a transformers ``ConversionOps`` (made at first use: transformers is optional)."""
    cls = globals().get("_ExpertLayout")
    if cls is None:
        from transformers.core_model_loading import ConversionOps

        class ExpertLayout(ConversionOps):
            """One :data:`CONVERSIONS` entry as a transformers conversion op (``forward``: stock -> ours)."""

            def __init__(self, name: str, experts: int, forward: bool = True):
                self.name, self.experts, self.forward = name, experts, forward

            def __repr__(self):
                return f"ExpertLayout({self.name!r}, E={self.experts}, {'to ours' if self.forward else 'to stock'})"

            @torch.no_grad()
            def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
                tensors = [input_dict[p][0] if isinstance(input_dict[p], list) else input_dict[p]
                           for p in source_patterns]
                if self.forward:
                    return {target_patterns[0]: CONVERSIONS[self.name][0](tensors, self.experts)}
                return dict(zip(target_patterns, CONVERSIONS[self.name][1](tensors[0], self.experts)))

            @property
            def reverse_op(self):
                return ExpertLayout(self.name, self.experts, not self.forward)

        # Pickled by reference (a converted model keeps these ops in its _weight_conversions): found again through
        # this module's __getattr__.
        ExpertLayout.__module__, ExpertLayout.__qualname__ = __name__, "ExpertLayout"
        cls = globals()["_ExpertLayout"] = ExpertLayout
    return cls


def __getattr__(name: str):
    if name == "ExpertLayout":
        return _expert_layout_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def transformers_transforms(family: Family, E: int) -> List[object]:
    """The family's :class:`KeyMap` as transformers ``WeightRenaming``/``WeightConverter`` transforms (stock ->
    ours; transformers reverses them on save). Needs transformers >= 5."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    layout = _expert_layout_class()
    kmap = keymap(family)
    return ([WeightRenaming(source_patterns=stock, target_patterns=ours) for stock, ours in kmap.renames]
            + [WeightConverter(source_patterns=list(stock), target_patterns=ours,
                               operations=[layout(name, E)]) for stock, ours, name in kmap.converts])


def _has_keymap(module) -> bool:
    """``module`` is a converted layer whose family's layout differs from ours."""
    family = getattr(module, "hf_family", None)
    return family is not None and family.name in KEYMAPS


def _layer_transforms(layer) -> List[object]:
    return transformers_transforms(layer.hf_family, layer.config.num_routed_experts) if _has_keymap(layer) else []


def _model_transforms(model) -> List[object]:
    """The transforms of the converted layers ``model`` holds, one per set of source patterns."""
    unique = {}
    for layer in model.modules():
        for t in _layer_transforms(layer):
            unique.setdefault(tuple(t.source_patterns), t)
    return list(unique.values())


def _loader_applies_hook() -> bool:
    """transformers' loader collects the per-module transforms (``get_fusion_weight_transforms``, 5.25 on)."""
    try:
        from transformers import conversion_mapping
    except ImportError:
        return False
    return hasattr(conversion_mapping, "get_fusion_weight_transforms")


def register_with_transformers() -> bool:
    """Let transformers' loader and saver apply :data:`KEYMAPS` to every model that holds a converted layer
    (idempotent). Returns False where this transformers' loader does not collect per-module transforms (before
    5.25): there :func:`refresh_conversions` still makes ``save_pretrained`` write the stock layout, but a
    checkpoint loads into converted DBRX layers only through ``load_state_dict`` (load the stock
    model, then ``replace_moe_blocks``)."""
    if not _loader_applies_hook():
        return False
    from transformers import fusion_mapping

    registry = fusion_mapping._FUSION_REGISTRY
    if _TRANSFORMERS_HOOK not in registry:

        class ConvertedLayers(fusion_mapping.ModuleFusionSpec):
            """Not a fusion transformers performs: it only reports the key layouts of converted layers."""

            def is_fusable(self, module) -> bool:
                return False

            def is_fused(self, module) -> bool:
                return _has_keymap(module)

            def make_fused_class(self, original_cls):
                raise TypeError("deepseek_moe's layers are converted by deepseek_moe.hf, not by fusion_config")

            def make_transforms(self, module) -> List[object]:
                return _layer_transforms(module)

        registry[_TRANSFORMERS_HOOK] = ConvertedLayers()
    return True


def with_layer_transforms(get_model_conversion_mapping):
    """transformers' ``get_model_conversion_mapping`` extended by the converted layers' transforms: what the loader
    collects itself from 5.25 on (:func:`~deepseek_moe.hf.converted_at_construction` patches it in before)."""

    def wrapper(model, *args, **kwargs):
        conversions = list(get_model_conversion_mapping(model, *args, **kwargs))
        present = {tuple(t.source_patterns) for t in conversions}
        return conversions + [t for t in _model_transforms(model) if tuple(t.source_patterns) not in present]

    return wrapper


def refresh_conversions(model) -> None:
    """Bring the transforms that ``save_pretrained`` reverses up to date with the converted layers ``model`` holds.
    A model loaded by ``from_pretrained`` keeps the transforms it was loaded with (``_weight_conversions``) and
    saves with those: add the converted layers', or drop them after :func:`~deepseek_moe.hf.restore_moe_blocks`.
    Where transformers' saver does not collect per-module transforms itself (before 5.25), a model that was not
    loaded gets the model's own transforms plus the layers'. ``replace_moe_blocks`` and ``restore_moe_blocks`` call
    it; call it yourself after placing :func:`from_hf` layers into a loaded model by hand."""
    conversions = getattr(model, "_weight_conversions", None)
    layers = _model_transforms(model)
    if conversions is None:
        if not layers or _loader_applies_hook():
            return
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:  # transformers 4: no declarative conversions
            return
        # What transformers' saver computes for a model it did not load (legacy renames and prefix changes off).
        conversions = [t for t in get_model_conversion_mapping(model, add_legacy=False)
                       if not isinstance(t, PrefixChange)]
    ours = {tuple(t.source_patterns) for family in FAMILIES if family.name in KEYMAPS
            for t in transformers_transforms(family, 1)}
    model._weight_conversions = [t for t in conversions if tuple(t.source_patterns) not in ours] + layers
