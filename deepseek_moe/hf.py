"""Hugging Face transformers interop: convert MoE blocks to DeepSeekMoE layers and back, turn dense MLPs into MoE.

transformers is optional: nothing here imports it at module import; blocks are recognised by class name.
Supported blocks (transformers 5 fused 3-D experts, and the per-expert ModuleList layout of transformers 4.57):

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
block's dtypes, initialises through the model's ``init_weights``, and saves in the family's checkpoint layout, so
``save_pretrained`` of a converted model loads into the stock class. Configurations it cannot reproduce raise
ValueError naming the field. docs/integration.md lists every behaviour and every stated difference.

Legend: H hidden size, I expert width, E routed experts, K experts per token, F dense MLP width.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backends.base import activate
from .config import ACTIVATIONS, MoEConfig
from .experts import RoutedExperts
from .layer import DeepSeekMoELayer
from .padding import _attention_mask_2d, attention_mask_padding
from .router import Router


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto :class:`DeepSeekMoELayer`.

    ``fields(block)`` returns the MoEConfig fields of its routing (raising ValueError for a configuration the layer
    cannot reproduce); ``has_bias``: the block has ``gate.e_score_correction_bias``; ``router_fp32``: transformers
    keeps its router weight fp32 in 16-bit models; ``shared``: the shared-expert attribute name and
    ``shared_field`` the config field of its width; ``layout``: "fused" (our names) or "dbrx" (MegaBlocks' stacked
    w1/v1/w2).
    """

    name: str
    blocks: Tuple[str, ...]
    fields: Callable[[nn.Module], Dict[str, Any]]
    has_bias: bool = False
    router_fp32: bool = False
    shared: Optional[str] = None
    shared_field: Optional[str] = None
    layout: str = "fused"


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
    probe = torch.cat([torch.linspace(-6, 6, 97), torch.linspace(-100, 100, 201)]).double()
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
    """The transformers config a block was built from (experts modules keep it in transformers 5), or None."""
    return getattr(block, "config", None) or getattr(block.experts, "config", None)


def config_from_hf(block: nn.Module, hf_config=None, **overrides) -> MoEConfig:
    """The :class:`MoEConfig` with the same routing math, sizes and activation as transformers' MoE ``block``
    (``hf_config``: the model's config, for blocks that do not keep it; it gives ``initializer_range``).

    Raises TypeError for an unsupported block and ValueError naming the transformers config field for a
    configuration the layer cannot reproduce.
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
    fields.update(overrides)
    return MoEConfig(**fields)


# ----------------------------------------------------------------------------------- checkpoint layouts
def _dbrx_to_ours(state: Dict[str, torch.Tensor], prefix: str, E: int) -> None:
    """MegaBlocks/DBRX keys (``router.layer.weight``, ``experts.mlp.w1/v1/w2`` of shape (E·I, H)) -> ours, in place."""
    if prefix + "router.layer.weight" in state:
        state[prefix + "gate.weight"] = state.pop(prefix + "router.layer.weight")
    names = [prefix + "experts.mlp." + n for n in ("w1", "v1", "w2")]
    if all(n in state for n in names):
        w1, v1, w2 = (state.pop(n) for n in names)
        H = w1.shape[-1]
        state[prefix + "experts.gate_up_proj"] = torch.cat([w1.reshape(E, -1, H), v1.reshape(E, -1, H)], dim=1)
        state[prefix + "experts.down_proj"] = w2.reshape(E, -1, H).transpose(1, 2).contiguous()


def _ours_to_dbrx(state: Dict[str, torch.Tensor], prefix: str) -> None:
    state[prefix + "router.layer.weight"] = state.pop(prefix + "gate.weight")
    gate_up, down = state.pop(prefix + "experts.gate_up_proj"), state.pop(prefix + "experts.down_proj")
    E, J, H = gate_up.shape
    I = J // 2
    state[prefix + "experts.mlp.w1"] = gate_up[:, :I].reshape(E * I, H)
    state[prefix + "experts.mlp.v1"] = gate_up[:, I:].reshape(E * I, H)
    state[prefix + "experts.mlp.w2"] = down.transpose(1, 2).reshape(E * I, H)


def _rename_prefix(state: Dict[str, torch.Tensor], old: str, new: str) -> None:
    for key in [k for k in state if k.startswith(old)]:
        state[new + key[len(old):]] = state.pop(key)


def _family_to_ours(state: Dict[str, torch.Tensor], prefix: str, family: Family, E: int) -> None:
    """A block's checkpoint keys under ``prefix`` -> ours, in place (ours pass unchanged)."""
    if family.layout == "dbrx":
        _dbrx_to_ours(state, prefix, E)
    if family.shared and family.shared != "shared_experts":
        _rename_prefix(state, prefix + family.shared + ".", prefix + "shared_experts.")


def _save_in_family_layout(module: DeepSeekMoELayer, state, prefix, local_metadata) -> None:
    """state_dict post-hook of converted layers: the family's own key names and tensor layout."""
    family = module.hf_family
    if family.layout == "dbrx":
        _ours_to_dbrx(state, prefix)
    if family.shared and family.shared != "shared_experts":
        _rename_prefix(state, prefix + "shared_experts.", prefix + family.shared + ".")


def _load_from_family_layout(module: DeepSeekMoELayer, state, prefix, *args) -> None:
    """load_state_dict pre-hook of converted layers: accept the family's layout (and ours)."""
    _family_to_ours(state, prefix, module.hf_family, module.config.num_routed_experts)


# ------------------------------------------------------------------------------------ transformers hooks
def _install_output_capturing_hook():
    """transformers' function that installs its output-recording forward hook, or None (transformers < 5)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        return None
    return (getattr(output_capturing, "install_output_capuring_hook", None)
            or getattr(output_capturing, "install_output_capturing_hook", None))


class _RecordOutput:
    """A forward hook that runs transformers' own output-recording hook for ``key``, as its ``OutputRecorder``
    installs on a stock router. transformers' hook is a closure, which pickle cannot save: it is left out of the
    pickled state and built again on loading, so a converted model stays picklable."""

    def __init__(self, key: str):
        self.__setstate__({"key": key})

    def __getstate__(self):
        return {"key": self.key}

    def __setstate__(self, state):
        self.key = state["key"]
        holder = nn.Module()
        _install_output_capturing_hook()(holder, self.key, 0)
        (self._hook,) = holder._forward_hooks.values()

    def __call__(self, module, args, output):
        return self._hook(module, args, output)


def _record_router_logits(layer: DeepSeekMoELayer) -> None:
    """Record ``layer.logits_probe``'s output as transformers' ``router_logits`` (transformers >= 5; earlier
    versions record none)."""
    if _install_output_capturing_hook() is not None:
        layer.logits_probe.register_forward_hook(_RecordOutput("router_logits"))


def _init_weights_with_moe(self, module: nn.Module) -> None:
    """A transformers model's ``_init_weights``, extended to the converted layers' own modules (set, with ``self``
    bound, on each PreTrainedModel that holds one; transformers' init guards skip weights that were loaded)."""
    if isinstance(module, (Router, RoutedExperts)):
        module.reset_parameters()
    elif isinstance(module, DeepSeekMoELayer):
        module.reset_counters()
    else:
        type(self)._init_weights(self, module)


def _adopt_init(model: nn.Module) -> None:
    """Let ``model.init_weights()`` (and transformers' meta-device materialisation) initialise our layers too."""
    for sub in model.modules():
        if hasattr(sub, "_initialize_weights") and hasattr(type(sub), "_init_weights"):
            # A partial, not a bound method: it pickles (a bound method pickles by its name on the instance).
            sub._init_weights = functools.partial(_init_weights_with_moe, sub)


def _copy_init_flags(block: nn.Module, layer: nn.Module) -> None:
    """A layer converted from an initialised block counts as initialised (``init_weights`` must not redraw it)."""
    if getattr(block, "_is_hf_initialized", False) or any(getattr(p, "_is_hf_initialized", False)
                                                          for p in block.parameters()):
        for m in layer.modules():
            m._is_hf_initialized = True
        for t in list(layer.parameters()) + list(layer.buffers()):
            t._is_hf_initialized = True


# ------------------------------------------------------------------------------------------ convert
def _load_every_key(layer: DeepSeekMoELayer, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``layer``; ValueError (starting with ``source``) when a key is left over on either side."""
    result = layer.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source} has weights the layer cannot hold (unexpected: {result.unexpected_keys}, "
                         f"missing: {result.missing_keys})")


def from_hf(block: nn.Module, hf_config=None, **overrides) -> DeepSeekMoELayer:
    """A :class:`DeepSeekMoELayer` with the same function and the same weights as transformers' MoE ``block``.

    Router variant, group limits, correction bias, normalisation, scaling factor, jitter, expert activation,
    shared experts and their gate carry over; the layer's own balance losses are off (``aux_loss_alpha=0``: the
    model computes its balance loss from the recorded router logits) unless given in ``overrides``. Dtypes follow
    the block: experts and shared experts in the experts' dtype, the router in fp32 (or wider). ``hf_config``:
    the model's config, for blocks that do not keep it (DBRX); it lets :func:`to_hf` rebuild the block and the
    model's ``experts_implementation`` steer backend "auto". A meta-device block gives a meta-device layer.

    Raises TypeError for an unsupported block and ValueError naming the config field of a configuration the
    layer cannot reproduce, or the checkpoint keys it cannot map. Example::

        layer = dm.hf.from_hf(model.model.layers[3].mlp)
    """
    family = family_of(block)
    cfg = config_from_hf(block, hf_config, **overrides)
    router_weight = _router_weight(block)
    expert_param = next(block.experts.parameters())
    with torch.device("meta"):
        layer = DeepSeekMoELayer(cfg)
    layer = layer.to_empty(device=router_weight.device).to(expert_param.dtype)
    bias = torch.zeros_like(layer.gate.e_score_correction_bias)
    # A family without a correction bias keeps it out of checkpoints (the stock layout) while it cannot move.
    layer.gate.register_buffer("e_score_correction_bias", bias,
                               persistent=family.has_bias or cfg.bias_update_speed > 0)
    state = dict(block.state_dict())  # per-expert (4.57) layouts are fused by RoutedExperts on load
    _family_to_ours(state, "", family, cfg.num_routed_experts)
    if not family.has_bias and cfg.bias_update_speed > 0:
        state["gate.e_score_correction_bias"] = bias
    _load_every_key(layer, state, f"from_hf: {type(block).__name__}")
    layer.hf_family = family
    layer.hf_block_class = type(block)
    layer.hf_config = hf_config if hf_config is not None else _hf_config_of(block)
    layer.register_state_dict_post_hook(_save_in_family_layout)
    layer.register_load_state_dict_pre_hook(_load_from_family_layout)
    _record_router_logits(layer)
    _copy_init_flags(block, layer)
    layer.train(block.training)
    return layer


def to_hf(layer: DeepSeekMoELayer, hf_config=None) -> nn.Module:
    """The stock transformers block of the family ``layer`` was converted from, with its weights (the inverse of
    :func:`from_hf`). ``hf_config``: the model's config, when the layer does not hold it (DBRX).

    Raises ValueError when the layer was not converted from transformers or its function cannot be expressed
    by the stock block (a non-zero correction bias where the family has none).
    """
    family = getattr(layer, "hf_family", None)
    if family is None:
        raise ValueError("to_hf: this layer was not made by deepseek_moe.hf.from_hf; it has no transformers block")
    hf_config = hf_config if hf_config is not None else layer.hf_config
    if hf_config is None:
        raise ValueError(f"to_hf: pass hf_config= (the model's config); a {layer.hf_block_class.__name__} block "
                         f"does not keep it")
    bias = layer.gate.e_score_correction_bias
    if not family.has_bias and bool(bias.ne(0).any()):
        raise ValueError(f"to_hf: the layer's correction bias is non-zero (bias balancing was on) and "
                         f"{layer.hf_block_class.__name__} has none: the stock block would route differently")
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    if not family.has_bias:
        state.pop("gate.e_score_correction_bias", None)
    expert_dtype = layer.experts.gate_up_proj.dtype
    router_key = "router.layer.weight" if family.layout == "dbrx" else "gate.weight"
    if not family.router_fp32:
        state[router_key] = state[router_key].to(expert_dtype)
    with torch.device("meta"):
        block = layer.hf_block_class(hf_config)
    block.load_state_dict(state, assign=True)
    block.train(layer.training)
    return block


def _replace(model: nn.Module, match: Callable[[str, nn.Module], bool],
             make: Callable[[str, nn.Module], nn.Module]) -> List[str]:
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if match(full, child):
                setattr(parent, child_name, make(full, child))
                replaced.append(full)
    return replaced


def replace_moe_blocks(model: nn.Module, **overrides) -> int:
    """Replace every supported transformers MoE block in ``model`` by :func:`from_hf` of it, in place.

    The model computes the same function afterwards (in training too), returns the same ``router_logits``,
    ``aux_loss`` and ``loss``, and ``model.init_weights()`` initialises the new layers. Returns the number of
    blocks replaced.
    """
    config = getattr(model, "config", None)
    match = lambda name, m: type(m).__name__ in SUPPORTED_BLOCKS  # noqa: E731
    for module in model.modules():  # every block is checked before the first one is replaced
        if match("", module):
            config_from_hf(module, _hf_config_of(module) or config, **overrides)
    count = len(_replace(model, match, lambda name, m: from_hf(m, hf_config=_hf_config_of(m) or config,
                                                               **overrides)))
    if count:
        _adopt_init(model)
    return count


def restore_moe_blocks(model: nn.Module) -> int:
    """Replace every layer made by :func:`from_hf` in ``model`` by :func:`to_hf` of it (the stock block), in
    place. Returns the number of layers replaced."""
    config = getattr(model, "config", None)
    hooked = [name for name, m in model.named_modules() if getattr(m, "_output_capturing_hooks_installed", False)]

    def make(name: str, layer: DeepSeekMoELayer) -> nn.Module:
        block = to_hf(layer, layer.hf_config or config)
        if any(h == "" or name.startswith(h + ".") for h in hooked):
            # transformers hooks a model's routers once, at its first recording forward: hook the new one alike.
            router = block.router if layer.hf_family.layout == "dbrx" else block.gate
            router.register_forward_hook(_RecordOutput("router_logits"))
        return block

    return len(_replace(model, lambda name, m: getattr(m, "hf_family", None) is not None, make))


def from_megablocks(state_dict: Dict[str, torch.Tensor], top_k: int, hidden_act: str = "gelu_pytorch_tanh",
                    normalize_expert_weights: Optional[float] = None, **overrides) -> DeepSeekMoELayer:
    """A :class:`DeepSeekMoELayer` holding a MegaBlocks dMoE GLU ``state_dict`` (megablocks 0.10 ``dMoE`` with
    ``mlp_type="glu"``): ``router.layer.weight`` (E, H), ``experts.mlp.w1``/``v1``/``w2`` (E·I, H) each, where
    expert e computes ``(act(x·w1_eᵀ) * x·v1_eᵀ) · w2_e``, and an optional output bias ``experts.bias``.

    The arguments are megablocks' ``Arguments`` the state dict does not record: ``top_k`` (``moe_top_k``),
    ``hidden_act`` (its ``activation_fn``; megablocks' default is GELU with the tanh approximation) and
    ``normalize_expert_weights`` (``moe_normalize_expert_weights``: None or 1). Raises ValueError for a non-zero
    output bias, another normalisation, or missing/extra keys. megablocks' router jitter (``moe_jitter_eps``)
    scales the router's input only and is not reproduced: the layer is built without jitter.
    """
    if normalize_expert_weights not in (None, 1, 1.0):
        raise ValueError(f"from_megablocks: normalize_expert_weights={normalize_expert_weights!r} is not "
                         f"supported; expected None or 1 (sum normalisation)")
    state = dict(state_dict)
    bias = state.pop("experts.bias", None)
    if bias is not None and bool(bias.ne(0).any()):
        raise ValueError("from_megablocks: experts.bias (the dMoE output bias) is non-zero; the layer has no output "
                         "bias")
    if "router.layer.weight" not in state:
        raise ValueError(f"from_megablocks: no router.layer.weight in the state dict (keys: {sorted(state)})")
    E, H = state["router.layer.weight"].shape
    I = state["experts.mlp.w1"].shape[0] // E
    cfg = MoEConfig(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, top_k=top_k, num_shared_experts=0,
                    score_func="softmax", norm_topk_prob=normalize_expert_weights is not None, hidden_act=hidden_act,
                    aux_loss_alpha=0.0, **overrides)
    _dbrx_to_ours(state, "", E)
    ref = state["experts.gate_up_proj"]
    layer = DeepSeekMoELayer(cfg).to(device=ref.device, dtype=ref.dtype)
    state.setdefault("gate.e_score_correction_bias", layer.gate.e_score_correction_bias)
    _load_every_key(layer, state, "from_megablocks: the state dict")
    return layer


# ------------------------------------------------------------------------------------------------------ moefy
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

    count = len(_replace(model, lambda n, m: n in chosen, make))
    if count:
        _adopt_init(model)
    return count


# ------------------------------------------------------------------------------------------------ training
def moe_layers(model: nn.Module) -> Dict[str, DeepSeekMoELayer]:
    """{qualified name: layer} of every DeepSeekMoELayer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DeepSeekMoELayer)}


def update_biases(model: nn.Module) -> None:
    """Aux-loss-free balancing step on every DeepSeekMoELayer (call after ``optimizer.step()``)."""
    for layer in moe_layers(model).values():
        layer.update_bias()


def calibrate_routing(model: nn.Module, *args, **kwargs) -> Dict[str, Dict[str, float]]:
    """Run ``model(*args, **kwargs)`` once without gradient, in eval mode, and before each DeepSeekMoELayer runs,
    set its balancing bias so that its own inputs load its experts evenly (:meth:`DeepSeekMoELayer.calibrate_bias`).
    Layers are calibrated in the order they run, so each sees inputs routed by the calibrated layers before it; a
    layer the forward calls more than once is calibrated on its first call.

    Meant for right after :func:`moefy` with ``init="upcycle"`` (docs/integration.md, "Routing right after
    upcycling"). Padding is not counted: a 2-D ``attention_mask`` keyword becomes the layers' padding mask (as in
    :func:`aux_loss_trainer`), and a mask set with :func:`deepseek_moe.padding_mask` or passed to a layer is used.
    With torch.distributed initialised, call it on every rank (each with its own batch): loads are summed over
    the world and every rank gets the same bias. Modes and the layers' last-forward results are left as they
    were (:func:`deepseek_moe.analysis.inspecting`). Returns ``{layer name: {"max_vio_before": ..,
    "max_vio_after": ..}}`` for the layers that ran. Raises ValueError when the model has no DeepSeekMoELayer.
    """
    from .analysis import inspecting

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

    handles = [layer.register_forward_pre_hook(calibrate(name), with_kwargs=True) for name, layer in layers.items()]
    try:
        with inspecting(model), torch.no_grad(), attention_mask_padding(kwargs):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return results


def expert_load(model: nn.Module) -> Dict[str, float]:
    """Per-layer load statistics of the last forward, flat for loggers: ``{"<name>/max_vio": .., "<name>/cv": ..}``."""
    out = {}
    for name, layer in moe_layers(model).items():
        for key, value in layer.last_stats.items():
            out[f"{name}/{key}"] = float(value)
    return out


def trainer_callback():
    """A ``transformers.TrainerCallback`` that runs :func:`update_biases` after every optimizer step (the
    aux-loss-free bias step, and the end of the global-batch balance window). :func:`aux_loss_trainer` adds it by
    itself; add it yourself to other Trainers. Needs transformers."""
    from transformers import TrainerCallback

    class DeepSeekMoECallback(TrainerCallback):
        deepseek_moe = True

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                update_biases(model)

    return DeepSeekMoECallback()


def _real_tokens(inputs) -> int:
    """Tokens the MoE layers route in one batch: the attention mask's ones, else every (B, S) input position."""
    mask = _attention_mask_2d(inputs)
    if mask is not None:
        return int(mask.ne(0).sum())
    for key in ("input_ids", "inputs_embeds"):
        t = inputs.get(key)
        if isinstance(t, torch.Tensor):
            return t.shape[0] * t.shape[1]
    return 0


def aux_loss_trainer(trainer_cls=None):
    """A subclass of ``transformers.Trainer`` (or of ``trainer_cls``) for models with DeepSeekMoE layers:

    * its loss adds ``dm.aux_loss(model)`` weighted by the micro-batch's share of the real tokens of the whole
      accumulated batch (counted from the attention masks of all its micro-batches, over all ranks when
      ``average_tokens_across_devices`` is on), compensating the Trainer's own scaling of the loss. So 4
      micro-batches of 1 sequence and 1 of 4 give the same gradients for the balance scopes whose loss does not
      depend on how the batch is split ("sequence", and the z-loss); the "micro_batch" scope's f is per
      micro-batch by definition;
    * a 2-D ``attention_mask`` in the inputs becomes the layers' padding mask (:func:`deepseek_moe.padding_mask`);
    * :func:`trainer_callback` is added, so biases update and balance windows close after every optimizer step;
    * its logs carry ``moe/<layer>/max_vio`` for every DeepSeekMoE layer (from the last forward).
    """
    from transformers import Trainer

    from .layer import aux_loss
    from .padding import _padding_from_attention_mask, padding_mask

    base = trainer_cls or Trainer

    class DeepSeekMoETrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._moe_window_tokens = None
            if not any(getattr(cb, "deepseek_moe", False) for cb in self.callback_handler.callbacks):
                self.add_callback(trainer_callback())

        def _averages_tokens_across_devices(self) -> bool:
            return bool(self.args.average_tokens_across_devices and self.args.world_size > 1)

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            tokens = torch.tensor(sum(_real_tokens(b) for b in batch_samples), device=device)
            if self._averages_tokens_across_devices():
                tokens = self.accelerator.gather(tokens).sum()
            self._moe_window_tokens = int(tokens)
            return batch_samples, num_items_in_batch

        def training_step(self, model, inputs, num_items_in_batch=None, **kwargs):
            # Around forward and backward: activation checkpointing re-runs the forward inside backward.
            with padding_mask(_padding_from_attention_mask(inputs)):
                return super().training_step(model, inputs, num_items_in_batch, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            with padding_mask(_padding_from_attention_mask(inputs)):
                return super().prediction_step(model, inputs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch, **kwargs)
            if model.training:
                loss = loss + aux_loss(model).to(loss.device) * self._aux_loss_weight(inputs, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

        def _aux_loss_weight(self, inputs, num_items_in_batch) -> float:
            """This micro-batch's token share, times what the Trainer later divides the loss by."""
            if not self._moe_window_tokens:
                return 1.0
            weight = _real_tokens(inputs) / self._moe_window_tokens
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                          or self.compute_loss_func is not None)
            if not scaled:  # the Trainer divides the whole loss by the accumulation steps
                return weight * self.current_gradient_accumulation_steps
            if self._averages_tokens_across_devices() and num_items_in_batch is not None:
                weight *= self.accelerator.num_processes // self.get_tp_size()  # the Trainer's loss scale
            return weight

        def log(self, logs, *args, **kwargs):
            logs = {**logs, **{f"moe/{k}": v for k, v in expert_load(self.model).items() if k.endswith("max_vio")}}
            return super().log(logs, *args, **kwargs)

    return DeepSeekMoETrainer
