"""Router: token-to-expert affinities and the top-k choice of DeepSeekMoE / DeepSeek-V2 / DeepSeek-V3.

Legend: T tokens, H hidden size, E routed experts, K experts per token, G expert groups.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import invariant
from .config import MoEConfig
from .forced_routing import default_hash_table
from .losses import all_reduce_load, load_stats
from .override import RoutingOverride

_NO_CONTEXT = contextlib.nullcontext()  # reusable


@dataclass
class Routing:
    """What the router decided for T tokens.

    Attributes:
        topk_idx_TK: int64 (T, K), the K distinct experts picked for each token, best first.
        topk_weight_TK: fp32 (T, K), the gate weights that scale each expert's output (after optional
            normalisation and ``routed_scaling_factor``); differentiable w.r.t. the router weight.
        scores_TE: fp32 (T, E), the affinities s = softmax(logits), sigmoid(logits) or √softplus(logits), bias
            excluded.
        logits_TE: fp32 (T, E), the raw router logits x·Wᵀ.
    """

    topk_idx_TK: torch.Tensor
    topk_weight_TK: torch.Tensor
    scores_TE: torch.Tensor
    logits_TE: torch.Tensor


def _top2_sum_groups(grouped_TGM: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` best groups per token by top-2 sum when some experts are -inf (excluded or on a dropped
    device): first by how many of a group's top 2 are finite, then by the sum of those. A -inf in the sum would
    tie every group that holds one, and a large finite stand-in absorbs the score added to it."""
    top2_TG2 = grouped_TGM.topk(2, dim=-1).values
    finite_TG2 = top2_TG2.isfinite()
    by_sum_TG = top2_TG2.where(finite_TG2, 0).sum(dim=-1).sort(dim=-1, descending=True, stable=True).indices
    left_TG = finite_TG2.sum(dim=-1).gather(1, by_sum_TG)
    return by_sum_TG.gather(1, left_TG.sort(dim=-1, descending=True, stable=True).indices)[:, :count]


def select_experts(scores_TE: torch.Tensor, bias_E: torch.Tensor, cfg: MoEConfig,
                   excluded_TE: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick K experts per token from ``scores_TE + bias_E``, limited to the ``topk_groups`` best groups and, with
    ``max_devices_per_token`` = M < ``num_devices`` = D, to the M devices holding the highest-affinity experts
    (DeepSeek-V2 §2.2.2; device d holds experts [d·E/D, (d+1)·E/D)).

    The bias only steers the choice; callers gather the weights from the unbiased scores. ``excluded_TE``: optional
    bool (T, E), True for experts a token may not pick (``deepseek_moe.analysis`` masks experts this way): they
    are never picked and count for nothing when groups and devices are chosen (a device or group ranks by the
    experts left in it; with ``group_score="top2_sum"`` a group with two experts left ranks above every group
    with one, and groups with as many rank by the sum of those); raises ValueError (outside torch.compile) when
    that leaves a token fewer than K experts. Returns int64 (T, K) indices, best first. Runs without gradient.
    """
    with torch.no_grad():
        choice_TE = scores_TE + bias_E.to(scores_TE.dtype)
        if excluded_TE is not None:
            choice_TE = choice_TE.masked_fill(excluded_TE, float("-inf"))
        D, M = cfg.num_devices, cfg.max_devices_per_token
        device_limited = M is not None and M < D
        if device_limited:
            T, E = choice_TE.shape
            per_device_TDM = choice_TE.view(T, D, E // D)
            keep_TM = per_device_TDM.amax(dim=-1).topk(M, dim=-1).indices
            drop_TD = torch.ones(T, D, dtype=torch.bool, device=choice_TE.device).scatter_(1, keep_TM, False)
            choice_TE = per_device_TDM.masked_fill(drop_TD.unsqueeze(-1), float("-inf")).view(T, E)
        G = cfg.num_groups
        if G > 1:
            T, E = choice_TE.shape
            grouped_TGM = choice_TE.view(T, G, E // G)
            if cfg.group_score == "max":
                keep_TG = grouped_TGM.amax(dim=-1).topk(cfg.topk_groups, dim=-1).indices
            elif excluded_TE is None and not device_limited:  # no expert is -inf
                keep_TG = grouped_TGM.topk(2, dim=-1).values.sum(dim=-1).topk(cfg.topk_groups, dim=-1).indices
            else:
                keep_TG = _top2_sum_groups(grouped_TGM, cfg.topk_groups)
            mask_TG = torch.ones(T, G, dtype=torch.bool, device=choice_TE.device).scatter_(1, keep_TG, False)
            choice_TE = grouped_TGM.masked_fill(mask_TG.unsqueeze(-1), float("-inf")).view(T, E)
        top_TK = choice_TE.topk(cfg.top_k, dim=-1)
        if (excluded_TE is not None and not torch.compiler.is_compiling()
                and bool(top_TK.values.isneginf().any())):
            raise ValueError(f"select_experts: the excluded experts leave some token fewer than top_k={cfg.top_k} "
                             "experts to pick from (within the groups/devices its routing allows)")
        return top_TK.indices


def balancing_bias(scores_TE: torch.Tensor, bias_E: torch.Tensor, cfg: MoEConfig, iterations: int = 200,
                   group: Optional[object] = None) -> "tuple[torch.Tensor, float, float]":
    """A bias that balances the top-k choice of these T tokens: DeepSeek-V3's step bᵢ += γ·sign(mean(load) −
    loadᵢ) (§2.1.2) repeated on one fixed batch, from ``bias_E``, with γ shrinking geometrically from half the
    standard deviation of scores + bias to 0.2% of that, so it settles instead of oscillating.

    scores_TE: (T, E) float, the unbiased affinities (any float dtype; the search runs in fp32 or fp64). When
    torch.distributed is initialised the loads are summed over ``group`` (default: the world), as in
    ``update_bias``, so every rank of the group must call it (a collective) and all get the same bias.
    Each of the ``iterations`` steps is one top-k over the tokens. Returns (the bias with the lowest MaxVio seen,
    (E,) in ``bias_E``'s dtype; the MaxVio with ``bias_E``; the MaxVio with the returned bias). Identical tokens
    route alike whatever the bias, so the largest group of them bounds the MaxVio reached from below. Raises
    ValueError for ``iterations`` < 1.
    """
    if iterations < 1:
        raise ValueError(f"balancing_bias: iterations={iterations} must be at least 1")
    with torch.no_grad():
        E = cfg.num_routed_experts
        dtype = torch.promote_types(scores_TE.dtype, torch.float32)
        scores_TE = scores_TE.to(dtype)
        bias = bias_E.to(dtype).clone()
        spread = (scores_TE + bias).std() if scores_TE.numel() > 1 else scores_TE.new_zeros(())
        step = 0.5 * all_reduce_load(spread.reshape(1), group, "max").item()
        decay = 0.002 ** (1.0 / max(iterations - 1, 1))
        best_bias, best, first = bias.clone(), float("inf"), None
        for i in range(iterations + 1):
            topk_idx_TK = select_experts(scores_TE, bias, cfg)
            load_E = all_reduce_load(torch.bincount(topk_idx_TK.flatten(), minlength=E), group).to(dtype)
            vio = load_stats(load_E)["max_vio"]
            first = vio if first is None else first
            if vio < best:
                best_bias, best = bias.clone(), vio
            if vio == 0.0 or step == 0.0 or i == iterations:
                break
            bias += step * torch.sign(load_E.mean() - load_E)
            step *= decay
        return best_bias.to(bias_E.dtype), first, best


def _at_least_fp32(fn):
    """Wrap a Module._apply function so floating tensors never end below fp32 (a move to bf16 keeps fp32)."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.is_floating_point() and out.is_floating_point() and out.dtype.itemsize < 4:
            out = t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
        return out
    return apply


class Router(nn.Module):
    """Linear gate (fp32 math) + score function + (group-limited) top-k.

    Parameters: ``weight`` (E, H). Buffers: ``e_score_correction_bias`` (E,) fp32, the aux-loss-free
    balancing bias b (DeepSeek-V3 §2.1.2), which changes which experts are picked but never the weights. A
    hash-routed router (``hash_vocab_size`` V) also holds ``tid2eid`` (V, K) int64, the frozen table that picks
    the experts (:func:`~deepseek_moe.forced_routing.hashed_topk`), persistent under transformers' name
    ``gate.tid2eid``.

    Both stay fp32 (fp64 if cast to fp64) when the module is cast to a 16-bit dtype (``.to(torch.bfloat16)``,
    ``.half()``, a load with ``assign=True``): a bias step γ = 0.001 is below bf16's resolution at the biases
    V3 learns (+2 to +5, spacing 0.016), and a rounded gate changes which experts are picked. transformers
    keeps DeepSeek-V2/V3's ``gate.weight`` and bias in fp32 for the same reason (``_keep_in_fp32_modules_strict``).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        # At least fp32 even when built under a 16-bit default dtype (transformers' from_pretrained(dtype=...)).
        dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)
        self.weight = nn.Parameter(torch.empty(cfg.num_routed_experts, cfg.hidden_size, dtype=dtype))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_routed_experts, dtype=dtype))
        if cfg.hash_vocab_size is not None:  # hash routing: the frozen token-id -> expert-ids table
            self.register_buffer("tid2eid", torch.zeros(cfg.hash_vocab_size, cfg.top_k, dtype=torch.int64))
        self.reset_parameters()

    def keep_bias_in_checkpoints(self, keep: bool = True) -> None:
        """Whether ``e_score_correction_bias`` is part of ``state_dict()`` (a persistent buffer). A layer converted
        from a transformers family without a correction bias keeps a zero one out (the stock layout); a bias that
        steers the routing is state and goes in."""
        self.register_buffer("e_score_correction_bias", self.e_score_correction_bias, persistent=keep)

    def reset_parameters(self, hash_table: bool = True) -> None:
        """Draw the weight, zero the bias and (with ``hash_table``) write the default hash table."""
        nn.init.normal_(self.weight, std=self.cfg.initializer_range)
        nn.init.zeros_(self.e_score_correction_bias)
        if self.cfg.hash_vocab_size is not None and hash_table:
            with torch.no_grad():
                self.tid2eid.copy_(default_hash_table(self.cfg.hash_vocab_size, self.cfg.num_routed_experts,
                                                      self.cfg.top_k, self.tid2eid.device))

    def _apply(self, fn, recurse=True):
        return super()._apply(_at_least_fp32(fn), recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "e_score_correction_bias"):
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype.itemsize < 4:
                state_dict[prefix + name] = value.to(torch.float32)  # exact; matters for assign=True loads
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x_TH: torch.Tensor, override: Optional[RoutingOverride] = None,
                topk_idx_TK: Optional[torch.Tensor] = None, select: Optional[Callable] = None,
                gemm: Optional[Callable] = None) -> Routing:
        """Route T tokens. x_TH: (T, H), any float dtype -> :class:`Routing`. ``override``: experts the tokens may not
        pick (:class:`~deepseek_moe.override.RoutingOverride`). ``topk_idx_TK``: int64 (T, K) experts to use
        instead of choosing (replayed or hashed ids, :mod:`deepseek_moe.forced_routing`); the weights are then the
        scores gathered there, normalised and scaled as for chosen ones, so the router still gets its gradient.
        ``select``: an experts implementation's faster form of the steps after the gate GEMM
        (:meth:`~deepseek_moe.backends.Backend.selector`; the layer passes it without autograd), used when neither
        ``override`` nor ``topk_idx_TK`` is given. ``gemm``: an experts implementation's gate GEMM
        (:meth:`~deepseek_moe.backends.Backend.router_gemm`; the layer passes it without autograd), used in place of
        ``F.linear`` where it returns logits. Raises ValueError for forced ids together with an override that
        excludes experts."""
        cfg = self.cfg
        # The gate runs in fp32 (fp64 stays fp64) even under autocast: the top-k choice is sensitive to rounding.
        gate_dtype = torch.promote_types(x_TH.dtype, torch.float32)
        batch_invariant = invariant.enabled()  # torch.use_deterministic_algorithms(True): see deepseek_moe.invariant
        device = x_TH.device.type
        # The context only under autocast: entering it costs microseconds of every decode step.
        with torch.autocast(device_type=device, enabled=False) if torch.is_autocast_enabled(device) else _NO_CONTEXT:
            logits_TE = None if gemm is None else gemm(x_TH, self.weight)
            if logits_TE is None:
                linear = invariant.linear if batch_invariant else F.linear
                logits_TE = linear(x_TH.to(gate_dtype), self.weight.to(gate_dtype))
        if select is not None and override is None and topk_idx_TK is None:
            chosen = select(logits_TE, self.e_score_correction_bias)
            if chosen is not None:
                scores_TE, topk_idx_TK, weight_TK = chosen
                return Routing(topk_idx_TK, weight_TK, scores_TE, logits_TE)
        # Sigmoid and softplus in position-invariant arithmetic in every mode: ATen's CPU kernels compute the vector
        # body and the scalar tail of their range with different code, so a token's scores would depend on its place
        # in the batch (deepseek_moe.invariant); the extension's route_topk.cpp uses the same formulas, so its fused
        # step stays the pipeline's bits.
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)  # row by row: already batch-invariant
        elif cfg.score_func == "sigmoid":
            scores_TE = invariant.sigmoid(logits_TE)
        else:  # sqrtsoftplus, DeepSeek-V4
            scores_TE = invariant.sqrt_softplus(logits_TE)
        exclude = None if override is None else override.exclude
        if topk_idx_TK is not None:
            if exclude is not None:
                source = ("the expert ids of a hash-routed layer's table (hash_vocab_size)" if
                          cfg.hash_vocab_size is not None else "replayed expert ids")
                raise ValueError(f"Router: {source} cannot be combined with disabled experts "
                                 f"(deepseek_moe.analysis.disabled_experts): which one should decide?")
        else:
            excluded_TE = None if exclude is None else exclude(
                scores_TE.detach() + self.e_score_correction_bias.to(scores_TE.dtype))
            topk_idx_TK = select_experts(scores_TE.detach(), self.e_score_correction_bias, cfg, excluded_TE)
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            total_T1 = invariant.row_sum(weight_TK) if batch_invariant else weight_TK.sum(dim=-1, keepdim=True)
            weight_TK = weight_TK / (total_T1 + 1e-20)
        weight_TK = weight_TK * cfg.routed_scaling_factor
        return Routing(topk_idx_TK, weight_TK, scores_TE, logits_TE)


class LogitsProbe(nn.Module):
    """Identity on the router logits, (A, E) fp32 (fp64 for fp64 input): a module boundary where forward hooks
    observe them.

    transformers records ``router_logits`` with forward hooks on a router class (``output_router_logits=True``);
    :func:`deepseek_moe.hf.from_hf` hooks this module the same way, so a converted model returns them and computes
    its own balance loss (``router_aux_loss_coef``) from them.
    """

    def forward(self, logits_AE: torch.Tensor) -> torch.Tensor:
        return logits_AE
