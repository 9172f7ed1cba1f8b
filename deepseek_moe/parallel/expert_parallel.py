"""Expert parallelism: each rank of a process group holds E/W routed experts; router and shared experts are
replicated. Per forward, on every rank:

1. route the local tokens (replicated router; with ``max_devices_per_token`` = M each token's experts lie on at
   most M ranks) and sort the (token, slot) pairs by expert, hence by destination rank;
2. exchange counts (rows and pairs per destination) with one ``all_to_all_single``; then each token row once per
   destination rank, and per pair its row index, local expert and gate weight;
3. run the received pairs through this rank's experts with the selected backend and sum each row's weighted
   expert outputs;
4. send one row per (token, rank) back with the mirror exchange and add them into the token rows.

The row and weight exchanges are differentiable (``all_to_all_single_autograd``): the backward sends gradients
the other way. An expert's gradient therefore sums the losses of every rank whose tokens reached it; the
layer scales it by 1/W so that it is the gradient of the mean of the ranks' losses, the convention of data
parallelism (DDP and FSDP average the replicated parameters' gradients over the ranks).

Legend: T local tokens, N kept pairs of the local tokens, U (token, rank) rows sent, R rows received, P pairs
received, H hidden size, W ranks, L = E / W local experts.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..backends import Backend
from ..dispatch import DispatchPlan, sorted_weights


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


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
        # Rows of the last forward's dispatch (the combine returns as many): tokens, rows_sent, rows_sent_remote,
        # row_bytes.
        self.last_exchange: Dict[str, int] = {}
        # Pairs this rank dropped for its device capacity in the last forward (0-dim int64).
        self.last_dropped = torch.zeros((), dtype=torch.int64)

    def routed(self, x_TH: torch.Tensor, plan: DispatchPlan, gate_up_LJH: torch.Tensor, down_LHI: torch.Tensor,
               backend: Backend, affinity_N: Optional[torch.Tensor] = None,
               capacity_factor: Optional[float] = None, activation: str = "silu") -> torch.Tensor:
        """Σ_k w·expert(x) for the local tokens, the experts living on their ranks. x_TH (T, H) -> (T, H).

        Each token row travels once per destination rank, however many of its experts live there (so
        ``max_devices_per_token`` = M bounds the rows a token sends by M); the destination sums its experts'
        weighted outputs and returns one row per (token, rank). With ``capacity_factor`` c (and ``affinity_N``,
        the router score of each sorted pair), each rank processes at most ceil(c · all pairs / W) of the pairs
        it receives, those of highest affinity (DeepSeek-V2 §2.2.4); the others add nothing and are counted in
        ``last_dropped``.
        """
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        W, L = self.world, self.local_experts
        T, H = x_TH.shape
        # Mean over the ranks' losses, as for replicated parameters under data parallelism (module docstring).
        gate_up_LJH, down_LHI = _ScaleGrad.apply(gate_up_LJH, 1.0 / W), _ScaleGrad.apply(down_LHI, 1.0 / W)
        device = x_TH.device
        acc = torch.promote_types(x_TH.dtype, torch.float32)
        # Sender: the kept pairs, sorted by expert and therefore by destination rank.
        expert_N = torch.repeat_interleave(torch.arange(W * L, device=device), plan.counts_E)
        rank_N = torch.div(expert_N, L, rounding_mode="floor")
        keys_U, row_of_N = torch.unique(rank_N * T + plan.token_N, return_inverse=True)  # (rank, token), sorted
        token_U = keys_U % T
        rows_W = torch.zeros(W, dtype=torch.int64, device=device).scatter_add_(
            0, torch.div(keys_U, T, rounding_mode="floor"), torch.ones_like(keys_U))
        pairs_W = plan.counts_E.view(W, L).sum(1)
        # Counts first: rows and pairs per destination, one exchange.
        send_counts = torch.stack([rows_W, pairs_W], 1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_rows, send_pairs = rows_W.tolist(), pairs_W.tolist()  # split sizes must be on the host
        recv_rows, recv_pairs = recv_counts[:, 0].tolist(), recv_counts[:, 1].tolist()
        # Each pair's row index within the rows sent to its rank, and its expert on that rank.
        first_row_W = torch.cumsum(rows_W, 0) - rows_W
        meta_N2 = torch.stack([row_of_N - first_row_W[rank_N], expert_N - rank_N * L], 1)
        meta_P2 = torch.empty(sum(recv_pairs), 2, dtype=torch.int64, device=device)
        dist.all_to_all_single(meta_P2, meta_N2, recv_pairs, send_pairs, group=self.group)
        x_RH = all_to_all_single_autograd(x_TH.index_select(0, token_U), recv_rows, send_rows, self.group)
        w_P = all_to_all_single_autograd(sorted_weights(plan).to(acc), recv_pairs, send_pairs, self.group)
        # Receiver: pairs of source s index the rows of source s.
        row_start_S = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        source_P = torch.repeat_interleave(torch.arange(W, device=device), recv_counts[:, 1])
        row_P = meta_P2[:, 0] + row_start_S[source_P]
        expert_P1 = meta_P2[:, 1:]
        self.last_dropped = torch.zeros((), dtype=torch.int64, device=device)
        if capacity_factor is not None:
            if affinity_N is None:
                raise ValueError("ExpertParallel.routed: a device capacity needs the pairs' affinities")
            total = torch.tensor([plan.pair_N.numel()], dtype=torch.int64, device=device)
            dist.all_reduce(total, group=self.group)
            capacity = math.ceil(capacity_factor * int(total) / W)
            affinity_P = torch.empty(sum(recv_pairs), dtype=affinity_N.dtype, device=device)
            dist.all_to_all_single(affinity_P, affinity_N.detach().contiguous(), recv_pairs, send_pairs,
                                   group=self.group)
            if affinity_P.numel() > capacity:
                keep_P = torch.argsort(affinity_P, descending=True, stable=True)[:capacity].sort().values
                self.last_dropped = torch.tensor(affinity_P.numel() - capacity, device=device)
                row_P, expert_P1, w_P = row_P[keep_P], expert_P1[keep_P], w_P[keep_P]
        local = backend.build_plan(expert_P1, torch.ones(row_P.numel(), 1, device=device), L)
        o_PH = backend.routed_mlp(x_RH.index_select(0, row_P), local, gate_up_LJH, down_LHI, activation)
        o_RH = torch.zeros(x_RH.shape, dtype=acc, device=device).index_add(0, row_P, o_PH.to(acc) * w_P.unsqueeze(1))
        back_UH = all_to_all_single_autograd(o_RH.to(x_TH.dtype), send_rows, recv_rows, self.group)
        self.last_exchange = {"tokens": T, "rows_sent": int(sum(send_rows)),
                              "rows_sent_remote": int(sum(send_rows) - send_rows[self.rank]),
                              "row_bytes": H * x_TH.element_size(), "pairs_received": int(sum(recv_pairs)),
                              "pairs_processed": int(row_P.numel())}
        y_TH = torch.zeros(T, H, dtype=acc, device=device).index_add(0, token_U, back_UH.to(acc))
        return y_TH.to(x_TH.dtype)


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
    layer.experts.cfg = new_cfg
    layer.experts.expert_parallel = ep
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
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        gather(full, shard, group=ep.group)
        state[key] = full
    return state


def fully_shard_moe(layer, mesh, *, expert_mesh=None, mp_policy=None, reshard_after_forward: bool = True):
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to a :class:`~deepseek_moe.DeepSeekMoELayer`, in place,
    and return it. Three FSDP units, torchtitan style:

    * the router, always with fp32 parameters and gradient reduction (``MixedPrecisionPolicy(param_dtype=
      torch.float32)``), whatever ``mp_policy`` says: routing decisions must not see a bf16-rounded gate
      (DeepSeek-V3 §3.3.2 keeps the gating in higher precision);
    * the routed experts, sharded over ``expert_mesh``: for an expert-parallel layer (:func:`shard_experts`) the
      ranks that hold the same experts (the data-parallel dimension of a 2-D mesh); by default ``mesh``;
    * everything else (shared experts) over ``mesh``, with ``mp_policy``.

    FSDP2 averages each unit's gradients over its mesh; with the expert-parallel layer's own 1/W_ep scaling the
    experts' gradients are then the mean over all ranks too, like every other parameter's. FSDP2 manages parameters
    only: the balancing bias (a buffer) and the load counters stay replicated and in their dtype.

    Raises ValueError for an expert-parallel layer without ``expert_mesh``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(layer, "expert_parallel", None) is not None and expert_mesh is None:
        raise ValueError("fully_shard_moe: this layer is expert-parallel; pass expert_mesh, the mesh of the ranks that "
                         "hold the same experts (e.g. mesh_2d['dp'] when shard_experts got mesh_2d['ep'])")
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    fully_shard(layer.gate, mesh=mesh, reshard_after_forward=reshard_after_forward,
                mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32))
    fully_shard(layer.experts, mesh=expert_mesh if expert_mesh is not None else mesh,
                reshard_after_forward=reshard_after_forward, **policy)
    fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    return layer
