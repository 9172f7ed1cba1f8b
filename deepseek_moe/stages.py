"""The layer's pipeline stages as profiler ranges, and the per-stage split of a profile (forward and backward).

The forward marks its stages with :func:`stage` (a ``torch.profiler.record_function`` range named
``deepseek_moe/<stage>``, entered only while a profiler records: otherwise a no-op, so a decode step pays nothing).
:func:`stage_times` splits a recorded profile into those stages: an op counts for the innermost stage range around
it; in the backward, an op counts for the stage whose forward op created the autograd node that runs it (profilers
record the forward op's sequence number on both), or for a stage range a custom backward opens itself.

Stages: router (gate GEMM, scores, top-k), plan (sort the pairs by expert), permute (gather the rows), gemm1_glu
(gate/up GEMM and the GLU·weight), gemm2 (down GEMM), combine (the weighted sum back per token), experts (an
implementation that fuses them all and cannot be split: the torch backend's segment loop, the CPU extension's ops),
shared_experts.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterable

import torch

STAGES = ("router", "plan", "permute", "gemm1_glu", "gemm2", "combine", "experts", "shared_experts")
PREFIX = "deepseek_moe/"
_BACKWARD = "autograd::engine::evaluate_function"
_NO_RANGE = contextlib.nullcontext()  # reusable: one for every call outside a profiler


def stage(name: str):
    """A profiler range for stage ``name`` (one of :data:`STAGES`) while a profiler records, else a no-op context.
    Raises ValueError for an unknown name."""
    if name not in STAGES:
        raise ValueError(f"stage: unknown stage {name!r}; expected one of {STAGES}")
    # Compiling first: a traced read of the profiler flag would guard the graph on it (a recompile per profile).
    if not torch.compiler.is_compiling() and torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(PREFIX + name)
    return _NO_RANGE


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def stage_times(events: Iterable, device: bool) -> Dict[str, float]:
    """Milliseconds per "<stage>/fwd" and "<stage>/bwd" (and "other/fwd", "other/bwd" for time outside every
    stage) from a profile's events (``torch.profiler.profile(...).events()``): each op's own time, the device's
    (``device``: kernels on the GPU) or the CPU's, summed per stage as the module docstring says."""
    events = list(events)
    seq_stage: Dict[int, str] = {}
    owner = {}
    for ev in events:
        chain = list(_ancestors(ev))
        in_backward = ev.name.startswith(_BACKWARD) or any(a.name.startswith(_BACKWARD) for a in chain)
        label = next((a.name[len(PREFIX):] for a in [ev] + chain if a.name.startswith(PREFIX)), None)
        owner[id(ev)] = (label, in_backward, chain)
        if label is not None and not in_backward and getattr(ev, "sequence_nr", -1) >= 0:
            seq_stage.setdefault(ev.sequence_nr, label)
    totals: Dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.name.startswith(PREFIX):
            continue  # a range's own time is its ops'
        label, in_backward, chain = owner[id(ev)]
        if in_backward and label is None:
            node = next((a for a in [ev] + chain if a.name.startswith(_BACKWARD)), None)
            label = seq_stage.get(getattr(node, "sequence_nr", -1))
        us = ev.self_device_time_total if device else ev.self_cpu_time_total
        totals[f"{label or 'other'}/{'bwd' if in_backward else 'fwd'}"] += us / 1e3
    return dict(totals)
