"""What the benchmark times: our layer per backend, the dense SwiGLU of equal active FLOPs, and peers.

Legend: T tokens, H hidden size, F the expert width of the ``mixtral-8x2`` preset, I expert hidden size, E routed
experts, K routed experts per token.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .. import backends, ext
from ..config import ConfigError, MoEConfig, PRESETS, matched_pair
from ..experts import SharedExperts
from ..layer import DeepSeekMoELayer
from ..losses import load_stats

MATCHES = ("flops", "params", "none")
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# batched_mm gathers one weight matrix per (token, expert) pair: O(T·K·I·H) memory (8 GB at T=512, H=512, F=1408
# for the 64-expert layer), so it runs only when asked for by name.
DEFAULT_HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


@dataclass
class Contender:
    """One row family of the table: a module factory plus the static columns."""

    name: str                      # e.g. "deepseek-64x", "mixtral-8x2", "dense-2816", "hf-mixtral"
    side: str                      # "a" (the reference config, mixtral-8x2 by default), "b", or "dense"
    implementation: str            # backend name, "dense", or the peer's experts implementation
    total_params: int
    active_params: int
    flops_per_token: int
    expert_combinations: int
    dense_width: int
    family: str                    # the config whose weights this contender runs (peers copy them)
    kind: str                      # "layer" (ours), "dense" or "peer"
    state_numel: int               # parameters + buffers of the built module (what it holds in memory)
    build: Callable[[Optional[nn.Module]], nn.Module] = field(repr=False)
    config: Optional[MoEConfig] = field(default=None, repr=False)

    def max_vio(self, module: nn.Module, x_TH: torch.Tensor) -> float:
        """MaxVio of this contender's routing on x_TH (0 for the dense FFN, which has one 'expert')."""
        if self.side == "dense":
            return 0.0
        if isinstance(module, DeepSeekMoELayer):
            with torch.no_grad():
                _, plan = module.route(x_TH)
            counts = plan.counts_E
        else:
            with torch.no_grad():
                _, _, topk_idx = module.block.gate(x_TH)
            counts = torch.bincount(topk_idx.reshape(-1), minlength=self.config.num_routed_experts)
        return load_stats(counts)["max_vio"]


def configs_for(match: str, hidden_size: int, ffn_size: int, a: Optional[str] = None, b: Optional[str] = None,
                ) -> Tuple[Tuple[str, MoEConfig], Tuple[str, MoEConfig]]:
    """The two configurations to compare, named, by the matching rule.

    * ``flops``: Mixtral-style 8 x F top-2 vs DeepSeekMoE 64 x F/8 + 2 shared, top-14 (equal active FLOPs,
      total parameters +3%).
    * ``params``: Mixtral-style vs DeepSeekMoE 62 x F/8 + 2 shared, top-14 (equal total and active expert
      parameters: 64 fine experts in all, 16 active).
    * ``none``: presets ``a`` and ``b`` as they are, with ``hidden_size`` (defaults: mixtral-8x2, deepseek-64x
      with ``ffn_size``; the other presets keep their own expert width).
    """
    if match not in MATCHES:
        raise ConfigError(f"--match {match!r} is invalid; expected one of {MATCHES}")
    if match == "none" or a is not None or b is not None:
        a, b = a or "mixtral-8x2", b or "deepseek-64x"
        return (a, _preset(a, hidden_size, ffn_size)), (b, _preset(b, hidden_size, ffn_size))
    mixtral, deepseek = matched_pair(hidden_size, ffn_size)
    if match == "params":
        deepseek = deepseek.replace(num_routed_experts=62)
        return ("mixtral-8x2", mixtral), ("deepseek-62x+2", deepseek)
    return ("mixtral-8x2", mixtral), ("deepseek-64x+2", deepseek)


FFN_SIZE_PRESETS = ("mixtral-8x2", "deepseek-64x")  # the presets whose expert width follows --ffn-size


def _preset(name: str, hidden_size: int, ffn_size: int) -> MoEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    extra = {"ffn_size": ffn_size} if name in FFN_SIZE_PRESETS else {}
    return MoEConfig.preset(name, hidden_size=hidden_size, **extra)


def describe(cfg: MoEConfig) -> str:
    """The layout of ``cfg`` in a few words: ``64×176 top-14 + 2 shared`` (E routed experts of width I, top-K,
    shared experts)."""
    text = f"{cfg.num_routed_experts}×{cfg.expert_hidden_size} top-{cfg.top_k}"
    if cfg.num_shared_experts:
        text += f" + {cfg.num_shared_experts} shared"
        if cfg.shared_width != cfg.num_shared_experts * cfg.expert_hidden_size:
            text += f" ({cfg.shared_width} wide)"
    return text


def dense_flops_per_token(hidden_size: int, width: int) -> int:
    return 2 * 3 * hidden_size * width


def moe_contender(name: str, side: str, cfg: MoEConfig, backend: str) -> Contender:
    """Our layer with ``backend``; ``build(source)`` copies the weights of ``source`` (another layer of ``cfg``)."""
    cfg = cfg.replace(backend=backend)

    def build(source: Optional[nn.Module]) -> nn.Module:
        layer = DeepSeekMoELayer(cfg)
        if source is not None:
            layer.load_state_dict(source.state_dict())
        return layer

    # state: the parameters and the router's bias buffer (E).
    return Contender(name=name, side=side, implementation=backend, total_params=cfg.total_params,
                     active_params=cfg.active_params, flops_per_token=cfg.flops_per_token,
                     expert_combinations=math.comb(cfg.num_routed_experts, cfg.top_k),
                     dense_width=cfg.dense_equivalent_width, family=name, kind="layer",
                     state_numel=cfg.total_params + cfg.num_routed_experts, build=build, config=cfg)


def dense_contender(hidden_size: int, width: int) -> Contender:
    params = 3 * hidden_size * width
    return Contender(name=f"dense-{width}", side="dense", implementation="dense", total_params=params,
                     active_params=params, flops_per_token=dense_flops_per_token(hidden_size, width),
                     expert_combinations=1, dense_width=width, family=f"dense-{width}", kind="dense",
                     state_numel=params, build=lambda source: SharedExperts.dense(hidden_size, width))


# Triton on CPU means its interpreter, a testing tool far too slow to time: only when asked for by name.
_TRITON_ON_CPU = "on CPU triton runs only in its interpreter, far too slow to time (--backend triton runs it anyway)"
EXT_NOT_BUILT = ("not built (pass --backend ext to build it just in time, ~30 s once, or build it ahead of time: "
                 "DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation)")


def backend_choices(device: torch.device, dtype: torch.dtype) -> Tuple[List[str], Dict[str, str]]:
    """``--backend all``: (the backends that can run on (device, dtype), {every other backend: why not}).

    ``ext`` counts when the compiled extension is loaded or loads without compiling (an ahead-of-time build, or a
    just-in-time build cached for these sources, which loads in seconds); it is never compiled here."""
    ext_reason = ext_loadable()
    status = backends.backend_status(device, dtype)
    usable: List[str] = []
    skipped: Dict[str, str] = {}
    for name, reason in status.items():
        if name == "ext" and ext_reason is not None:
            reason = ext_reason
        elif name == "triton" and reason is None and device.type == "cpu":
            reason = _TRITON_ON_CPU
        if reason is None:
            usable.append(name)
        else:
            skipped[name] = reason
    return usable, skipped


def ext_loadable() -> Optional[str]:
    """Load a built but unloaded extension (no compiling). Returns why ext cannot run where the CLI words it
    differently from ``backend_status`` (its load failed, or a checkout has not built it: how to with the CLI),
    else None: ``backend_status`` then says it (loaded, a failed build, a wheel without sources)."""
    if ext.is_loaded() or ext.build_error():
        return None
    if ext.has_prebuilt() or ext.has_cached_build():
        from ..backends.ext import ensure_loaded
        try:
            ensure_loaded()
        except ext.ExtensionUnavailable as err:
            return str(err)
        return None
    return EXT_NOT_BUILT if ext.sources() else None


# ------------------------------------------------------------------------------------------------ peers
def peer_status() -> Dict[str, Optional[str]]:
    """{peer: None if installed else why not} for transformers' blocks and megablocks (found without importing:
    transformers takes seconds to import, the peers import it when they are built)."""
    status: Dict[str, Optional[str]] = {}
    try:
        found = importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):
        found = False
    status["transformers"] = None if found else "not installed (pip install 'deepseek-moe[hf]')"
    status["megablocks"] = "CUDA only, and this version has no adapter for it (an optional GPU peer)"
    return status


def hf_unsupported(cfg: MoEConfig, implementation: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why transformers' ``implementation`` cannot run ``cfg`` here, or None: its ``grouped_mm`` calls
    ``torch._grouped_mm``, which on the CPU needs every row of its operands a multiple of 16 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    if implementation == "grouped_mm" and device.type == "cpu" and (cfg.hidden_size * size % 16
                                                                    or cfg.expert_hidden_size * size % 16):
        return (f"torch._grouped_mm on the CPU needs rows of multiples of 16 bytes: hidden size "
                f"{cfg.hidden_size} and expert width {cfg.expert_hidden_size} must be multiples of {16 // size} "
                f"in {str(dtype).replace('torch.', '')}")
    return None


def hf_contender(name: str, side: str, cfg: MoEConfig, implementation: str) -> Optional[Contender]:
    """transformers' own block for ``cfg`` on the weights of ``build(source)``'s source layer, or None if no
    transformers block has this layout.

    MixtralSparseMoeBlock for softmax, renormalised, no-shared configs; DeepseekV3MoE (sigmoid scores and
    group-limited top-k in its router, whatever ``cfg`` says) when there are ungated shared experts.
    """
    if cfg.num_shared_experts == 0 and cfg.score_func == "softmax" and cfg.norm_topk_prob:
        peer = "hf-mixtral"
    elif cfg.num_shared_experts > 0 and not cfg.shared_expert_gate:
        peer = "hf-deepseek-v3"
    else:
        return None

    def build(source: Optional[nn.Module]) -> nn.Module:
        ours = source if source is not None else DeepSeekMoELayer(cfg)
        if peer == "hf-mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            hf_cfg = MixtralConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.expert_hidden_size,
                                   num_local_experts=cfg.num_routed_experts, num_experts_per_tok=cfg.top_k)
            hf_cfg._experts_implementation = implementation
            block = MixtralSparseMoeBlock(hf_cfg)
            state = {k: v for k, v in ours.state_dict().items() if k != "gate.e_score_correction_bias"}
        else:
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
            hf_cfg = DeepseekV3Config(hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.expert_hidden_size,
                                      n_routed_experts=cfg.num_routed_experts, num_experts_per_tok=cfg.top_k,
                                      n_shared_experts=cfg.num_shared_experts, n_group=1, topk_group=1,
                                      norm_topk_prob=cfg.norm_topk_prob,
                                      routed_scaling_factor=cfg.routed_scaling_factor)
            hf_cfg._experts_implementation = implementation
            block = DeepseekV3MoE(hf_cfg)
            state = ours.state_dict()
        block.load_state_dict(state)
        return BlockOnTokens(block)

    # state: transformers' DeepseekV3MoE keeps the router's bias buffer (E), its Mixtral block has none.
    buffers = cfg.num_routed_experts if peer == "hf-deepseek-v3" else 0
    return Contender(name=peer, side=side, implementation=implementation, total_params=cfg.total_params,
                     active_params=cfg.active_params, flops_per_token=cfg.flops_per_token,
                     expert_combinations=math.comb(cfg.num_routed_experts, cfg.top_k),
                     dense_width=cfg.dense_equivalent_width, family=name, kind="peer",
                     state_numel=cfg.total_params + buffers, build=build, config=cfg)


class BlockOnTokens(nn.Module):
    """A transformers MoE block called on (T, H) tokens or (B, S, H) sequences: the blocks want (B, S, H)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        if x.dim() == 3:
            return self.block(x)
        return self.block(x.unsqueeze(0)).squeeze(0)
