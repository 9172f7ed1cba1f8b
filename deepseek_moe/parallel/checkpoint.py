"""Sharded checkpoints of expert-parallel models through ``torch.distributed.checkpoint`` (DCP).

A sharded layer's plain ``state_dict()`` holds this rank's experts only, under the full model's keys and with
nothing that says which experts they are: saved with DCP from several ranks, the shards would collide. The state
dict of :func:`checkpoint_state_dict` gives every expert-parallel layer's routed-expert weights their global shape
and placement instead: a DTensor sharded on the expert dimension over the layer's expert-parallel group (as
torchtitan does), whose local tensor *is* the parameter. With FSDP2 on top (:func:`fully_shard_moe`), the placement
is the 2-D one, the experts split over the expert-parallel group and each rank's share again over its FSDP mesh.
DCP then records each shard's global offset, and loading reshards: a checkpoint saved at EP = W loads at any EP
whose size divides E, and into an unsharded model (EP = 1), in place (``dcp.load`` writes into the parameters).

Example (every rank)::

    state = dm.parallel.checkpoint_state_dict(model)
    dcp.save(state, checkpoint_id=path)          # ... later, possibly at another EP size:
    dcp.load(dm.parallel.checkpoint_state_dict(model), checkpoint_id=path)
"""
from __future__ import annotations

from typing import Dict, Optional

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
    from torch.distributed.tensor import DTensor

    from ..layer import DeepSeekMoELayer
    from .expert_parallel import refuse_expert_adapters

    state = model.state_dict()
    key_of: Dict[int, str] = {}
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.numel():
            key_of.setdefault(local.data_ptr(), key)
    for layer in model.modules():
        if not isinstance(layer, DeepSeekMoELayer) or layer.expert_parallel is None:
            continue
        refuse_expert_adapters(layer, "checkpoint_state_dict")
        group = layer.expert_parallel.group
        for name in _EXPERT_WEIGHTS:
            param = getattr(layer.routed_experts, name)
            local, mesh, placements = _placement(group, param)
            key: Optional[str] = key_of.get(local.data_ptr())
            if key is None:
                raise ValueError(f"checkpoint_state_dict: experts.{name} of a sharded layer is not in "
                                 f"model.state_dict() (a wrapper that copies it?)")
            shape = (layer.config.num_routed_experts,) + tuple(param.shape[1:])
            state[key] = DTensor.from_local(local, mesh, placements, run_check=False, shape=shape,
                                            stride=torch.empty(shape, device="meta").stride())
    return state
