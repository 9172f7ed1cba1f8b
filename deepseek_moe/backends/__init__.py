"""Backend registry: pick the implementation of the routed experts by name, with reasons when one can't run.

``select("auto", device, dtype, activation)`` honours the env var ``DEEPSEEK_MOE_BACKEND``; otherwise it picks
``triton`` on CUDA when triton is installed and supports the dtype, ``ext`` on CPU for fp32 when the compiled
extension is built or loaded (auto never compiles), else ``torch``. The fused backends (triton, ext) implement the
SiLU GLU only: for another ``hidden_act`` auto picks ``torch``. ``select`` returns a backend configured for the
device and dtype (the torch backend's strategy: ``DEEPSEEK_MOE_TORCH_STRATEGY`` or by device); the environment is
read there, once per selection, never per forward. Optional dependencies are imported only when a backend runs;
importing this package never imports them.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..config import BACKENDS
from .base import Backend
from .eager import EagerBackend
from .ext import ExtBackend
from .grouped import STRATEGIES, TorchBackend
from .triton import TritonBackend

__all__ = ["Backend", "BackendUnavailable", "EagerBackend", "ExtBackend", "TorchBackend", "TritonBackend", "select",
           "selected_spec", "from_spec", "backend_status"]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to install or change."""


_BUILTIN: Dict[str, Backend] = {"eager": EagerBackend(), "torch": TorchBackend(), "triton": TritonBackend(),
                                "ext": ExtBackend()}
_TORCH_STRATEGIES = ("auto",) + STRATEGIES


def _configured(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """Backend ``name`` configured for (device, dtype)."""
    if name == "torch":
        strategy = os.environ.get("DEEPSEEK_MOE_TORCH_STRATEGY", "auto").strip() or "auto"
        if strategy not in _TORCH_STRATEGIES:
            raise ValueError(f"DEEPSEEK_MOE_TORCH_STRATEGY={strategy!r} is invalid; expected one of {_TORCH_STRATEGIES}")
        return TorchBackend.for_device(device, dtype, strategy)
    if name == "ext":
        return ExtBackend.for_device(device, dtype)
    return _BUILTIN[name]

# Contract names whose implementations are not part of this release: selecting one says so plainly.
_NOT_IN_RELEASE = {
    "megablocks": "the megablocks adapter is not part of this release; use backend='torch'",
}


def _resolve_name(name: str, device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                  activation: str = "silu") -> str:
    if name == "auto":
        env = os.environ.get("DEEPSEEK_MOE_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"DEEPSEEK_MOE_BACKEND={env!r} is invalid; expected one of {BACKENDS}")
            return env
        fused_ok = activation == "silu"
        if fused_ok and device.type == "cuda" and _BUILTIN["triton"].unavailable_reason(device, dtype) is None:
            return "triton"
        # On CPU the compiled extension measured 2-7% faster than the torch backend for fp32 (docs/benchmarks.md);
        # auto uses it only when that needs no compiling (built ahead of time, or loaded already).
        if fused_ok and device.type == "cpu" and dtype == torch.float32 and _BUILTIN["ext"].ready():
            return "ext"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid; expected one of {BACKENDS}")
    return name


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, activation: str = "silu"
                       ) -> Optional[str]:
    """None if backend ``name`` can run on (device, dtype) with the GLU gate ``activation``, else why not."""
    device = torch.device(device)
    name = _resolve_name(name, device, dtype, activation)
    if name in _NOT_IN_RELEASE:
        return _NOT_IN_RELEASE[name]
    try:
        configured = _configured(name, device, dtype)
    except ValueError as err:  # an invalid DEEPSEEK_MOE_TORCH_STRATEGY
        return str(err)
    return _BUILTIN[name].activation_reason(activation) or configured.unavailable_reason(device, dtype)


def select(name: str = "auto", device: torch.device = torch.device("cpu"),
           dtype: torch.dtype = torch.float32, activation: str = "silu") -> Backend:
    """The backend object for ``name`` ("auto" | "eager" | "torch" | ...) on (device, dtype) for experts with the
    GLU gate ``activation``.

    Raises ValueError for an unknown name and :class:`BackendUnavailable` (with the reason) for a known
    backend that cannot run here.
    """
    device = torch.device(device)
    resolved = _resolve_name(name, device, dtype, activation)
    if resolved in _BUILTIN:
        # Refuse an unsupported activation before prepare() can start a build.
        reason = _BUILTIN[resolved].activation_reason(activation)
        if reason is not None:
            via = " (from DEEPSEEK_MOE_BACKEND)" if name == "auto" else ""
            raise BackendUnavailable(f"backend {resolved!r}{via} cannot run these experts: {reason}")
    named = name != "auto" or os.environ.get("DEEPSEEK_MOE_BACKEND", "").strip() not in ("", "auto")
    if named and resolved in _BUILTIN:  # chosen by name (argument or DEEPSEEK_MOE_BACKEND): build or load it
        _BUILTIN[resolved].prepare()
    configured = _configured(resolved, device, dtype) if resolved in _BUILTIN else None  # ValueError: a bad env
    reason = unavailable_reason(resolved, device, dtype, activation)
    if reason is not None:
        raise BackendUnavailable(f"backend {resolved!r} is unavailable on {device} / {dtype}: {reason}")
    return configured


@torch.compiler.assume_constant_result
def selected_spec(name: str, device: torch.device, dtype: torch.dtype, activation: str = "silu") -> str:
    """:func:`select`'s backend as a string for :func:`from_spec`. Under torch.compile it runs once, at trace time,
    and its result is a constant of the graph: it reads the environment and the filesystem, which dynamo cannot
    trace."""
    backend = select(name, device, dtype, activation)
    return ":".join([backend.name, getattr(backend, "strategy", ""), str(getattr(backend, "pad_multiple", "")),
                     str(getattr(backend, "few_rows_per_expert", ""))])


def from_spec(spec: str) -> Backend:
    """The backend that :func:`selected_spec` describes."""
    name, strategy, pad, few_rows = spec.split(":")
    if name == "torch":
        return TorchBackend(strategy, int(pad), int(few_rows))
    if name == "ext":
        return ExtBackend(strategy)
    return _BUILTIN[name]


def backend_status(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                   activation: str = "silu") -> Dict[str, Optional[str]]:
    """{backend name: None if usable on (device, dtype) with ``activation`` else the reason} for every named
    backend."""
    return {name: unavailable_reason(name, device, dtype, activation) for name in BACKENDS if name != "auto"}
