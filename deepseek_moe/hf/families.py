"""The transformers MoE families: how each block's routing maps onto a :class:`MoEConfig`.

:class:`Family` describes one block class (its routing fields, router dtype, shared expert and checkpoint layout),
:data:`FAMILIES` lists the supported ones and :func:`config_from_hf` reads a block's sizes, activation and routing.
transformers is not imported: blocks are recognised by class name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ACTIVATIONS, ConfigError, MoEConfig
from ..forced_routing import default_hash_table
from ..glu import activate


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto :class:`DeepSeekMoELayer`.

    ``fields(block)`` returns the MoEConfig fields of its routing (raising ValueError for a configuration the layer
    cannot reproduce); ``has_bias``: the block's top-k router has ``gate.e_score_correction_bias`` (a hash router
    never has one: :func:`keeps_bias`); ``router_fp32``: transformers keeps its router weight fp32 in 16-bit
    models; ``shared``: the shared-expert attribute name and ``shared_field`` the config field of its width;
    ``layout``: "fused" (our names) or "dbrx" (MegaBlocks' stacked w1/v1/w2); ``build(block_class, hf_config,
    cfg)``: the stock block for a layer of config ``cfg`` (default ``block_class(hf_config)``).
    """

    name: str
    blocks: Tuple[str, ...]
    fields: Callable[[nn.Module], Dict[str, Any]]
    has_bias: bool = False
    router_fp32: bool = False
    shared: Optional[str] = None
    shared_field: Optional[str] = None
    layout: str = "fused"
    build: Optional[Callable[[type, Any, MoEConfig], nn.Module]] = None


def keeps_bias(family: Family, cfg: MoEConfig) -> bool:
    """Whether the stock block of a layer of config ``cfg`` holds ``gate.e_score_correction_bias``."""
    return family.has_bias and cfg.hash_vocab_size is None


def _find(obj: nn.Module, *names: str, default=None):
    """The first attribute among ``names`` found on ``obj``, its ``gate`` or its ``config``."""
    for holder in (obj, getattr(obj, "gate", None), getattr(obj, "config", None)):
        if holder is None:
            continue
        for name in names:
            value = getattr(holder, name, None)
            if value is not None:
                return value
    return default


def _router_weight(block: nn.Module) -> torch.Tensor:
    return block.router.layer.weight if hasattr(block, "router") else block.gate.weight


def _deepseek_v3(block: nn.Module) -> Dict[str, Any]:
    E = _router_weight(block).shape[0]
    K, G, TG = _find(block, "top_k", "num_experts_per_tok"), _find(block, "num_group", "n_group"), \
        _find(block, "topk_group")
    fields = dict(score_func="sigmoid", group_score="top2_sum", num_groups=G, topk_groups=TG,
                  norm_topk_prob=bool(_find(block, "norm_topk_prob")),
                  routed_scaling_factor=float(_find(block, "routed_scaling_factor")))
    if K > TG * (E // G):
        if K < E:  # transformers then picks among -inf scores: an order torch.topk does not define
            raise ValueError(f"from_hf: DeepseekV3 num_experts_per_tok={K} exceeds topk_group={TG} groups of "
                             f"{E // G} experts (n_group={G}) but is below n_routed_experts={E}; which extra experts "
                             f"transformers picks is undefined, so this configuration is not supported")
        fields.update(num_groups=1, topk_groups=1)  # every expert is chosen: the group limit cannot bind
    return fields


def _deepseek_v2(block: nn.Module) -> Dict[str, Any]:
    E = _router_weight(block).shape[0]
    K = _find(block, "top_k", "num_experts_per_tok")
    method = _find(block, "topk_method", default="greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"from_hf: DeepseekV2 topk_method={method!r} is not supported; expected 'greedy' or "
                         f"'group_limited_greedy'")
    fields = dict(score_func="softmax", norm_topk_prob=False,
                  routed_scaling_factor=float(_find(block, "routed_scaling_factor")))
    if method == "group_limited_greedy":
        G, TG = _find(block, "num_group", "n_group"), _find(block, "topk_group")
        fields.update(group_score="max", num_groups=G, topk_groups=TG)
        # transformers zeroes the scores outside the kept groups: experts picked beyond them get weight 0.
        fields["top_k"] = min(K, TG * (E // G))
    return fields


def _mixtral(block: nn.Module) -> Dict[str, Any]:
    return dict(score_func="softmax", norm_topk_prob=True, router_jitter_noise=float(block.jitter_noise or 0.0))


def _softmax_topk(block: nn.Module) -> Dict[str, Any]:
    return dict(score_func="softmax", norm_topk_prob=bool(_find(block, "norm_topk_prob", default=False)))


def _qwen2_moe(block: nn.Module) -> Dict[str, Any]:
    return dict(_softmax_topk(block), shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None)


def _score_name(fn: Callable, field: str) -> str:
    """Our score function name of a router's element-wise ``fn`` (identified by its values); ValueError naming the
    config ``field`` otherwise."""
    probe = torch.linspace(-30, 30, 241, dtype=torch.float64, device="cpu")  # also inside torch.device("meta")
    for name, ref in (("sqrtsoftplus", F.softplus(probe).sqrt()), ("sigmoid", torch.sigmoid(probe))):
        if torch.allclose(fn(probe), ref, rtol=1e-9, atol=1e-12):
            return name
    raise ValueError(f"from_hf: {field}={type(fn).__name__} is not supported; expected sqrtsoftplus or sigmoid")


def _deepseek_v4(block: nn.Module) -> Dict[str, Any]:
    limit = getattr(block.experts, "limit", None)
    if getattr(block.shared_experts, "limit", None) != limit:
        raise ValueError(f"from_hf: DeepseekV4 swiglu_limit differs between the routed ({limit}) and the shared "
                         f"experts ({block.shared_experts.limit}); the layer clamps both at one limit")
    # transformers' routers always normalise the chosen experts' scores (norm_topk_prob is not read). Its config
    # takes no None for swiglu_limit: an infinite one, which clamps nothing, is the way to turn the clamp off.
    fields = dict(score_func=_score_name(block.gate.score_fn, "scoring_func"), norm_topk_prob=True,
                  routed_scaling_factor=float(block.gate.routed_scaling_factor),
                  swiglu_limit=None if limit is None or math.isinf(limit) else float(limit))
    if getattr(block.gate, "tid2eid", None) is not None:  # DeepseekV4HashRouter: its table picks the experts
        fields["hash_vocab_size"] = block.gate.tid2eid.shape[0]
    return fields


def _build_deepseek_v4(block_class: type, hf_config, cfg: MoEConfig) -> nn.Module:
    """A stock block of the router kind of ``cfg``: transformers picks it by ``mlp_layer_types[layer_idx]``."""
    kind = "hash_moe" if cfg.hash_vocab_size is not None else "moe"
    kinds = list(getattr(hf_config, "mlp_layer_types", None) or ())
    if kind not in kinds:
        raise ValueError(f"to_hf: hf_config.mlp_layer_types={kinds} has no {kind!r} layer, which a "
                         f"{'hash' if kind == 'hash_moe' else 'top-k'}-routed DeepseekV4SparseMoeBlock needs")
    return block_class(hf_config, kinds.index(kind))


def replace_placeholder_table(layer) -> None:
    """A hash table of zeros is transformers' placeholder (DeepseekV4HashRouter's, until a checkpoint fills it): it
    would send every token to expert 0 K times, which no trained table does and the layer refuses. A fresh block's
    layer gets the layer's own default table instead, as a layer built by ``__init__`` or ``init_weights`` has."""
    table = getattr(layer.router, "tid2eid", None)
    if table is None or table.is_meta or layer.config.top_k < 2 or bool(table.any()):
        return
    with torch.no_grad():
        table.copy_(default_hash_table(table.shape[0], layer.config.num_routed_experts, layer.config.top_k,
                                       table.device))


def _dbrx(block: nn.Module) -> Dict[str, Any]:
    # transformers 5 keeps top_k and the normalisation on DbrxFFN; 4.57 on its router (as moe_top_k).
    holder = block if hasattr(block, "moe_normalize_expert_weights") else block.router
    p = holder.moe_normalize_expert_weights
    if p not in (None, 1, 1.0):
        raise ValueError(f"from_hf: DBRX ffn_config.moe_normalize_expert_weights={p!r} is not supported; expected "
                         f"None or 1 (sum normalisation)")
    return dict(score_func="softmax", norm_topk_prob=p is not None, top_k=getattr(holder, "top_k", None)
                or holder.moe_top_k,
                router_jitter_noise=float(block.router.moe_jitter_eps or 0.0))


FAMILIES: Tuple[Family, ...] = (
    Family("deepseek_v3", ("DeepseekV3MoE",), _deepseek_v3, has_bias=True, router_fp32=True, shared="shared_experts",
           shared_field="n_shared_experts"),
    # DeepseekV2MoE: transformers 4.57's spelling of DeepseekV2Moe.
    Family("deepseek_v2", ("DeepseekV2Moe", "DeepseekV2MoE"), _deepseek_v2, router_fp32=True,
           shared="shared_experts", shared_field="n_shared_experts"),
    Family("mixtral", ("MixtralSparseMoeBlock",), _mixtral),
    Family("qwen2_moe", ("Qwen2MoeSparseMoeBlock",), _qwen2_moe, shared="shared_expert",
           shared_field="shared_expert_intermediate_size"),
    Family("qwen3_moe", ("Qwen3MoeSparseMoeBlock",), _softmax_topk),
    Family("olmoe", ("OlmoeSparseMoeBlock",), _softmax_topk),
    Family("dbrx", ("DbrxFFN",), _dbrx, layout="dbrx"),
    Family("deepseek_v4", ("DeepseekV4SparseMoeBlock",), _deepseek_v4, has_bias=True, shared="shared_experts",
           shared_field="moe_intermediate_size", build=_build_deepseek_v4),
)
SUPPORTED_BLOCKS = tuple(name for family in FAMILIES for name in family.blocks)


def family_of(block: nn.Module) -> Family:
    """The :class:`Family` of transformers' MoE ``block``; TypeError for an unsupported block."""
    kind = type(block).__name__
    for family in FAMILIES:
        if kind in family.blocks:
            return family
    raise TypeError(f"from_hf: {kind} is not a supported block; expected one of {SUPPORTED_BLOCKS}")


def _activation_name(act: nn.Module, field: str) -> str:
    """Our name of the GLU gate activation ``act`` (identified by its values, so any transformers spelling of the
    same function maps); ValueError naming the config ``field`` otherwise."""
    # Fine near 0, where the GELUs and SiLU differ, and wide, where clipped variants (relu6, gelu_10) part.
    # On the CPU explicitly: blocks built inside ``with torch.device("meta")`` are converted too.
    probe = torch.cat([torch.linspace(-6, 6, 97, device="cpu"), torch.linspace(-100, 100, 201, device="cpu")])
    probe = probe.double()
    got = act(probe)
    for name in ACTIVATIONS:
        if torch.allclose(got, activate(probe, name), rtol=1e-6, atol=1e-7):
            return name
    raise ValueError(f"from_hf: the experts' activation {field}={type(act).__name__} is not supported; the layer "
                     f"implements GLU experts with {ACTIVATIONS}")


def _expert_sizes(block: nn.Module, family: Family) -> Tuple[int, str]:
    """(I, activation name) of the block's routed experts."""
    experts = block.experts
    if family.layout == "dbrx":
        E = _router_weight(block).shape[0]
        return experts.mlp.w1.shape[0] // E, _activation_name(experts.mlp.activation_fn, "ffn_config.ffn_act_fn")
    if isinstance(experts, nn.ModuleList):  # transformers < 5: one MLP module per expert
        first = experts[0]
        down = getattr(first, "down_proj", None) or getattr(first, "w2")
        return down.weight.shape[1], _activation_name(first.act_fn, "hidden_act")
    return experts.down_proj.shape[-1], _activation_name(experts.act_fn, "hidden_act")


def _hf_config_of(block: nn.Module):
    """The transformers config a block was built from (experts modules keep it in transformers 5, DeepSeek-V4's
    shared expert too), or None."""
    for holder in (block, block.experts, getattr(block, "shared_experts", None)):
        config = getattr(holder, "config", None)
        if config is not None:
            return config
    return None


# Config fields that size the layer's weights (_weight_shapes): the layer takes the block's, so an override may not
# change what they make.
_FIXED_BY_WEIGHTS = ("hidden_size", "expert_hidden_size", "num_routed_experts", "num_shared_experts",
                     "shared_expert_hidden_size", "shared_expert_gate", "hash_vocab_size")


def config_from_hf(block: nn.Module, hf_config=None, **overrides) -> MoEConfig:
    """The :class:`MoEConfig` with the same routing math, sizes and activation as transformers' MoE ``block``
    (``hf_config``: the model's config, for blocks that do not keep it; it gives ``initializer_range``).

    Raises TypeError for an unsupported block and ValueError naming the transformers config field for a
    configuration the layer cannot reproduce, or for overrides that would change a size the block's weights fix
    (``hidden_size``, ``expert_hidden_size``, ``num_routed_experts``, the shared experts' width and gate,
    ``hash_vocab_size``; ``num_shared_experts=2`` with the block's width is accepted).
    """
    family = family_of(block)
    biases = [name for name, _ in block.named_parameters() if name.endswith("bias")]
    if biases:
        raise ValueError(f"from_hf: {type(block).__name__} has bias parameters {biases} (mlp_bias=True); the "
                         f"layer's experts have none")
    E, H = _router_weight(block).shape
    I, activation = _expert_sizes(block, family)
    shared = getattr(block, family.shared) if family.shared else None
    shared_width = shared.gate_proj.weight.shape[0] if shared is not None else 0
    if shared is not None and shared_width == 0:
        raise ValueError(f"from_hf: {type(block).__name__} has a zero-width shared expert ({family.shared_field}=0); "
                         f"the layer has no such expert (its stock checkpoint keys would be lost), so it is not "
                         f"supported")
    if shared is not None and _activation_name(shared.act_fn, "hidden_act") != activation:
        raise ValueError("from_hf: the shared and routed experts use different activations; the layer uses one")
    hf_config = hf_config if hf_config is not None else _hf_config_of(block)
    fields = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E,
                  top_k=_find(block, "top_k", "num_experts_per_tok"), num_shared_experts=1 if shared_width else 0,
                  aux_loss_alpha=0.0, hidden_act=activation)
    if getattr(hf_config, "initializer_range", None):
        fields["initializer_range"] = float(hf_config.initializer_range)
    if shared_width:
        fields["shared_expert_hidden_size"] = shared_width
    fields.update(family.fields(block))
    try:
        held = _weight_shapes(MoEConfig(**fields))
        cfg = MoEConfig(**{**fields, **overrides})
    except ConfigError as err:
        raise ConfigError(f"from_hf: {type(block).__name__}: {err}") from None
    changed = {k: (v, held[k]) for k, v in _weight_shapes(cfg).items() if v != held[k]}
    if changed:
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items() if k in _FIXED_BY_WEIGHTS)
        raise ValueError(f"from_hf: {type(block).__name__}: the overrides {given} would make the layer's "
                         + ", ".join(f"{k} {v!r} where the block's weights have {w!r}" for k, (v, w) in changed.items())
                         + "; the layer takes the block's weights")
    return cfg


def _weight_shapes(cfg: MoEConfig) -> Dict[str, Any]:
    return {"hidden_size": cfg.hidden_size, "expert_hidden_size": cfg.expert_hidden_size,
            "num_routed_experts": cfg.num_routed_experts, "shared experts' width": cfg.shared_width,
            "shared_expert_gate": bool(cfg.shared_expert_gate and cfg.shared_width),
            "hash_vocab_size": cfg.hash_vocab_size}

