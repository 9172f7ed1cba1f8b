"""Sharded checkpoints of expert-parallel models through ``torch.distributed.checkpoint`` (DCP).

A sharded layer's plain ``state_dict()`` holds this rank's experts only, under the full model's keys and with
nothing that says which experts they are: saved with DCP from several ranks, the shards would collide. The state
dict of :func:`checkpoint_state_dict` gives every expert-parallel layer's routed-expert weights their global shape
and placement instead: a DTensor sharded on the expert dimension over the layer's expert-parallel group (as
torchtitan does), whose local tensor *is* the parameter. With FSDP2 on top (:func:`fully_shard_moe`), the placement
is the 2-D one, the experts split over the expert-parallel group and each rank's share again over its FSDP mesh.
DCP then records each shard's global offset, and loading reshards: a checkpoint saved at EP = W loads at any EP
whose size divides E, and into an unsharded model (EP = 1), in place (``dcp.load`` writes into the parameters).

The optimizer's state of those weights (Adam's moments) is sharded the same way by
:func:`checkpoint_optimizer_state_dict`. Example (every rank)::

    state = {"model": dm.parallel.checkpoint_state_dict(model),
             "optim": dm.parallel.checkpoint_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=path)          # ... later, possibly at another EP size:
    state = {"model": dm.parallel.checkpoint_state_dict(model),
             "optim": dm.parallel.checkpoint_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    dm.parallel.load_optimizer_state_dict(model, optimizer, state["optim"])
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist
from torch import nn

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _device_type(group) -> str:
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def _placement(ep_group, param: torch.Tensor):
    """(local tensor, mesh, placements) of an expert weight sharded over ``ep_group``, and over FSDP2's mesh too
    when ``param`` is already FSDP2's DTensor."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return param.detach(), DeviceMesh.from_group(ep_group, _device_type(ep_group)), [Shard(0)]
    fsdp_mesh = param.device_mesh
    if fsdp_mesh.ndim != 1 or list(param.placements) != [Shard(0)]:
        raise NotImplementedError(f"checkpoint_state_dict: expert weights placed {param.placements} over a "
                                  f"{fsdp_mesh.ndim}-D mesh; expected FSDP2's Shard(0) over one mesh dimension "
                                  f"(fully_shard_moe's expert_mesh)")
    dp_group = fsdp_mesh.get_group()
    W_ep, W_dp = dist.get_world_size(ep_group), dist.get_world_size(dp_group)
    if W_ep * W_dp != dist.get_world_size():
        raise NotImplementedError(f"checkpoint_state_dict: expert-parallel ({W_ep}) x FSDP ({W_dp}) ranks must make "
                                  f"up the world ({dist.get_world_size()}): other parallel dimensions are not "
                                  f"supported")
    coords = [None] * dist.get_world_size()
    dist.all_gather_object(coords, (dist.get_rank(ep_group), dist.get_rank(dp_group), dist.get_rank()))
    ranks = torch.empty(W_ep, W_dp, dtype=torch.int64)
    for ep_rank, dp_rank, rank in coords:
        ranks[ep_rank, dp_rank] = rank
    mesh = DeviceMesh.from_group([ep_group, dp_group], _device_type(ep_group), mesh=ranks,
                                 mesh_dim_names=("ep", "dp"))
    return param.to_local().detach(), mesh, [Shard(0), Shard(0)]


def checkpoint_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with the routed-expert weights of every expert-parallel layer
    (:func:`~deepseek_moe.parallel.shard_experts`, also under FSDP2's :func:`fully_shard_moe`) as DTensors of global
    shape (E, ...) sharded on dim 0, sharing storage with the parameters; every other entry as ``state_dict()``
    gives it (layers that are not sharded keep plain, full tensors). Keys are the state dict's own, so wrappers
    that rename them (activation checkpointing's ``checkpoint_wrapper``) keep working. Pass it to
    ``torch.distributed.checkpoint.save`` / ``load`` on every rank (collective when a layer is sharded).

    Raises NotImplementedError for expert weights placed otherwise than by ``shard_experts`` (and FSDP2 over one
    mesh dimension covering, with the expert-parallel group, the whole world), and for adapters on the sharded
    experts (PEFT's LoRA factors: each rank's cover its own experts)."""
    state = model.state_dict()
    keys_of: Dict[int, List[str]] = {}  # storage -> every key of it (a layer used twice has two)
    for key, value in state.items():
        local = _local(value)
        if local.numel():
            keys_of.setdefault(local.data_ptr(), []).append(key)
    for layer, name, param in _sharded_expert_weights(model, "checkpoint_state_dict"):
        keys = keys_of.get(_local(param).data_ptr())
        if not keys:
            raise ValueError(f"checkpoint_state_dict: experts.{name} of a sharded layer is not in "
                             f"model.state_dict() (a wrapper that copies it?)")
        sharded = _global(layer, param)
        state.update((key, sharded) for key in keys)
    return state


def checkpoint_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """torch's ``get_optimizer_state_dict(model, optimizer)`` (keyed by parameter names) with the state of every
    expert-parallel layer's routed-expert weights (each tensor held per expert: Adam's ``exp_avg``, ``exp_avg_sq``,
    Adafactor's factored moments) as DTensors of global shape sharded as :func:`checkpoint_state_dict` shards the
    weights, sharing storage with the optimizer's state; scalars (``step``) and every other entry as torch gives
    them. Without it a rank's moments and another's share one key and DCP keeps one writer's per tensor: resumed
    ranks mix moments.
    Pass it to ``dcp.save`` / ``dcp.load`` on every rank (collective), then :func:`load_optimizer_state_dict`.
    A checkpoint saved at EP = W loads at any EP size dividing E, and unsharded.

    Creates the optimizer's state where it has none yet (as torch's function does). Raises as
    :func:`checkpoint_state_dict`, and ValueError for an optimizer holding parameters the model does not (built
    before ``shard_experts``, which replaces the expert weights)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    held = {id(p) for p in model.parameters()}
    stray = sum(id(p) not in held for group in optimizer.param_groups for p in group["params"])
    if stray:
        raise ValueError(f"checkpoint_optimizer_state_dict: the optimizer holds {stray} parameter(s) the model does "
                         f"not (an optimizer built before shard_experts, which replaces the expert weights, or over "
                         f"another model): build it over model.parameters() after sharding")
    osd = get_optimizer_state_dict(model, optimizer)
    layer_of = {}  # storage of a per-expert state tensor -> its layer
    for layer, _, param in _sharded_expert_weights(model, "checkpoint_optimizer_state_dict"):
        for value in optimizer.state.get(param, {}).values():
            if _per_expert(value, param):
                layer_of[_local(value).data_ptr()] = layer

    def sharded(value):
        layer = layer_of.get(_local(value).data_ptr()) if isinstance(value, torch.Tensor) and value.numel() else None
        return value if layer is None else _global(layer, value)
    # New dicts: torch's per-parameter dicts may be the optimizer's own.
    return {**osd, "state": {key: {field: sharded(value) for field, value in per_param.items()}
                             for key, per_param in osd["state"].items()}}


def load_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """Finish loading ``state`` (:func:`checkpoint_optimizer_state_dict` of ``model`` and ``optimizer``, filled by
    ``dcp.load``) into ``optimizer``. ``dcp.load`` wrote its tensors in place, into the optimizer's own state (the
    sharded ones into this rank's shards); this sets the rest, the param groups (learning rates and the other
    hyperparameters), through torch's ``set_optimizer_state_dict``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    current = get_optimizer_state_dict(model, optimizer)  # the optimizer's tensors as they are now: loaded
    set_optimizer_state_dict(model, optimizer, {"state": current["state"], "param_groups": state["param_groups"]})


def _sharded_expert_weights(model: nn.Module, where: str) -> Iterator[Tuple[nn.Module, str, torch.Tensor]]:
    """(layer, name, parameter) of every routed-expert weight of the expert-parallel layers in ``model``; refuses
    adapters on them (:func:`~deepseek_moe.parallel.expert_parallel.refuse_expert_adapters`)."""
    from ..layer import DeepSeekMoELayer
    from .expert_parallel import refuse_expert_adapters

    for layer in model.modules():
        if not isinstance(layer, DeepSeekMoELayer) or layer.expert_parallel is None:
            continue
        refuse_expert_adapters(layer, where)
        for name in _EXPERT_WEIGHTS:
            yield layer, name, getattr(layer.routed_experts, name)


def _per_expert(value, param: torch.Tensor) -> bool:
    """An optimizer state tensor held per local expert: as many dimensions as the weight and its leading size
    (Adam's moments: the weight's shape; Adafactor's factored row and column moments (E/W, out, 1), (E/W, 1, in))."""
    return (isinstance(value, torch.Tensor) and value.numel() > 0 and value.dim() == param.dim()
            and value.shape[0] == param.shape[0])


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _global(layer, value: torch.Tensor):
    """``value`` (an expert weight, or an optimizer state tensor of one, :func:`_per_expert`) as the DTensor of
    global shape (E, ...) sharded over the layer's expert-parallel group (and FSDP2's mesh), sharing its storage."""
    from torch.distributed.tensor import DTensor

    local, mesh, placements = _placement(layer.expert_parallel.group, value)
    shape = (layer.config.num_routed_experts,) + tuple(value.shape[1:])
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())
