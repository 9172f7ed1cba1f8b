"""Padding masks for layers that cannot take one as an argument (inside models that call ``mlp(x)``).

    with dm.padding_mask(attention_mask == 0):     # True marks padding, shape (B, S)
        out = model(input_ids, attention_mask=attention_mask)

A context variable (like ``torch.autocast``'s state) rather than a module attribute: it is scoped to the
``with`` block and to the current thread or task, and it never outlives the forward it was meant for.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

_ACTIVE: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar("deepseek_moe_padding_mask",
                                                                               default=None)


@contextlib.contextmanager
def padding_mask(mask: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, every :class:`~deepseek_moe.DeepSeekMoELayer` called without ``padding_mask=`` uses
    ``mask``: a bool tensor of the layer input's leading shape (``x.shape[:-1]``, e.g. (B, S)), True at padded
    positions. ``None`` turns an outer mask off. A layer whose input has another leading shape raises ValueError.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"padding_mask: expected a bool tensor or None, got {type(mask).__name__}")
    token = _ACTIVE.set(mask)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_padding_mask() -> Optional[torch.Tensor]:
    """The mask set by the innermost :func:`padding_mask` block, or None."""
    return _ACTIVE.get()


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
