"""Sharded checkpoints of expert-parallel models through ``torch.distributed.checkpoint`` (DCP).

A sharded layer's plain ``state_dict()`` holds this rank's experts only, under the full model's keys and with
nothing that says which experts they are: saved with DCP from several ranks, the shards would collide. The state
dict of :func:`checkpoint_state_dict` gives every expert-parallel layer's routed-expert weights their global shape
and placement instead: a DTensor sharded on the expert dimension over the layer's expert-parallel group (as
torchtitan does), whose local tensor *is* the parameter. DCP then records each shard's global offset, and loading
reshards: a checkpoint saved at EP = W loads at any EP whose size divides E, and into an unsharded model (EP = 1),
in place (``dcp.load`` writes into the parameters; no ``load_state_dict`` call is needed).

Example (every rank)::

    state = dm.parallel.checkpoint_state_dict(model)
    dcp.save(state, checkpoint_id=path)          # ... later, possibly at another EP size:
    dcp.load(dm.parallel.checkpoint_state_dict(model), checkpoint_id=path)
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def _mesh(group):
    from torch.distributed.device_mesh import DeviceMesh

    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device)


def checkpoint_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with the routed-expert weights of every expert-parallel layer
    (:func:`~deepseek_moe.parallel.shard_experts`) as DTensors of global shape (E, ...) sharded on dim 0 over the
    layer's group, sharing storage with the parameters. Layers that are not sharded keep plain (full) tensors.
    Pass it to ``torch.distributed.checkpoint.save`` / ``load`` on every rank."""
    from torch.distributed.tensor import DTensor, Shard

    from ..layer import DeepSeekMoELayer

    state = model.state_dict()
    for prefix, layer in model.named_modules():
        if not isinstance(layer, DeepSeekMoELayer) or layer.expert_parallel is None:
            continue
        ep = layer.expert_parallel
        mesh = _mesh(ep.group)
        for name in _EXPERT_WEIGHTS:
            key = f"{prefix}.experts.{name}" if prefix else f"experts.{name}"
            local = getattr(layer.experts, name).detach()
            shape = (layer.config.num_routed_experts,) + tuple(local.shape[1:])
            state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape,
                                            stride=torch.empty(shape, device="meta").stride())
    return state
