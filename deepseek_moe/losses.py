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


def _counts_BE(topk_idx_TK: torch.Tensor, num_experts: int, num_sequences: int) -> torch.Tensor:
    T, K = topk_idx_TK.shape
    idx_BP = topk_idx_TK.reshape(num_sequences, (T // num_sequences) * K)
    counts = torch.zeros(num_sequences, num_experts, dtype=torch.float32, device=topk_idx_TK.device)
    return counts.scatter_add_(1, idx_BP, torch.ones_like(idx_BP, dtype=torch.float32))


def _check_sequences(T: int, num_sequences: int) -> None:
    if num_sequences < 1 or T % num_sequences:
        raise ValueError(f"num_sequences={num_sequences} must be >= 1 and divide the token count T={T}")


def expert_fractions(topk_idx_TK: torch.Tensor, num_experts: int, num_sequences: int = 1) -> torch.Tensor:
    """f (B, E) = E/(K·S) · count of each expert in each sequence's top-K choices (1.0 when uniform)."""
    T, K = topk_idx_TK.shape
    _check_sequences(T, num_sequences)
    S = T // num_sequences
    return _counts_BE(topk_idx_TK, num_experts, num_sequences) * (num_experts / (K * max(S, 1)))


def mean_probs(probs_TE: torch.Tensor, num_sequences: int = 1) -> torch.Tensor:
    """P (B, E) = mean over each sequence's tokens of the routing probabilities (differentiable)."""
    T, E = probs_TE.shape
    _check_sequences(T, num_sequences)
    return _acc(probs_TE).reshape(num_sequences, T // num_sequences, E).mean(dim=1)


def expert_balance_loss(probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, alpha: float,
                        num_sequences: int = 1) -> torch.Tensor:
    """Expert-level balance loss α Σᵢ fᵢ Pᵢ (DeepSeekMoE eq. 12-14), averaged over ``num_sequences``.

    probs_TE: (T, E) routing probabilities (rows sum to 1); topk_idx_TK: (T, K). num_sequences=1 is the
    batch-level loss; B computes it per sequence (``seq_aux``) and averages. Uniform routing gives α; all
    tokens on the same K experts with probability 1/K each gives the maximum α·E/K.
    """
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    f_BE = expert_fractions(topk_idx_TK, probs_TE.shape[1], num_sequences)
    P_BE = mean_probs(probs_TE, num_sequences)
    return alpha * (f_BE * P_BE).sum(dim=-1).mean()


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


def sequence_balance_loss(scores_TE: torch.Tensor, top_k: int, alpha: float, num_sequences: int = 1
                          ) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (eq. 17-20), averaged over sequences.

    Per sequence: fᵢ = E/(K·S) Σ_t 1(i ∈ TopK(s_t)) on the raw scores (no bias, no group limit),
    Pᵢ = mean_t s_{t,i} / Σ_j s_{t,j}; loss α Σᵢ fᵢ Pᵢ.
    """
    if scores_TE.shape[0] == 0:
        return scores_TE.sum() * 0.0
    scores_TE = _acc(scores_TE)
    raw_topk_TK = scores_TE.detach().topk(top_k, dim=-1).indices
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return expert_balance_loss(probs_TE, raw_topk_TK, alpha, num_sequences)


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss (eq. 5): c_z · mean_t (logsumexp_j logits_{t,j})²."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coef * torch.logsumexp(_acc(logits_TE), dim=-1).square().mean()


def routing_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Probabilities used by the balance losses: softmax scores as they are, sigmoid scores normalised per
    token (as DeepSeek-V3 does), so that uniform routing gives exactly α for either score function."""
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def aux_loss_from_routing(cfg: MoEConfig, scores_TE: torch.Tensor, logits_TE: torch.Tensor,
                          topk_idx_TK: torch.Tensor, num_sequences: int = 1) -> torch.Tensor:
    """Sum of every loss ``cfg`` enables (coefficient > 0), as a 0-dim fp32 tensor.

    ``num_sequences`` is B for input of shape (B, S, H): used by ``seq_aux`` and the sequence-wise loss.
    """
    total = scores_TE.new_zeros((), dtype=torch.float32)
    probs_TE = routing_probs(scores_TE, cfg.score_func)
    if cfg.aux_loss_alpha > 0:
        total = total + expert_balance_loss(probs_TE, topk_idx_TK, cfg.aux_loss_alpha,
                                            num_sequences if cfg.seq_aux else 1)
    if cfg.device_loss_alpha > 0 and cfg.num_devices > 1:
        total = total + device_balance_loss(probs_TE, topk_idx_TK, cfg.num_devices, cfg.device_loss_alpha)
    if cfg.comm_loss_alpha > 0 and cfg.num_devices > 1:
        total = total + comm_balance_loss(probs_TE, topk_idx_TK, cfg.num_devices,
                                          cfg.max_devices_per_token or cfg.num_devices, cfg.comm_loss_alpha)
    if cfg.seq_balance_alpha > 0:
        total = total + sequence_balance_loss(scores_TE, cfg.top_k, cfg.seq_balance_alpha, num_sequences)
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


def all_reduce_load(load_E: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Sum a load vector over data-parallel ranks when torch.distributed is initialised (else unchanged)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        load_E = load_E.clone()
        dist.all_reduce(load_E, group=group)
    return load_E
