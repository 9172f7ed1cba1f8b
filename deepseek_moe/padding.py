"""The layer's input: its checks, padding masks (also for layers inside models that call ``mlp(x)``), and the
packing of the real tokens (:func:`pack`).

    with dm.padding_mask(attention_mask == 0):     # True marks padding, shape (B, S)
        out = model(input_ids, attention_mask=attention_mask)

The mask lives in a process-wide holder for the duration of the ``with`` block (nested blocks restore the outer
mask). Not a ``contextvars.ContextVar``: torch.compile cannot read one, and a compiled layer must see the mask
(``fullgraph=True`` included); a plain attribute it reads as a graph input. The price: the mask is shared by all
threads, so threads that run models concurrently pass ``padding_mask=`` to the layer instead.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch


class _Active:
    mask: Optional[torch.Tensor] = None
    input_ids: Optional[torch.Tensor] = None


_ACTIVE = _Active()


@contextlib.contextmanager
def _held(name: str, value: Optional[torch.Tensor]) -> Iterator[None]:
    """``_ACTIVE.<name>`` is ``value`` inside the block, the outer value again after it."""
    outer = getattr(_ACTIVE, name)
    setattr(_ACTIVE, name, value)
    try:
        yield
    finally:
        setattr(_ACTIVE, name, outer)


@contextlib.contextmanager
def padding_mask(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, every :class:`~deepseek_moe.DeepSeekMoELayer` called without ``padding_mask=`` uses
    ``mask``: a bool tensor of the layer input's leading shape (``x.shape[:-1]``, e.g. (B, S)), True at padded
    positions. ``None`` turns an outer mask off. A layer whose input has another leading shape raises ValueError.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"padding_mask: expected a bool tensor or None, got {type(mask).__name__}")
    with _held("mask", mask):
        yield


@contextlib.contextmanager
def input_ids(ids: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, every hash-routed :class:`~deepseek_moe.DeepSeekMoELayer` (``hash_vocab_size`` set) called
    without ``input_ids=`` routes by ``ids``: the token ids, an integer tensor of the layer input's leading shape
    (e.g. the model's (B, S) ``input_ids``). ``None`` turns an outer block off. Held like :func:`padding_mask`."""
    if ids is not None and (not isinstance(ids, torch.Tensor) or ids.is_floating_point()):
        raise TypeError(f"input_ids: expected an integer tensor or None, got {getattr(ids, 'dtype', type(ids))}")
    with _held("input_ids", ids):
        yield


def active_input_ids() -> Optional[torch.Tensor]:
    """The token ids set by the innermost :func:`input_ids` block, or None."""
    return _ACTIVE.input_ids


def check_input(x: torch.Tensor, config, training: bool, device: torch.device) -> None:
    """Check a layer's input x (..., H) against its ``config`` and the ``device`` of its parameters: TypeError for
    x not a tensor; ValueError for x not floating, of the wrong last dimension, on or beside the meta device, and
    in ``training`` for x not (B, S, H) when a balance loss is computed per sequence."""
    H = config.hidden_size
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"DeepSeekMoELayer: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"DeepSeekMoELayer: x must have a floating dtype, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != H:
        raise ValueError(f"DeepSeekMoELayer: x has shape {tuple(x.shape)}; its last dimension must be "
                         f"hidden_size={H}")
    if x.device.type == "meta" or device.type == "meta":
        # Routing decides data-dependent shapes (how many rows each expert gets): there is no meta kernel.
        raise ValueError(f"DeepSeekMoELayer: x is on device {x.device} and the layer's parameters on {device}; the "
                         f"layer runs on a real device. A layer built on 'meta' needs its weights first: "
                         f"layer.load_state_dict(state, assign=True), or layer.to_empty(device=...) then "
                         f"layer.reset_parameters() for a fresh initialisation")
    per_sequence_loss = ((config.aux_loss_alpha > 0 and config.resolved_balance_scope == "sequence")
                         or config.seq_balance_alpha > 0)
    if training and per_sequence_loss and x.dim() != 3:
        raise ValueError(f"DeepSeekMoELayer: x has shape {tuple(x.shape)}, but this config's balance loss is "
                         f"computed per sequence (seq_aux / balance_scope='sequence' / seq_balance_alpha) and needs x "
                         f"as (batch, seq, hidden_size); reshape the tokens of one sequence to (1, T, {H})")


def active_padding_mask() -> Optional[torch.Tensor]:
    """The mask set by the innermost :func:`padding_mask` block, or None."""
    return _ACTIVE.mask


def check_padding_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mask flattened to (T,) bool after checking it against x (..., H); ValueError naming what is wrong."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}; e.g. "
                         f"attention_mask == 0")
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"padding_mask has shape {tuple(mask.shape)}; expected the input's leading shape "
                         f"{tuple(x.shape[:-1])} (x is {tuple(x.shape)})")
    if mask.device != x.device:
        raise ValueError(f"padding_mask is on {mask.device}, the input on {x.device}")
    return mask.reshape(-1)


def pack(x: torch.Tensor, mask: Optional[torch.Tensor]
         ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The real tokens of x (..., H): (x_TH (T, H), seq_T, unpack).

    ``mask``: bool ``x.shape[:-1]``, True at padding (checked: ValueError), or None (nothing removed). ``seq_T``:
    int64 (T,) the sequence of each real token when x is (B, S, H) and padded, else None. ``unpack(t_TD)``
    puts rows of the real tokens back at their positions among all A = x.numel() / H, zeros at padding: (A, D).
    """
    H = x.shape[-1]
    x_AH = x if x.dim() == 2 else x.reshape(-1, H)
    if mask is None:
        return x_AH, None, lambda t_TD: t_TD
    A = x_AH.shape[0]
    real_R = torch.nonzero(~check_padding_mask(mask, x)).squeeze(1)
    sequences = x.shape[0] if x.dim() == 3 else 1
    seq_T = torch.div(real_R, A // max(sequences, 1), rounding_mode="floor")
    return x_AH.index_select(0, real_R), seq_T, lambda t_TD: t_TD.new_zeros(A, t_TD.shape[1]).index_copy(0, real_R,
                                                                                                          t_TD)


def _attention_mask_2d(inputs) -> Optional[torch.Tensor]:
    """The batch's (B, S) ``attention_mask`` (0 = padding), or None when it has none of that shape."""
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _padding_from_attention_mask(inputs) -> Optional[torch.Tensor]:
    """(B, S) bool padding mask from a 2-D ``attention_mask``, None when nothing is padded."""
    mask = _attention_mask_2d(inputs)
    if mask is None:
        return None
    padding = mask == 0
    return padding if bool(padding.any()) else None


@contextlib.contextmanager
def attention_mask_padding(inputs) -> Iterator[None]:
    """Within the block, the 2-D ``attention_mask`` of ``inputs`` (a model's keyword arguments; 0 = padding) is
    the layers' padding mask, as in :func:`deepseek_moe.hf.aux_loss_trainer`, unless a mask is already active or
    ``inputs`` has none (then nothing changes)."""
    padding = None if active_padding_mask() is not None else _padding_from_attention_mask(inputs)
    if padding is None:
        yield
        return
    with padding_mask(padding):
        yield
