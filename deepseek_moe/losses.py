"""Load-balancing losses, router z-loss, aux-loss-free bias update and load statistics (pure functions).

Every balance loss is in DeepSeek's normalisation: exactly ``alpha`` when routing is perfectly uniform.
Formulas and paper equations: docs/routing-and-losses.md.

Legend: T tokens, E routed experts, K experts per token, B sequences, S tokens per sequence (T = B·S),
D devices (contiguous expert groups of E/D).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .config import MoEConfig


def _acc(t: torch.Tensor) -> torch.Tensor:
    """t in fp32, or fp64 if it already is (never downcast)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_sequences(T: int, num_sequences: int) -> None:
    if num_sequences < 1 or T % num_sequences:
        raise ValueError(f"num_sequences={num_sequences} must be >= 1 and divide the token count T={T}")


def sequence_ids(num_tokens: int, num_sequences: int = 1, seq_T: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
    """int64 (T,) sequence of each token: ``seq_T`` as given (ragged sequences, e.g. after padding is removed),
    else ``num_sequences`` contiguous sequences of equal length."""
    if seq_T is not None:
        if seq_T.shape != (num_tokens,):
            raise ValueError(f"seq_T has shape {tuple(seq_T.shape)}; expected ({num_tokens},)")
        return seq_T
    _check_sequences(num_tokens, num_sequences)
    S = num_tokens // num_sequences
    return torch.arange(num_sequences, device=device).repeat_interleave(S)


def _lengths_B(seq_T: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """fp32 (B,) tokens in each sequence."""
    return torch.zeros(num_sequences, dtype=torch.float32, device=seq_T.device).scatter_add_(
        0, seq_T, torch.ones_like(seq_T, dtype=torch.float32))


def expert_fractions(topk_idx_TK: torch.Tensor, num_experts: int, num_sequences: int = 1,
                     seq_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """f (B, E) = E/(K·S_b) · count of each expert in sequence b's top-K choices (1.0 when uniform; 0 for a
    sequence without tokens). Sequences: ``seq_T`` (T,) if given, else ``num_sequences`` equal contiguous ones."""
    T, K = topk_idx_TK.shape
    seq_T = sequence_ids(T, num_sequences, seq_T, topk_idx_TK.device)
    flat_P = (seq_T.unsqueeze(1) * num_experts + topk_idx_TK).reshape(-1)
    counts_BE = torch.zeros(num_sequences * num_experts, dtype=torch.float32, device=topk_idx_TK.device)
    counts_BE = counts_BE.scatter_add_(0, flat_P, torch.ones_like(flat_P, dtype=torch.float32))
    length_B1 = _lengths_B(seq_T, num_sequences).clamp_min(1).unsqueeze(1)
    return counts_BE.view(num_sequences, num_experts) * (num_experts / K) / length_B1


def global_fractions(counts_E: torch.Tensor) -> torch.Tensor:
    """f (1, E) = E · countᵢ / Σⱼ countⱼ: the load fraction of counts summed over a global batch (ranks and
    micro-batches; Qiu et al. 2025, arXiv 2501.11873). Zero when nothing was counted."""
    counts = counts_E.to(torch.float32)
    return (counts * counts.numel() / counts.sum().clamp_min(1)).unsqueeze(0)


def mean_probs(probs_TE: torch.Tensor, num_sequences: int = 1, seq_T: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
    """P (B, E) = mean over each sequence's tokens of the routing probabilities (differentiable; 0 for a
    sequence without tokens)."""
    T, E = probs_TE.shape
    seq_T = sequence_ids(T, num_sequences, seq_T, probs_TE.device)
    probs_TE = _acc(probs_TE)
    sums_BE = probs_TE.new_zeros(num_sequences, E).index_add(0, seq_T, probs_TE)
    return sums_BE / _lengths_B(seq_T, num_sequences).clamp_min(1).to(sums_BE.dtype).unsqueeze(1)


class _DotWithConstant(torch.autograd.Function):
    """Σ P·c for a constant c (no gradient), c held on the autograd node rather than saved for backward.

    Activation checkpointing recomputes saved tensors in backward; a global-batch f recomputed then would come
    from the window as it is then (later micro-batches included), not as this forward saw it.
    """

    @staticmethod
    def forward(ctx, P, c):
        ctx.c = c
        return (P * c).sum()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.c, None


def expert_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, alpha: float,
                        num_sequences: int = 1, seq_T: Optional[torch.Tensor] = None,
                        fractions_BE: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Expert-level balance loss α Σᵢ fᵢ Pᵢ (DeepSeekMoE eq. 12-14), per sequence, averaged over tokens.

    probs_TE: (T, E) routing probabilities (rows sum to 1); topk_idx_TK: (T, K). num_sequences=1 is the
    batch-level loss; B (with ``seq_T`` for ragged sequences) computes f and P per sequence over its own tokens
    (``seq_aux``) and averages the sequences' losses weighted by their token counts S_b/T. With equal lengths
    that is the plain mean; with padding removed it weights every real token equally, as the LM loss does, so
    a batch split into micro-batches and weighted by token share gives the loss of the whole batch.
    ``fractions_BE`` replaces f, e.g. by :func:`global_fractions` of counts summed over ranks and micro-batches
    (f is a constant: the gradient flows through P only). Uniform routing gives α; all tokens on the same K
    experts with probability 1/K each gives the maximum α·E/K. No tokens: 0.
    """
    T = probs_TE.shape[0]
    if T == 0:
        return probs_TE.sum() * 0.0
    seq_T = sequence_ids(T, num_sequences, seq_T, probs_TE.device)
    f_BE = fractions_BE if fractions_BE is not None else expert_fractions(topk_idx_TK, probs_TE.shape[1],
                                                                          num_sequences, seq_T)
    P_BE = mean_probs(probs_TE, num_sequences, seq_T)
    # Σ_b (S_b/T) Σ_i f_bi P_bi: everything but P is a constant.
    weight_B1 = (_lengths_B(seq_T, num_sequences) / T).unsqueeze(1)
    return alpha * _DotWithConstant.apply(P_BE, (f_BE * weight_B1).to(P_BE.dtype))


def device_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_devices: int,
                        alpha: float) -> torch.Tensor:
    """Device-level balance loss α Σ_d f'_d P'_d (DeepSeekMoE eq. 15-17), experts split into D contiguous
    groups: f'_d = mean of fᵢ over the group, P'_d = sum of Pᵢ over the group. Uniform routing gives α."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    f_DM = expert_fractions(topk_idx_TK, E)[0].view(num_devices, E // num_devices)
    P_DM = mean_probs(probs_TE)[0].view(num_devices, E // num_devices)
    return alpha * (f_DM.mean(dim=-1) * P_DM.sum(dim=-1)).sum()


def comm_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_devices: int,
                      max_devices_per_token: int, alpha: float) -> torch.Tensor:
    """Communication balance loss α Σ_d f''_d P''_d (DeepSeek-V2 eq. 29-31).

    f''_d = D/(M·T) · (tokens that send to device d), M = max_devices_per_token; P''_d = Σ_{i∈d} Pᵢ.
    Equals α when every token reaches M devices and the devices are evenly used.
    """
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    D = num_devices
    device_TK = torch.div(topk_idx_TK, E // D, rounding_mode="floor")
    sends_TD = torch.zeros(T, D, dtype=torch.float32, device=probs_TE.device).scatter_(1, device_TK, 1.0)
    f_D = sends_TD.sum(dim=0) * (D / (max_devices_per_token * T))
    P_D = mean_probs(probs_TE)[0].view(D, E // D).sum(dim=-1)
    return alpha * (f_D * P_D).sum()


def sequence_balance_loss(scores_TE: torch.Tensor, top_k: int, alpha: float, num_sequences: int = 1,
                          seq_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (eq. 17-20), averaged over sequences.

    Per sequence: fᵢ = E/(K·S) Σ_t 1(i ∈ TopK(s_t)) on the raw scores (no bias, no group limit),
    Pᵢ = mean_t s_{t,i} / Σ_j s_{t,j}; loss α Σᵢ fᵢ Pᵢ. Sequences as in :func:`expert_balance_loss`.
    """
    if scores_TE.shape[0] == 0:
        return scores_TE.sum() * 0.0
    scores_TE = _acc(scores_TE)
    raw_topk_TK = scores_TE.detach().topk(top_k, dim=-1).indices
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return expert_balance_loss(probs_TE, raw_topk_TK, alpha, num_sequences, seq_T)


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss (eq. 5): c_z · mean_t (logsumexp_j logits_{t,j})²."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coef * torch.logsumexp(_acc(logits_TE), dim=-1).square().mean()


def routing_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Probabilities used by the balance losses: softmax scores as they are, sigmoid and √softplus scores
    normalised per token (as DeepSeek-V3 does for sigmoid), so that uniform routing gives exactly α for any score
    function."""
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def aux_loss_from_routing(cfg: MoEConfig, scores_TE: torch.Tensor, logits_TE: torch.Tensor,
                          topk_idx_TK: torch.Tensor, num_sequences: int = 1, seq_T: Optional[torch.Tensor] = None,
                          global_counts_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of every loss ``cfg`` enables (coefficient > 0), as a 0-dim fp32 tensor.

    ``num_sequences`` (and ``seq_T`` (T,) for ragged sequences) say which sequence each token belongs to: used by
    the sequence scope (``seq_aux``) and the sequence-wise loss. ``global_counts_E`` (E,) is the load summed over
    the global batch, required by ``balance_scope="global_batch"``.
    """
    total = scores_TE.new_zeros((), dtype=torch.float32)
    probs_TE = routing_probs(scores_TE, cfg.score_func)
    if cfg.aux_loss_alpha > 0:
        scope = cfg.resolved_balance_scope
        if scope == "global_batch":
            if global_counts_E is None:
                raise ValueError("aux_loss_from_routing: balance_scope='global_batch' needs global_counts_E")
            total = total + expert_balance_loss(probs_TE, topk_idx_TK, cfg.aux_loss_alpha,
                                                fractions_BE=global_fractions(global_counts_E))
        elif scope == "sequence":
            total = total + expert_balance_loss(probs_TE, topk_idx_TK, cfg.aux_loss_alpha, num_sequences, seq_T)
        else:
            total = total + expert_balance_loss(probs_TE, topk_idx_TK, cfg.aux_loss_alpha)
    if cfg.device_loss_alpha > 0 and cfg.num_devices > 1:
        total = total + device_balance_loss(probs_TE, topk_idx_TK, cfg.num_devices, cfg.device_loss_alpha)
    if cfg.comm_loss_alpha > 0 and cfg.num_devices > 1:
        total = total + comm_balance_loss(probs_TE, topk_idx_TK, cfg.num_devices,
                                          cfg.max_devices_per_token or cfg.num_devices, cfg.comm_loss_alpha)
    if cfg.seq_balance_alpha > 0:
        total = total + sequence_balance_loss(scores_TE, cfg.top_k, cfg.seq_balance_alpha, num_sequences, seq_T)
    if cfg.z_loss_coef > 0:
        total = total + router_z_loss(logits_TE, cfg.z_loss_coef)
    return total


@torch.no_grad()
def update_bias_(bias_E: torch.Tensor, load_E: torch.Tensor, speed: float) -> torch.Tensor:
    """Aux-loss-free balancing step (DeepSeek-V3 §2.1.2), in place: bᵢ += γ · sign(mean(load) − loadᵢ).

    Overloaded experts get a lower bias, underloaded ones a higher bias. Returns ``bias_E``.
    """
    load_E = load_E.to(torch.float32)
    bias_E.add_(torch.sign(load_E.mean() - load_E).to(bias_E.dtype), alpha=speed)
    return bias_E


def load_stats(tokens_per_expert_E: torch.Tensor) -> Dict[str, float]:
    """Balance statistics of one load vector: MaxVio = max_i load_i / mean_load − 1 (DeepSeek-V3's
    maximal violation) and the coefficient of variation std/mean. Both are 0 for an empty load."""
    load = tokens_per_expert_E.detach().to(torch.float64)
    mean = load.mean()
    if mean.item() == 0:
        return {"max_vio": 0.0, "cv": 0.0}
    return {"max_vio": (load.max() / mean - 1).item(), "cv": (load.std(unbiased=False) / mean).item()}


def all_reduce_load(load_E: torch.Tensor, group: Optional[object] = None, op: str = "sum") -> torch.Tensor:
    """A load vector reduced (``op``: "sum", or "max") over ``group`` (default: the world) when torch.distributed
    is initialised, else unchanged. A functional collective: it never modifies ``load_E``, and torch.compile
    traces it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return load_E
    from torch.distributed._functional_collectives import all_reduce

    return all_reduce(load_E.detach(), op, group or dist.group.WORLD)
