"""Checkpoint key layouts: a family's stock state-dict keys <-> the layer's own, and the hooks that apply them.

A converted layer saves in its family's layout (so ``save_pretrained`` loads into the stock class) and loads
either layout. Keys are relative to the block's prefix.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..layer import DeepSeekMoELayer
from .families import Family

# (stock, ours) key prefixes each layout renames; tensors keep their layout.
_RENAMES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "fused": (),
    "dbrx": (("router.layer.weight", "gate.weight"),),
}
_OUR_SHARED = "shared_experts"
# MegaBlocks' stacked GLU weights, each (E·I, H): expert e computes (act(x·w1_eᵀ) * x·v1_eᵀ) · w2_e.
_DBRX_EXPERTS = ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")


def _renames(family: Family) -> Tuple[Tuple[str, str], ...]:
    """(stock, ours) key prefixes of ``family``'s layout: its layout's, and its shared expert's attribute name."""
    if family.shared and family.shared != _OUR_SHARED:
        return _RENAMES[family.layout] + ((family.shared + ".", _OUR_SHARED + "."),)
    return _RENAMES[family.layout]


def _rename_prefix(state: Dict[str, torch.Tensor], old: str, new: str) -> None:
    for key in [k for k in state if k.startswith(old)]:
        state[new + key[len(old):]] = state.pop(key)


def _dbrx_to_ours(state: Dict[str, torch.Tensor], prefix: str, E: int) -> None:
    """MegaBlocks/DBRX expert weights (``experts.mlp.w1/v1/w2`` of shape (E·I, H)) -> ours, in place (only when
    all three are there)."""
    names = [prefix + n for n in _DBRX_EXPERTS]
    if all(n in state for n in names):
        w1, v1, w2 = (state.pop(n) for n in names)
        H = w1.shape[-1]
        state[prefix + "experts.gate_up_proj"] = torch.cat([w1.reshape(E, -1, H), v1.reshape(E, -1, H)], dim=1)
        state[prefix + "experts.down_proj"] = w2.reshape(E, -1, H).transpose(1, 2).contiguous()


def _ours_to_dbrx(state: Dict[str, torch.Tensor], prefix: str) -> None:
    gate_up, down = state.pop(prefix + "experts.gate_up_proj"), state.pop(prefix + "experts.down_proj")
    E, J, H = gate_up.shape
    I = J // 2
    w1, v1, w2 = _DBRX_EXPERTS
    state[prefix + w1] = gate_up[:, :I].reshape(E * I, H)
    state[prefix + v1] = gate_up[:, I:].reshape(E * I, H)
    state[prefix + w2] = down.transpose(1, 2).reshape(E * I, H)


def _family_to_ours(state: Dict[str, torch.Tensor], prefix: str, family: Family, E: int) -> None:
    """A block's checkpoint keys under ``prefix`` -> ours, in place (ours pass unchanged)."""
    for stock, ours in _renames(family):
        _rename_prefix(state, prefix + stock, prefix + ours)
    if family.layout == "dbrx":
        _dbrx_to_ours(state, prefix, E)


def _save_in_family_layout(module: DeepSeekMoELayer, state, prefix, local_metadata) -> None:
    """state_dict post-hook of converted layers: the family's own key names and tensor layout."""
    family = module.hf_family
    for stock, ours in _renames(family):
        _rename_prefix(state, prefix + ours, prefix + stock)
    if family.layout == "dbrx":
        _ours_to_dbrx(state, prefix)


def _load_from_family_layout(module: DeepSeekMoELayer, state, prefix, *args) -> None:
    """load_state_dict pre-hook of converted layers: accept the family's layout (and ours)."""
    _family_to_ours(state, prefix, module.hf_family, module.config.num_routed_experts)
