"""Padding masks for layers that cannot take one as an argument (inside models that call ``mlp(x)``).

    with dm.padding_mask(attention_mask == 0):     # True marks padding, shape (B, S)
        out = model(input_ids, attention_mask=attention_mask)

The mask lives in a process-wide holder for the duration of the ``with`` block (nested blocks restore the outer
mask). Not a ``contextvars.ContextVar``: torch.compile cannot read one, and a compiled layer must see the mask
(``fullgraph=True`` included); a plain attribute it reads as a graph input. The price: the mask is shared by all
threads, so threads that run models concurrently pass ``padding_mask=`` to the layer instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


class _Active:
    mask: Optional[torch.Tensor] = None


_ACTIVE = _Active()


@contextlib.contextmanager
def padding_mask(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, every :class:`~deepseek_moe.DeepSeekMoELayer` called without ``padding_mask=`` uses
    ``mask``: a bool tensor of the layer input's leading shape (``x.shape[:-1]``, e.g. (B, S)), True at padded
    positions. ``None`` turns an outer mask off. A layer whose input has another leading shape raises ValueError.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"padding_mask: expected a bool tensor or None, got {type(mask).__name__}")
    outer, _ACTIVE.mask = _ACTIVE.mask, mask
    try:
        yield
    finally:
        _ACTIVE.mask = outer


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
