"""A converted layer <-> its transformers block: the layer's construction, the inverse, and whole-model swaps.

A converted layer records its router logits as transformers' ``router_logits``, initialises through the model's
``init_weights`` and is saved by ``save_pretrained`` in the family's checkpoint layout (:mod:`.keymaps`).
transformers is imported only inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from ..config import MoEConfig
from ..experts import accelerate_offload_device
from ..model import adopt_init, replace_modules
from ..layer import DeepSeekMoELayer
from .families import (FAMILIES, SUPPORTED_BLOCKS, _hf_config_of, _router_weight, config_from_hf, family_of,
                       keeps_bias, replace_placeholder_table)
from .keymaps import (_load_from_family_layout, refresh_conversions, register_with_transformers, to_ours,
                      to_stock, with_layer_transforms)


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


def _copy_init_flags(block: nn.Module, layer: nn.Module) -> None:
    """A layer converted from an initialised block counts as initialised (``init_weights`` must not redraw it)."""
    if getattr(block, "_is_hf_initialized", False) or any(getattr(p, "_is_hf_initialized", False)
                                                          for p in block.parameters()):
        for m in layer.modules():
            m._is_hf_initialized = True
        for t in list(layer.parameters()) + list(layer.buffers()):
            t._is_hf_initialized = True


# ------------------------------------------------------------------------------------------ convert
def _check_not_offloaded(block: nn.Module, where: str) -> None:
    """ValueError where accelerate offloads ``block``'s weights: they live in its hooks' weight maps, not in the
    block, and a layer converted from it would hold none of them."""
    if any(accelerate_offload_device(m) is not None for m in block.modules()):
        raise ValueError(f"{where}: the {type(block).__name__}'s weights are offloaded by accelerate (a device_map "
                         f"with 'cpu' or 'disk' entries, cpu_offload or disk_offload), so the block does not hold "
                         f"them and a layer converted from it would lose them. Convert while loading instead: "
                         f"`with deepseek_moe.hf.converted_at_construction(): "
                         f"AutoModelForCausalLM.from_pretrained(path, device_map=...)`, or convert before offloading")


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
    model's ``experts_implementation`` choose the backend (:func:`deepseek_moe.backends.for_experts_implementation`;
    not for DBRX, whose experts do not take it). A meta-device block gives a meta-device layer.

    Raises TypeError for an unsupported block and ValueError naming the config field of a configuration the
    layer cannot reproduce, or the checkpoint keys it cannot map, or for a block whose weights accelerate
    offloads (convert while loading: :func:`converted_at_construction`). Example::

        layer = dm.hf.from_hf(model.model.layers[3].mlp)
    """
    family = family_of(block)
    cfg = config_from_hf(block, hf_config, **overrides)
    _check_not_offloaded(block, "from_hf")
    router_weight = _router_weight(block)
    expert_param = next(block.experts.parameters())
    with torch.device("meta"):
        layer = DeepSeekMoELayer(cfg)
    layer = layer.to_empty(device=router_weight.device).to(expert_param.dtype)
    if family.shared is not None:
        layer.name_shared_experts(family.shared)
    bias = torch.zeros_like(layer.gate.e_score_correction_bias)
    has_bias = keeps_bias(family, cfg)
    # A block without a correction bias keeps it out of checkpoints (the stock layout) while it is zero and cannot
    # move: bias balancing off, or a hash-routed layer (update_bias leaves its bias alone). calibrate_bias makes a
    # bias it sets persistent; while transformers loads a checkpoint into a converted model it is persistent, so a
    # saved bias comes back whatever the overrides, and afterwards only where it is non-zero (_loaded).
    moves = cfg.bias_update_speed > 0 and cfg.hash_vocab_size is None
    persistent = has_bias or moves or (_LOADING.depth > 0 and cfg.hash_vocab_size is None)
    layer.gate.register_buffer("e_score_correction_bias", bias, persistent=persistent)
    state = dict(block.state_dict())  # per-expert (4.57) layouts are fused by RoutedExperts on load
    to_ours(state, "", family, cfg.num_routed_experts)
    if not has_bias and persistent:
        state["gate.e_score_correction_bias"] = bias
    _load_every_key(layer, state, f"from_hf: {type(block).__name__}")
    replace_placeholder_table(layer)
    layer.hf_family = family
    layer.hf_block_class = type(block)
    layer.hf_config = hf_config if hf_config is not None else _hf_config_of(block)
    # Experts under transformers' @use_experts_implementation carry these flags (DBRX's do not: transformers
    # reports "eager" for it whatever is asked, so its layers keep their own backend).
    layer.follows_experts_implementation = hasattr(block.experts, "_is_expert_parallel")
    layer.register_load_state_dict_pre_hook(_load_from_family_layout)
    register_with_transformers()
    if cfg.hash_vocab_size is None:  # transformers records DeepSeek-V4's top-k routers only
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
    bias = layer.router.e_score_correction_bias
    has_bias = keeps_bias(family, layer.config)
    if not has_bias and bool(bias.ne(0).any()):
        raise ValueError(f"to_hf: the layer's correction bias is non-zero (set by calibration or bias balancing) and "
                         f"{layer.hf_block_class.__name__} has none: the stock block would route differently")
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    to_stock(state, "", family, layer.config.num_routed_experts)
    if not has_bias:
        state.pop("gate.e_score_correction_bias", None)
    expert_dtype = layer.routed_experts.gate_up_proj.dtype
    router_key = "router.layer.weight" if family.layout == "dbrx" else "gate.weight"
    if not family.router_fp32:
        state[router_key] = state[router_key].to(expert_dtype)
    with torch.device("meta"):
        block = (family.build or (lambda cls, config, cfg: cls(config)))(layer.hf_block_class, hf_config,
                                                                          layer.config)
    block.load_state_dict(state, assign=True)
    block.train(layer.training)
    return block


def replace_moe_blocks(model: nn.Module, **overrides) -> int:
    """Replace every supported transformers MoE block in ``model`` by :func:`from_hf` of it, in place.

    The model computes the same function afterwards (in training too), returns the same ``router_logits``,
    ``aux_loss`` and ``loss``, and ``model.init_weights()`` initialises the new layers. Returns the number of
    blocks replaced. Raises as :func:`from_hf`, before any block is replaced (a model whose MoE blocks accelerate
    offloads: convert it while loading, :func:`converted_at_construction`).
    """
    config = getattr(model, "config", None)
    match = lambda name, m: type(m).__name__ in SUPPORTED_BLOCKS  # noqa: E731
    for name, module in model.named_modules():  # every block is checked before the first one is replaced
        if match(name, module):
            config_from_hf(module, _hf_config_of(module) or config, **overrides)
            _check_not_offloaded(module, f"replace_moe_blocks ({name})")
    count = len(replace_modules(model, match, lambda name, m: from_hf(m, hf_config=_hf_config_of(m) or config,
                                                               **overrides)))
    if count:
        adopt_init(model)
        refresh_conversions(model)
    return count


class _Loading(threading.local):
    depth = 0  # from_pretrained calls inside converted_at_construction running on this thread


_LOADING = _Loading()


def _bias_outside_stock(module: nn.Module) -> bool:
    """A converted top-k layer of a family whose stock block has no correction bias."""
    family = getattr(module, "hf_family", None)
    return (family is not None and isinstance(module, DeepSeekMoELayer) and module.config.hash_vocab_size is None
            and not keeps_bias(family, module.config))


def _loaded(model: nn.Module, loading_info) -> None:
    """After transformers loaded a checkpoint into ``model`` (built inside :func:`converted_at_construction`): the
    bias of a converted layer whose stock block has none was read from the checkpoint where it was saved (a
    calibrated or balancing layer's), and where the checkpoint has none (a stock one) it is zero, which is the stock
    block's function: not a missing key. It stays in later checkpoints only where it is non-zero or moves."""
    missing = loading_info.missing_keys
    for name, layer in model.named_modules():
        if not _bias_outside_stock(layer):
            continue
        key = f"{name}.gate.e_score_correction_bias"
        if isinstance(missing, set):
            missing.discard(key)
        elif key in missing:
            missing.remove(key)
        bias = layer.router.e_score_correction_bias
        layer.router.keep_bias_in_checkpoints(
            layer.config.bias_update_speed > 0 or (not bias.is_meta and bool(bias.ne(0).any())))


@contextlib.contextmanager
def converted_at_construction(**overrides) -> Iterator[None]:
    """Within this context transformers builds every supported MoE block as :func:`from_hf` of it (``overrides``
    as there), as remote-code models and training frameworks convert at construction::

        with dm.hf.converted_at_construction():
            model = AutoModelForCausalLM.from_pretrained(path)   # stock or converted checkpoint

    The family's block class is replaced in its transformers modeling module for the duration, and every model
    built inside initialises the converted layers through its own ``init_weights``. Models built inside keep
    working after the context closes (``init_weights``, save, load, moves); models built outside are unaffected.
    Nested, the innermost context's ``overrides`` apply. A checkpoint's correction bias of a family whose stock
    block has none (saved by a calibrated or balancing layer) is loaded whatever the ``overrides``; a checkpoint
    without it (a stock one) leaves it zero, not reported missing. Before transformers 5.25, whose loader collects the
    layers' key layouts itself, the loader's ``get_model_conversion_mapping`` is extended by them for the duration
    too.
    """
    from transformers import PreTrainedModel, modeling_utils

    patched = []

    def factory(original):
        def build(config, *args, **kwargs):
            return from_hf(original(config, *args, **kwargs), hf_config=config, **overrides)
        build.stock_block = original  # an inner context wraps the stock class, not this function
        return build

    original_post_init = PreTrainedModel.post_init
    original_adjust = getattr(PreTrainedModel, "_adjust_missing_and_unexpected_keys", None)
    original_from_pretrained = PreTrainedModel.__dict__["from_pretrained"]

    def post_init(self, *args, **kwargs):
        adopt_init(self)
        return original_post_init(self, *args, **kwargs)

    def adjust(self, loading_info):  # the last step of from_pretrained's loading (transformers 5.19-5.25)
        original_adjust(self, loading_info)
        _loaded(self, loading_info)

    def from_pretrained(cls, *args, **kwargs):
        _LOADING.depth += 1
        try:
            return original_from_pretrained.__func__(cls, *args, **kwargs)
        finally:
            _LOADING.depth -= 1

    try:
        for family in FAMILIES:
            try:
                module = importlib.import_module(f"transformers.models.{family.name}.modeling_{family.name}")
            except ModuleNotFoundError:  # a family newer than this transformers (DeepSeek-V4: 5.25)
                continue
            for name in family.blocks:
                current = getattr(module, name, None)
                stock = getattr(current, "stock_block", current)
                if isinstance(stock, type):
                    patched.append((module, name, current))
                    setattr(module, name, factory(stock))
        PreTrainedModel.post_init = post_init
        if original_adjust is not None:
            patched.append((PreTrainedModel, "_adjust_missing_and_unexpected_keys", original_adjust))
            PreTrainedModel._adjust_missing_and_unexpected_keys = adjust
            patched.append((PreTrainedModel, "from_pretrained", original_from_pretrained))
            PreTrainedModel.from_pretrained = classmethod(from_pretrained)
        if not register_with_transformers() and hasattr(modeling_utils, "get_model_conversion_mapping"):
            original = modeling_utils.get_model_conversion_mapping
            patched.append((modeling_utils, "get_model_conversion_mapping", original))
            modeling_utils.get_model_conversion_mapping = with_layer_transforms(original)
        yield
    finally:
        PreTrainedModel.post_init = original_post_init
        for module, name, original in patched:
            setattr(module, name, original)


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
            if layer.config.hash_vocab_size is None:  # as from_hf: hash routers are not recorded
                router.register_forward_hook(_RecordOutput("router_logits"))
        return block

    count = len(replace_modules(model, lambda name, m: getattr(m, "hf_family", None) is not None, make))
    refresh_conversions(model)
    return count


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
    dbrx = next(family for family in FAMILIES if family.name == "dbrx")  # DBRX keeps MegaBlocks' dMoE layout
    to_ours(state, "", dbrx, E)
    ref = state["experts.gate_up_proj"]
    layer = DeepSeekMoELayer(cfg).to(device=ref.device, dtype=ref.dtype)
    state.setdefault("gate.e_score_correction_bias", layer.router.e_score_correction_bias)
    _load_every_key(layer, state, "from_megablocks: the state dict")
    return layer

