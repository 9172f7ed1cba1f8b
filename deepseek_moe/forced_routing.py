"""Expert ids imposed on the router instead of chosen by it: ids replayed from a recording (router replay,
:func:`forced_topk`) and the frozen token-id table of hash-routed layers (DeepSeek-V4, :func:`hashed_topk`). Both
give int64 (T, K) ids for the real tokens, checked with errors that name the layer and the first bad position; the
router weights the ids with its live scores.

Legend: T real tokens, A all positions of the input, K experts per token, E routed experts, V vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import MoEConfig


def _first_row(bad_T: torch.Tensor, positions: Optional[torch.Tensor], shape: tuple) -> str:
    """The input position (an index into x.shape[:-1]) of the first True row of bad_T, for error messages."""
    t = int(bad_T.nonzero()[0, 0])
    a = t if positions is None else int(positions[t])
    index = []
    for size in reversed(shape):
        a, i = divmod(a, size)
        index.append(i)
    return str(tuple(reversed(index)))


def _distinct_per_row(values_TK: torch.Tensor) -> torch.Tensor:
    """(T,) how many different values each row holds."""
    s_TK = values_TK.sort(dim=-1).values
    return 1 + (s_TK[:, 1:] != s_TK[:, :-1]).sum(dim=-1)


def forced_topk(topk_idx: torch.Tensor, x: torch.Tensor, padding_A: Optional[torch.Tensor], cfg: MoEConfig,
                who: str = "DeepSeekMoELayer") -> torch.Tensor:
    """The expert ids a caller imposes (router replay), checked, as int64 (T, K) for the real tokens.

    topk_idx: integer ``x.shape[:-1] + (K,)``, −1 at padded positions (``padding_A``: bool (A,) or None). The
    checks that read values run in eager mode only (under torch.compile they would synchronise and break the
    graph). Raises TypeError for a non-integer tensor; ValueError naming ``who`` and the first offending position
    for a wrong shape, ids outside [0, E) other than −1 (at padded positions nothing is read), −1 at a position
    that is not padding, an expert repeated
    within a row, or a row that group-limited (``topk_groups``) or device-limited (``max_devices_per_token``)
    routing could not have picked.
    """
    K, E = cfg.top_k, cfg.num_routed_experts
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.is_floating_point() or topk_idx.is_complex() \
            or topk_idx.dtype == torch.bool:
        raise TypeError(f"{who}: topk_idx must be an integer tensor of expert ids, got "
                        f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)}")
    expected = tuple(x.shape[:-1]) + (K,)
    if tuple(topk_idx.shape) != expected:
        raise ValueError(f"{who}: topk_idx has shape {tuple(topk_idx.shape)}; expected x.shape[:-1] + (top_k,) = "
                         f"{expected}")
    ids_AK = topk_idx.reshape(-1, K).to(device=x.device, dtype=torch.int64)
    if not torch.compiler.is_compiling() and ids_AK.is_inference() and not torch.is_inference_mode_enabled():
        ids_AK = ids_AK.clone()  # ids recorded by a rollout under inference_mode: autograd cannot save those
    positions = None if padding_A is None else (~padding_A).nonzero().squeeze(1)
    ids_TK = ids_AK if positions is None else ids_AK.index_select(0, positions)
    if torch.compiler.is_compiling():
        return ids_TK
    shape = tuple(x.shape[:-1])
    bad_T = ((ids_TK < -1) | (ids_TK >= E)).any(dim=-1)  # padded positions are never read
    if bool(bad_T.any()):
        raise ValueError(f"{who}: topk_idx at position {_first_row(bad_T, positions, shape)} holds "
                         f"{ids_TK[bad_T][0].tolist()}: expert ids must lie in [0, {E}) (−1 marks padding)")
    unset_T = (ids_TK == -1).any(dim=-1)
    if bool(unset_T.any()):
        raise ValueError(f"{who}: topk_idx holds -1 at position {_first_row(unset_T, positions, shape)}, which is "
                         f"not padding (-1 marks padded positions; pass the padding mask the ids were recorded "
                         f"with)")
    repeated_T = _distinct_per_row(ids_TK) < K
    if bool(repeated_T.any()):
        raise ValueError(f"{who}: topk_idx at position {_first_row(repeated_T, positions, shape)} repeats an "
                         f"expert: {ids_TK[repeated_T][0].tolist()}; a token's K experts are distinct")
    limits = []
    if cfg.num_groups > 1:
        limits.append(("group-limited", "groups", E // cfg.num_groups, cfg.topk_groups,
                       f"num_groups={cfg.num_groups}, topk_groups={cfg.topk_groups}"))
    if cfg.max_devices_per_token is not None and cfg.max_devices_per_token < cfg.num_devices:
        limits.append(("device-limited", "devices", E // cfg.num_devices, cfg.max_devices_per_token,
                       f"num_devices={cfg.num_devices}, max_devices_per_token={cfg.max_devices_per_token}"))
    for kind, unit, size, most, setting in limits:
        spread_T = _distinct_per_row(torch.div(ids_TK, size, rounding_mode="floor"))
        over_T = spread_T > most
        if bool(over_T.any()):
            raise ValueError(f"{who}: topk_idx at position {_first_row(over_T, positions, shape)} picks experts "
                             f"{ids_TK[over_T][0].tolist()} in {int(spread_T[over_T][0])} {unit}, which "
                             f"{kind} routing ({setting}) could not have picked: at most {most} {unit} per token")
    return ids_TK


def default_hash_table(vocab_size: int, num_experts: int, top_k: int,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """A token-id -> expert-ids table (V, K) int64 for a fresh hash-routed layer: token v takes experts
    (h(v) + k·⌊E/K⌋) mod E, k < K, with h Knuth's multiplicative hash (bits 16-31) mod E: K distinct experts
    per token, every expert used by about V·K/E tokens, no random numbers drawn. Trained models load their own
    table."""
    v = torch.arange(vocab_size, dtype=torch.int64, device=device)
    h = (v * 2654435761) % (2 ** 32) // (2 ** 16) % num_experts  # the product's middle bits mix best
    return (h.unsqueeze(1) + torch.arange(top_k, device=device) * (num_experts // top_k)) % num_experts


def hashed_topk(tid2eid: torch.Tensor, input_ids: Optional[torch.Tensor], x: torch.Tensor,
                padding_A: Optional[torch.Tensor], cfg: MoEConfig, who: str = "DeepSeekMoELayer") -> torch.Tensor:
    """Hash routing (Roller et al. 2021; DeepSeek-V4's first MoE layers): the real tokens' experts
    ``tid2eid[input_ids]``, int64 (T, K).

    Raises ValueError naming ``who`` for missing ids (neither ``input_ids=`` nor :func:`deepseek_moe.input_ids`),
    ids of another shape than ``x.shape[:-1]`` or not integer, ids outside [0, hash_vocab_size), and a table row
    with an expert outside [0, E) or repeated (checked on the rows used, in eager mode)."""
    if input_ids is None:
        raise ValueError(f"{who}: a hash-routed layer (hash_vocab_size={cfg.hash_vocab_size}) needs the token ids: "
                         f"pass input_ids= to the layer, or run the model inside `with deepseek_moe.input_ids(ids):`")
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"{who}: input_ids must be an integer tensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if tuple(input_ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{who}: input_ids has shape {tuple(input_ids.shape)}; expected x.shape[:-1] = "
                         f"{tuple(x.shape[:-1])}")
    ids_A = input_ids.reshape(-1).to(device=tid2eid.device, dtype=torch.int64)
    positions = None if padding_A is None else (~padding_A).nonzero().squeeze(1).to(tid2eid.device)
    ids_T = ids_A if positions is None else ids_A.index_select(0, positions)
    if not torch.compiler.is_compiling():
        V, shape = tid2eid.shape[0], tuple(x.shape[:-1])
        bad_T = (ids_T < 0) | (ids_T >= V)
        if bool(bad_T.any()):
            raise ValueError(f"{who}: input_ids at position {_first_row(bad_T, positions, shape)} is "
                             f"{int(ids_T[bad_T][0])}, outside the table's vocabulary [0, hash_vocab_size={V})")
    rows_TK = tid2eid.index_select(0, ids_T)
    if not torch.compiler.is_compiling():
        E, K = cfg.num_routed_experts, cfg.top_k
        bad_T = ((rows_TK < 0) | (rows_TK >= E)).any(dim=-1) | (_distinct_per_row(rows_TK) < K)
        if bool(bad_T.any()):
            token, row = int(ids_T[bad_T][0]), rows_TK[bad_T][0]
            hint = ("; an all-zero table is the placeholder transformers' DeepseekV4HashRouter holds until a "
                    "checkpoint fills it: load the checkpoint's table, or write one "
                    "(deepseek_moe.forced_routing.default_hash_table)" if not bool(tid2eid.any()) else "")
            raise ValueError(f"{who}: gate.tid2eid[{token}] = {row.tolist()}: a row of the hash table must hold "
                             f"top_k={K} distinct experts in [0, {E}){hint}")
    return rows_TK
