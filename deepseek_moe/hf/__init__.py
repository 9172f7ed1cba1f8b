"""Hugging Face transformers interop: convert MoE blocks to DeepSeekMoE layers and back, turn dense MLPs into MoE.

transformers is optional: nothing here imports it at module import; blocks are recognised by class name.
Supported blocks (transformers >= 5.19, docs/versions.md; fused 3-D experts, or a per-expert ModuleList):

==================  ==========================  =====================================================
family              block                       routing carried over
==================  ==========================  =====================================================
deepseek_v3         ``DeepseekV3MoE``           sigmoid, correction bias, top-2-sum groups, norm, scale
deepseek_v2         ``DeepseekV2Moe``           softmax, greedy or group-limited (max), scale
mixtral             ``MixtralSparseMoeBlock``   softmax, renormalised top-k, router jitter
qwen2_moe           ``Qwen2MoeSparseMoeBlock``  softmax, optional norm, sigmoid-gated shared expert
qwen3_moe           ``Qwen3MoeSparseMoeBlock``  softmax, optional norm
olmoe               ``OlmoeSparseMoeBlock``     softmax, optional norm
dbrx                ``DbrxFFN``                 softmax, p=1 norm, router jitter; MegaBlocks dMoE layout
==================  ==========================  =====================================================

A converted layer computes the same function as the block in training and in eval, records its router logits for
``output_router_logits`` (so the model's own balance loss, ``router_aux_loss_coef``, is unchanged), keeps the
block's dtypes, initialises through the model's ``init_weights``, and ``save_pretrained`` writes the family's
checkpoint layout (:mod:`.keymaps`), so a converted model's checkpoint loads into the stock class.
Configurations it cannot reproduce raise ValueError naming the field. docs/integration.md lists every behaviour
and every stated difference.

Legend: H hidden size, I expert width, E routed experts, K experts per token, F dense MLP width.

Modules: :mod:`.families` (the table above, and :func:`config_from_hf`), :mod:`.keymaps` (checkpoint key layouts),
:mod:`.convert` (:func:`from_hf`, :func:`to_hf` and the whole-model swaps), :mod:`.trainer` (Trainer support);
:func:`moefy` and :func:`upcycle_` live in :mod:`deepseek_moe.upcycle`.
"""
from __future__ import annotations

from ..versions import require

require("transformers")  # an installed transformers below the floor: one clear ImportError

from ..config import ACTIVATIONS, MoEConfig
from ..experts import RoutedExperts
from ..glu import activate
from ..layer import DeepSeekMoELayer
from ..model import calibrate_routing, expert_load, moe_layers, update_biases
from ..padding import attention_mask_padding
from ..router import Router
from .convert import (converted_at_construction, from_hf, from_megablocks, replace_moe_blocks,
                      restore_moe_blocks, to_hf)
from .families import FAMILIES, SUPPORTED_BLOCKS, Family, config_from_hf, family_of
from .keymaps import KEYMAPS, KeyMap, refresh_conversions, to_ours, to_stock
from .trainer import aux_loss_trainer, trainer_callback
from . import experts_interface  # noqa: F401  ("deepseek_moe" in transformers' experts interface)
from ..upcycle import is_gated_mlp, is_plain_mlp, moefy, upcycle_

__all__ = [
    "from_hf", "to_hf", "replace_moe_blocks", "converted_at_construction", "restore_moe_blocks", "from_megablocks",
    "moefy", "upcycle_", "KEYMAPS", "KeyMap", "refresh_conversions", "to_ours", "to_stock", "is_gated_mlp",
    "is_plain_mlp", "config_from_hf", "family_of", "FAMILIES", "SUPPORTED_BLOCKS", "Family",
    "moe_layers", "update_biases", "calibrate_routing", "expert_load", "trainer_callback", "aux_loss_trainer",
    # the package modules hf.py imported, still reachable here
    "ACTIVATIONS", "MoEConfig", "RoutedExperts", "activate", "DeepSeekMoELayer", "attention_mask_padding", "Router",
]
