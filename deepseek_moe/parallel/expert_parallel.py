"""Expert parallelism: each rank of a process group holds E/W routed experts; router and shared experts are
replicated. Per forward, on every rank:

1. route the local tokens (replicated router; with ``max_devices_per_token`` = M each token's experts lie on at
   most M ranks) and sort the (token, slot) pairs by expert, hence by destination rank;
2. exchange the pair counts per (rank, local expert) with one ``all_to_all_single``, then the rows;
3. run the received rows through this rank's experts with the selected backend (a local plan: one slot per row);
4. send the outputs back with the mirror ``all_to_all_single`` and combine them with the gate weights.

The exchanges are differentiable (``all_to_all_single_autograd``): the backward sends gradients the other way.

Legend: T local tokens, K slots, N kept pairs of the local tokens, R rows received, H hidden size, E experts,
W ranks, L = E / W local experts.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..backends import Backend
from ..dispatch import DispatchPlan, combine_rows, gather_rows, sorted_weights


class ExpertParallel:
    """This rank's place in the expert-parallel group: ``rank`` holds experts [rank·L, (rank+1)·L)."""

    def __init__(self, group: Optional[dist.ProcessGroup], num_experts: int):
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.world:
            raise ValueError(f"shard_experts: num_routed_experts={num_experts} must be divisible by the group size "
                             f"{self.world}")
        self.local_experts = num_experts // self.world
        self.first_expert = self.rank * self.local_experts

    def routed(self, x_TH: torch.Tensor, plan: DispatchPlan, gate_up_LJH: torch.Tensor, down_LHI: torch.Tensor,
               backend: Backend) -> torch.Tensor:
        """Σ_k w·expert(x) for the local tokens, the experts living on their ranks. x_TH (T, H) -> (T, H)."""
        W, L = self.world, self.local_experts
        send_WL = plan.counts_E.view(W, L)
        recv_WL = torch.empty_like(send_WL)
        dist.all_to_all_single(recv_WL, send_WL, group=self.group)
        # The row exchange needs its split sizes on the host: one sync per step, as in any all-to-all MoE.
        send_W: List[int] = send_WL.sum(1).tolist()
        recv_W: List[int] = recv_WL.sum(1).tolist()
        x_NH = gather_rows(x_TH, plan)  # sorted by expert, so by destination rank
        x_RH = all_to_all_single_autograd(x_NH, recv_W, send_W, self.group)
        # Rows from each source arrive sorted by that source's expert order: their local expert ids follow.
        expert_R = torch.repeat_interleave(torch.arange(L, device=x_TH.device).repeat(W), recv_WL.reshape(-1))
        local = backend.build_plan(expert_R.unsqueeze(1), torch.ones(expert_R.numel(), 1, device=x_TH.device), L)
        o_RH = backend.routed_mlp(x_RH, local, gate_up_LJH, down_LHI)
        o_NH = all_to_all_single_autograd(o_RH, send_W, recv_W, self.group)
        acc = torch.promote_types(x_TH.dtype, torch.float32)
        return combine_rows(o_NH.to(acc) * sorted_weights(plan).to(acc).unsqueeze(1), plan).to(x_TH.dtype)


def shard_experts(layer, group: Optional[dist.ProcessGroup] = None):
    """Turn ``layer`` (a :class:`~deepseek_moe.DeepSeekMoELayer`) into this rank's expert-parallel shard, in
    place, and return it.

    Keeps experts [rank·E/W, (rank+1)·E/W) of the routed experts; router, shared experts and buffers stay
    replicated. ``config.num_devices`` becomes W (device-level and communication losses and device-limited
    routing then follow the real placement). Call it on every rank of ``group`` (default: the world) with the
    same weights, e.g. right after construction with a fixed seed or after loading a full state_dict; a full
    (unsharded) state_dict also loads into a sharded layer. :func:`gather_expert_state_dict` reassembles one.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_experts: torch.distributed is not initialised (dist.init_process_group first)")
    if getattr(layer, "expert_parallel", None) is not None:
        raise ValueError("shard_experts: this layer is already sharded")
    cfg = layer.config
    ep = ExpertParallel(group, cfg.num_routed_experts)
    if cfg.num_devices not in (1, ep.world):
        raise ValueError(f"shard_experts: config.num_devices={cfg.num_devices} differs from the group size "
                         f"{ep.world}; set it to {ep.world} (or 1)")
    new_cfg = cfg.replace(num_devices=ep.world)
    layer.config = new_cfg
    layer.gate.cfg = new_cfg
    layer.experts.shard_(ep.first_expert, ep.local_experts)
    layer.expert_parallel = ep
    return layer


def gather_expert_state_dict(layer) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state_dict of an expert-parallel layer, on every rank (an all-gather of the expert
    shards; collective: call it on all ranks)."""
    ep: Optional[ExpertParallel] = getattr(layer, "expert_parallel", None)
    state = layer.state_dict()
    if ep is None:
        return state
    for name in ("gate_up_proj", "down_proj"):
        key = next(k for k in state if k.endswith("experts." + name))
        shard = state[key].contiguous()
        full = shard.new_empty((ep.world * shard.shape[0],) + tuple(shard.shape[1:]))
        dist.all_gather_into_tensor(full, shard, group=ep.group)
        state[key] = full
    return state
