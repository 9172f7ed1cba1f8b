"""Hugging Face transformers interop: convert MoE blocks, replace them in a model, turn dense MLPs into MoE.

transformers is optional: nothing here imports it at module import; blocks are recognised by class name.
Supported blocks (transformers >= 4.57 per-expert ModuleList layout and v5 fused 3-D experts):
``DeepseekV3MoE``, ``DeepseekV2Moe``, ``MixtralSparseMoeBlock``, ``Qwen2MoeSparseMoeBlock``.

Legend: H hidden size, I expert width, E routed experts, F dense MLP width.
"""
from __future__ import annotations


from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layer import DeepSeekMoELayer

SUPPORTED_BLOCKS = ("DeepseekV3MoE", "DeepseekV2Moe", "DeepseekV2MoE", "MixtralSparseMoeBlock",
                    "Qwen2MoeSparseMoeBlock")  # DeepseekV2MoE: transformers 4.57's spelling of DeepseekV2Moe


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


def _expert_width(experts: nn.Module) -> int:
    if isinstance(experts, nn.ModuleList):  # transformers < 5: one MLP module per expert
        first = experts[0]
        down = getattr(first, "down_proj", None) or getattr(first, "w2")
        return down.weight.shape[1]
    return experts.down_proj.shape[-1]


def _shared_module(block: nn.Module) -> Tuple[Optional[str], Optional[nn.Module]]:
    for name in ("shared_experts", "shared_expert"):
        module = getattr(block, name, None)
        if module is not None:
            return name, module
    return None, None


def config_from_hf(block: nn.Module, **overrides) -> MoEConfig:
    """The :class:`MoEConfig` with the same routing math and sizes as transformers' MoE ``block``."""
    kind = type(block).__name__
    if kind not in SUPPORTED_BLOCKS:
        raise TypeError(f"from_hf: {kind} is not a supported block; expected one of {SUPPORTED_BLOCKS}")
    E, H = block.gate.weight.shape
    I = _expert_width(block.experts)
    K = _find(block, "top_k", "num_experts_per_tok")
    _, shared = _shared_module(block)
    shared_width = shared.gate_proj.weight.shape[0] if shared is not None else 0
    fields = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=E, top_k=K,
                  num_shared_experts=1 if shared_width else 0, aux_loss_alpha=0.0)
    if shared_width:
        fields["shared_expert_hidden_size"] = shared_width
    if kind == "DeepseekV3MoE":
        fields.update(score_func="sigmoid", group_score="top2_sum", num_groups=_find(block, "num_group", "n_group"),
                      topk_groups=_find(block, "topk_group"), norm_topk_prob=bool(_find(block, "norm_topk_prob")),
                      routed_scaling_factor=float(_find(block, "routed_scaling_factor")))
    elif kind in ("DeepseekV2Moe", "DeepseekV2MoE"):
        method = _find(block, "topk_method", default="greedy")
        grouped = method == "group_limited_greedy"
        fields.update(score_func="softmax", group_score="max", num_groups=_find(block, "num_group", "n_group")
                      if grouped else 1, topk_groups=_find(block, "topk_group") if grouped else 1,
                      norm_topk_prob=False, routed_scaling_factor=float(_find(block, "routed_scaling_factor")))
    elif kind == "MixtralSparseMoeBlock":
        fields.update(score_func="softmax", norm_topk_prob=True)
    else:  # Qwen2MoeSparseMoeBlock
        fields.update(score_func="softmax", norm_topk_prob=bool(_find(block, "norm_topk_prob", default=False)),
                      shared_expert_gate=getattr(block, "shared_expert_gate", None) is not None)
    fields.update(overrides)
    return MoEConfig(**fields)


def _state_from_hf(block: nn.Module) -> Dict[str, torch.Tensor]:
    """The block's state_dict under our names (per-expert layouts are fused by RoutedExperts on load)."""
    name, _ = _shared_module(block)
    state = {}
    for key, value in block.state_dict().items():
        if name == "shared_expert" and key.startswith("shared_expert."):
            key = "shared_experts." + key[len("shared_expert."):]
        state[key] = value
    return state


def from_hf(block: nn.Module, **overrides) -> DeepSeekMoELayer:
    """A :class:`DeepSeekMoELayer` with the same math and the same weights as transformers' MoE ``block``.

    Router variant, group limits, correction bias, normalisation, scaling factor, shared experts and their
    gate carry over; balance losses are off (``aux_loss_alpha=0``) unless given in ``overrides``. The
    layer is on the block's device and dtype. Example::

        layer = dm.hf.from_hf(model.model.layers[3].mlp)
    """
    cfg = config_from_hf(block, **overrides)
    ref = block.gate.weight
    layer = DeepSeekMoELayer(cfg).to(device=ref.device, dtype=ref.dtype)
    state = _state_from_hf(block)
    state.setdefault("gate.e_score_correction_bias", torch.zeros(cfg.num_routed_experts, device=ref.device))
    layer.load_state_dict(state)
    layer.train(block.training)
    return layer


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

    The model computes the same function afterwards. Returns the number of blocks replaced.
    """
    return len(_replace(model, lambda name, m: type(m).__name__ in SUPPORTED_BLOCKS,
                        lambda name, m: from_hf(m, **overrides)))


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
    """
    if init not in ("upcycle", "random"):
        raise ValueError(f"moefy: init={init!r} is invalid; expected 'upcycle' or 'random'")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"moefy: config must be a MoEConfig, got {type(config).__name__}")
    if predicate is None:
        predicate = (lambda n, m: is_gated_mlp(m)) if init == "upcycle" else \
            (lambda n, m: is_gated_mlp(m) or is_plain_mlp(m))
    # Never descend into layers that are already MoE (their shared experts look like a gated MLP).
    moe_names = [n for n, m in model.named_modules() if isinstance(m, DeepSeekMoELayer)]
    matched = [name for name, m in model.named_modules() if name and not isinstance(m, DeepSeekMoELayer)
               and not any(name.startswith(o + ".") for o in moe_names) and predicate(name, m)]
    # Keep only outermost matches (an MLP inside a matched module is replaced with it).
    matched = [n for n in matched if not any(n.startswith(o + ".") for o in matched if o != n)]
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

    return len(_replace(model, lambda n, m: n in chosen, make))


# ------------------------------------------------------------------------------------------------ training
def moe_layers(model: nn.Module) -> Dict[str, DeepSeekMoELayer]:
    """{qualified name: layer} of every DeepSeekMoELayer in ``model``."""
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


def _attention_mask_2d(inputs) -> Optional[torch.Tensor]:
    """The batch's (B, S) ``attention_mask`` (0 = padding), or None when it has none of that shape."""
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _padding_from_attention_mask(inputs) -> Optional[torch.Tensor]:
    """(B, S) bool padding mask from a 2-D ``attention_mask``, None when nothing is padded."""
    mask = _attention_mask_2d(inputs)
    if mask is None:
        return None
    padding = mask == 0
    return padding if bool(padding.any()) else None


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
    from .padding import padding_mask

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
