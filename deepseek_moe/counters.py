"""Load counters that count each training forward exactly once, whatever re-runs it.

Activation checkpointing runs a forward a second time inside backward. A Python check around the counter update
cannot see that when the layer is compiled: the compiled graph decides once, at trace time. The update is
therefore an opaque custom op that asks the autograd engine at run time whether it is inside a backward pass, so
eager, compiled, checkpointed (reentrant or not) and compiled-inside-checkpointed forwards all count once.

Legend: E routed experts.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("deepseek_moe::count_load", mutates_args=("total_E",))
def count_load(total_E: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``total_E += counts_E`` unless autograd is recomputing this forward (activation checkpointing); returns a
    copy of ``total_E`` after the update. A recomputed forward gets the total as it is then, which equals the
    original forward's when no other forward ran in between; losses built on the total keep the original value on
    their autograd node (``losses._DotWithConstant``) so that they never depend on that."""
    if torch._C._current_graph_task_id() == -1:
        total_E.add_(counts_E.to(total_E.dtype))
    return total_E.clone()


@count_load.register_fake
def _(total_E: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(total_E)
