"""Expert parallelism as a dispatcher: each rank of a process group holds E/W routed experts; router and shared
experts are replicated. :class:`AllToAllDispatcher` replaces the layer's local dispatcher, so the layer's forward
is the same pipeline (router → dispatch → experts → combine). Per forward, on every rank:

1. dispatch: route the local tokens (replicated router; with ``max_devices_per_token`` = M each token's experts
   lie on at most M ranks) and sort the (token, slot) pairs by expert, hence by destination rank; exchange the
   counts with one ``all_to_all_single``, then each token row once per destination rank, and per pair its row
   index, local expert and gate weight. The received rows form a plan of their own: R rows with up to K slots
   each, the pairs this rank's experts process (slots without a pair are masked out, as are pairs beyond the
   device capacity);
2. the experts run on it with the selected implementation, which weighs and sums each row's pairs;
3. combine: send one row per (token, rank) back with the mirror exchange and sum each token's rows (the same
   deterministic combine as the local dispatcher's, through a (T, W) slot map).

The row and weight exchanges are differentiable (``all_to_all_single_autograd``): the backward sends gradients
the other way. An expert's gradient therefore sums the losses of every rank whose tokens reached it; the
experts scale it by 1/W so that it is the gradient of the mean of the ranks' losses, the convention of data
parallelism (DDP and FSDP average the replicated parameters' gradients over the ranks).

Legend: T local tokens, K experts per token, N kept pairs of the local tokens, U (token, rank) rows sent, R rows
received, P pairs received, H hidden size, W ranks, L = E / W local experts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..dispatch import Dispatched, Dispatcher
from ..plan import segment_ranks, sorted_weights
from ..rows import CombineRows, GatherRows


@dataclass
class Exchange:
    """The all-to-all's bookkeeping between dispatch and combine: the rows sent (``token_U``, and ``slot_TW``, each
    token's row per destination rank, U where it sends none) and the split sizes of both directions."""

    token_U: torch.Tensor
    slot_TW: torch.Tensor
    send_rows: List[int]
    recv_rows: List[int]


class AllToAllDispatcher(Dispatcher):
    """This rank's place in the expert-parallel group: ``rank`` holds experts [rank·L, (rank+1)·L).

    ``device_capacity_factor`` c (training only): each rank processes at most ceil(c · all pairs / W) of the pairs
    it receives, those of highest affinity (DeepSeek-V2 §2.2.4); the others add nothing and count as dropped.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], num_experts: int, capacity_factor: Optional[float] = None,
                 device_capacity_factor: Optional[float] = None):
        super().__init__(num_experts, capacity_factor)
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if num_experts % self.world:
            raise ValueError(f"shard_experts: num_routed_experts={num_experts} must be divisible by the group size "
                             f"{self.world}")
        self.local_experts = num_experts // self.world
        self.first_expert = self.rank * self.local_experts
        self.device_capacity_factor = device_capacity_factor
        # Rows of the last forward's dispatch: tokens, rows_sent, rows_sent_remote, row_bytes, pairs_received,
        # pairs_processed.
        self.last_exchange: Dict[str, int] = {}

    def __deepcopy__(self, memo):
        """A copy that talks to the same ranks: the process group is shared, not copied (it cannot be), so a
        deep copy of the layer (an EMA or best-model snapshot) works."""
        memo[id(self.group)] = self.group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __call__(self, x_TH: torch.Tensor, routing, run_experts, impl, training: bool
                 ) -> Tuple[torch.Tensor, Dispatched]:
        """x_TH (T, H) -> (y_TH (T, H) the routed output of the local tokens, :class:`Dispatched`)."""
        x_RH, local, exchange, num_dropped, plan, kept_counts_E = self._dispatch(x_TH, routing, impl, training)
        y_RH = run_experts(x_RH, local)
        return self._combine(y_RH, exchange), Dispatched(plan, num_dropped, exchange, kept_counts_E)

    def _dispatch(self, x_TH: torch.Tensor, routing, impl, training: bool):
        W, L = self.world, self.local_experts
        T, H = x_TH.shape
        K = routing.topk_idx_TK.shape[1]
        device = x_TH.device
        plan = self.plan(routing, impl, training)
        # Sender: the kept pairs, sorted by expert and therefore by destination rank.
        expert_N = torch.repeat_interleave(torch.arange(W * L, device=device), plan.counts_E)
        rank_N = torch.div(expert_N, L, rounding_mode="floor")
        keys_U, row_of_N = torch.unique(rank_N * T + plan.token_N, return_inverse=True)  # (rank, token), sorted
        token_U, rank_U = keys_U % T, torch.div(keys_U, T, rounding_mode="floor")
        rows_W = torch.zeros(W, dtype=torch.int64, device=device).scatter_add_(0, rank_U, torch.ones_like(keys_U))
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
        U = keys_U.numel()
        slot_TW = torch.full((T, W), U, dtype=torch.int64, device=device)
        slot_TW[token_U, rank_U] = torch.arange(U, device=device)
        exchange = Exchange(token_U, slot_TW, send_rows, recv_rows)
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        x_RH = all_to_all_single_autograd(GatherRows.apply(x_TH, token_U, slot_TW), recv_rows, send_rows, self.group)
        acc = torch.promote_types(x_TH.dtype, torch.float32)
        w_P = all_to_all_single_autograd(sorted_weights(plan).to(acc), recv_pairs, send_pairs, self.group)
        # Receiver: pairs of source s index the rows of source s.
        row_start_S = torch.cumsum(recv_counts[:, 0], 0) - recv_counts[:, 0]
        source_P = torch.repeat_interleave(torch.arange(W, device=device), recv_counts[:, 1])
        row_P = meta_P2[:, 0] + row_start_S[source_P]
        keep_P = self._device_capacity(plan, routing, meta_P2.shape[0], recv_pairs, send_pairs, training)
        local = self._received_plan(impl, row_P, meta_P2[:, 1], w_P, keep_P, x_RH.shape[0], K)
        num_dropped = plan.num_dropped + (keep_P.numel() - keep_P.sum() if keep_P is not None else 0)
        kept_counts_E = None
        if keep_P is not None:  # which of this rank's pairs the receivers kept, back in the order they were sent
            keep_N = torch.empty(expert_N.numel(), dtype=torch.int64, device=device)
            dist.all_to_all_single(keep_N, keep_P.to(torch.int64), send_pairs, recv_pairs, group=self.group)
            kept_counts_E = torch.zeros_like(plan.counts_E).scatter_add_(0, expert_N, keep_N)
        self.last_exchange = {"tokens": T, "rows_sent": int(sum(send_rows)),
                              "rows_sent_remote": int(sum(send_rows) - send_rows[self.rank]),
                              "row_bytes": H * x_TH.element_size(), "pairs_received": int(sum(recv_pairs)),
                              "pairs_processed": int(local.pair_N.numel())}
        return x_RH, local, exchange, num_dropped, plan, kept_counts_E

    def _device_capacity(self, plan, routing, num_received: int, recv_pairs, send_pairs, training: bool
                         ) -> Optional[torch.Tensor]:
        """bool (P,): the received pairs this rank keeps under its device capacity (None: all)."""
        if self.device_capacity_factor is None or not training:
            return None
        device = plan.counts_E.device
        total = torch.tensor([plan.pair_N.numel()], dtype=torch.int64, device=device)
        dist.all_reduce(total, group=self.group)
        capacity = math.ceil(self.device_capacity_factor * int(total) / self.world)
        affinity_N = routing.scores_TE.gather(1, routing.topk_idx_TK).reshape(-1)[plan.pair_N]
        affinity_P = torch.empty(num_received, dtype=affinity_N.dtype, device=device)
        dist.all_to_all_single(affinity_P, affinity_N.detach().contiguous(), recv_pairs, send_pairs, group=self.group)
        keep_P = torch.zeros(num_received, dtype=torch.bool, device=device)
        keep_P[torch.argsort(affinity_P, descending=True, stable=True)[:capacity]] = True
        return keep_P

    def _received_plan(self, impl, row_P, expert_P, w_P, keep_P, R: int, K: int):
        """The plan of the received rows: R rows with up to K slots (a token sends at most K pairs), slot k of a
        row holding its k-th pair in arrival order; slots without a pair, or with a pair over the device capacity,
        are masked out."""
        device = row_P.device
        P = row_P.numel()
        order_P = torch.argsort(row_P, stable=True)
        counts_R = torch.zeros(R, dtype=torch.int64, device=device).scatter_add_(0, row_P, torch.ones_like(row_P))
        pos_P = torch.empty_like(row_P)
        pos_P[order_P] = segment_ranks(row_P[order_P], counts_R)
        topk_idx_RK = torch.zeros(R, K, dtype=torch.int64, device=device).index_put_((row_P, pos_P), expert_P)
        keep_RK = torch.zeros(R, K, dtype=torch.bool, device=device).index_put_(
            (row_P, pos_P), keep_P if keep_P is not None else torch.ones(P, dtype=torch.bool, device=device))
        weight_RK = w_P.new_zeros(R, K).index_put((row_P, pos_P), w_P)
        return impl.plan(topk_idx_RK, weight_RK, self.local_experts, keep_TK=keep_RK)

    def _combine(self, o_RH: torch.Tensor, ex: Exchange) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        back_UH = all_to_all_single_autograd(o_RH, ex.send_rows, ex.recv_rows, self.group)
        return CombineRows.apply(back_UH, None, ex.token_U, ex.slot_TW, None)


def shard_experts(layer, group: Optional[dist.ProcessGroup] = None):
    """Turn ``layer`` (a :class:`~deepseek_moe.DeepSeekMoELayer`) into this rank's expert-parallel shard, in
    place, and return it.

    Keeps experts [rank·E/W, (rank+1)·E/W) of the routed experts and replaces the layer's dispatcher by an
    :class:`AllToAllDispatcher`; router, shared experts and buffers stay replicated. The layer gets a config with
    ``num_devices`` = W (device-level and communication losses and device-limited routing then follow the real
    placement). Call it on every rank of ``group`` (default: the world) with the same weights, e.g. right after
    construction with a fixed seed or after loading a full state_dict; a full (unsharded) state_dict also loads
    into a sharded layer. Afterwards the layer's plain ``state_dict()`` holds this rank's experts only (shape
    (E/W, ...) under the full model's keys, with no record of which experts they are): save checkpoints with
    :func:`~deepseek_moe.parallel.checkpoint_state_dict` (torch.distributed.checkpoint; loads at any EP size) or
    :func:`gather_expert_state_dict` (one full state dict).

    Raises RuntimeError without torch.distributed, ValueError for a layer already sharded, for E not divisible by
    W, for a config whose num_devices is neither 1 nor W, for experts already wrapped by PEFT, and on every rank
    for layers whose configs or parameter dtypes differ across the ranks (one collective).
    """
    if layer.experts is not layer.routed_experts:
        raise ValueError("shard_experts: the routed experts are wrapped (PEFT's LoRA sizes its factors for every "
                         "expert); shard first, then add the adapters")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_experts: torch.distributed is not initialised (dist.init_process_group first)")
    if getattr(layer, "expert_parallel", None) is not None:
        raise ValueError("shard_experts: this layer is already sharded")
    cfg = layer.config
    _check_same_on_every_rank(layer, group)
    dispatcher = AllToAllDispatcher(group, cfg.num_routed_experts, cfg.capacity_factor, cfg.device_capacity_factor)
    if cfg.num_devices not in (1, dispatcher.world):
        raise ValueError(f"shard_experts: config.num_devices={cfg.num_devices} differs from the group size "
                         f"{dispatcher.world}; set it to {dispatcher.world} (or 1)")
    layer.experts.shard_(dispatcher.first_expert, dispatcher.local_experts, grad_scale=1.0 / dispatcher.world)
    layer.use_dispatcher(dispatcher, cfg.replace(num_devices=dispatcher.world))
    return layer


def _check_same_on_every_rank(layer, group) -> None:
    """ValueError on every rank of ``group`` where the ranks' layers differ in config (but the backend and
    num_devices) or parameter dtypes: the exchanges would then hang or abort in the collective library (different E
    or top-k: index errors on one rank while the others wait; different H or dtype: gloo's size mismatch). One
    collective, at sharding."""
    import dataclasses

    # Not the backend (each rank's own choice of implementation) nor num_devices (1 or W: shard_experts sets W).
    cfg = layer.config
    mine = {**{f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
               if f.name not in ("backend", "num_devices")},
            **{f"{name} dtype": str(p.dtype) for name, p in layer.named_parameters()}}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    differ = sorted({key for other in everyone for key in other.keys() | everyone[0].keys()
                     if other.get(key) != everyone[0].get(key)})
    if differ:
        raise ValueError("shard_experts: the layers differ across the ranks (every rank must build the same "
                         "layer): " + "; ".join(f"{key}: " + ", ".join(f"rank {r} {other.get(key)}"
                                                                       for r, other in enumerate(everyone))
                                                for key in differ))


def refuse_expert_adapters(layer, where: str) -> None:
    """NotImplementedError where parameters other than the routed experts' own weights sit on an expert-parallel
    layer's experts (PEFT's LoRA factors): each rank's cover its own experts only, and saved or gathered as one full
    tensor per key they would keep one rank's copy."""
    own = {id(p) for p in layer.routed_experts.parameters(recurse=False)}
    extra = [name for name, p in layer.experts.named_parameters() if id(p) not in own]
    if extra:
        raise NotImplementedError(
            f"{where}: the routed experts of this expert-parallel layer carry {extra} (adapters such as PEFT's "
            f"LoRA); each rank's cover only its own experts, so one tensor per key would keep one rank's copy. "
            f"Merge them into the experts first (peft's merge_and_unload), or save each rank's adapter state in a "
            f"file of its own (peft's get_peft_model_state_dict on every rank)")


def gather_expert_state_dict(layer) -> Dict[str, torch.Tensor]:
    """The full (unsharded) state_dict of an expert-parallel layer, on every rank (an all-gather of the expert
    shards; collective: call it on all ranks). Raises NotImplementedError for adapters on the sharded experts
    (:func:`refuse_expert_adapters`)."""
    ep: Optional[AllToAllDispatcher] = getattr(layer, "expert_parallel", None)
    state = layer.state_dict()
    if ep is None:
        return state
    refuse_expert_adapters(layer, "gather_expert_state_dict")
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
