"""Backend registry: build the routed-experts implementation by name, once, with reasons when one can't run.

``select(name, device, dtype, activation, inference=..., sizes=...)`` returns an implementation configured for
that device, dtype, GLU activation and mode (``inference``: no backward follows) and the experts' (H, I). It is
the only place that reads the environment (``DEEPSEEK_MOE_BACKEND``, ``DEEPSEEK_MOE_TORCH_STRATEGY``, Triton's
tile overrides and interpreter mode) or the filesystem (an ahead-of-time build of the extension); the layer calls
it once per (device, dtype, mode) and a forward never again.

``auto`` picks ``triton`` on CUDA when triton is installed and supports the dtype, ``ext`` on CPU for fp32 when an
ahead-of-time build of the extension is installed (an install property: never whether something in this process
loaded it), else ``torch``. Under ``torch.use_deterministic_algorithms(True)`` the implementation is selected
batch-invariant (``batch_invariant=True``; :mod:`deepseek_moe.invariant`): ``auto`` then never picks ``ext``, and a
backend that cannot compute so refuses with the reason. The fused implementations (triton, ext) compute the SiLU
GLU only: for another ``hidden_act`` auto picks ``torch``. Optional dependencies are imported only when an
implementation runs.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch

from .. import ext as _ext
from .. import invariant
from ..config import BACKENDS
from .base import Backend
from .eager import EagerBackend
from .ext import ExtBackend
from .ext import blocks_supported as _ext_blocks_supported
from .grouped import STRATEGIES, TorchBackend
from .triton import TritonBackend

__all__ = ["Backend", "BackendUnavailable", "EagerBackend", "ExtBackend", "TorchBackend", "TritonBackend", "select",
           "selected_spec", "from_spec", "backend_status", "for_experts_implementation", "decode_tokens"]

# Inference on at most this many tokens on the CPU is decoding: the experts' GEMMs are matrix-vector products bound
# by reading the weights, which the extension's "decode" strategy streams once (csrc/cpu/expert_gemv.cpp); above,
# the segment loop is faster. Where the "blocks" strategy (brgemm) runs the dtype, decoding ends where blocks
# overtakes the streaming op instead (the layer, cold weights, H = 1024, 64 × 352 + 2 shared, top-6, both in one
# run, docs/benchmarks.md). With AVX-512 (the blocks op on AMX tiles or oneDNN's AVX-512 brgemm): fp32 near 32 tokens
# (within 5% either way there), bf16 between 12 and 16. With AVX2 only (AMD Zen 3: fp32 brgemm, bf16 widened to it):
# both between 64 and 96.
DECODE_TOKENS = 16
_DECODE_TOKENS_BESIDE_BLOCKS = {"AVX512": {torch.float32: 32, torch.bfloat16: 12},
                                "AVX2": {torch.float32: 64, torch.bfloat16: 64}}
# The name under which deepseek_moe.hf registers its experts function with transformers.
TRANSFORMERS_NAME = "deepseek_moe"
# transformers' experts_implementation of a converted model -> our backend (None: the layer's config.backend).
# Its "eager" is a per-expert loop, whose counterpart is our reference. "grouped_mm" (its default) and "batched_mm"
# are its fast paths for many and for few tokens (generate() switches to "batched_mm" for decoding on GPUs); our
# backends choose their path by the token count themselves, so both run the layer's backend.
_TRANSFORMERS_NAMES = {"eager": "eager", "grouped_mm": None, "batched_mm": None, TRANSFORMERS_NAME: None}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to install or change."""


_CLASSES = {"eager": EagerBackend, "torch": TorchBackend, "triton": TritonBackend, "ext": ExtBackend}
_TORCH_STRATEGIES = ("auto",) + STRATEGIES
# Contract names whose implementations are not part of this release: selecting one says so plainly.
_NOT_IN_RELEASE = {
    "megablocks": ("no megablocks backend in this release: megablocks 0.10.0 (its newest) pins torch>=2.7.0,<2.7.1, "
                   "below this package's torch>=2.10; use backend='triton' or 'torch'"),
}


def _env_backend() -> str:
    env = os.environ.get("DEEPSEEK_MOE_BACKEND", "").strip()
    if env and env != "auto" and env not in BACKENDS:
        raise ValueError(f"DEEPSEEK_MOE_BACKEND={env!r} is invalid; expected one of {BACKENDS}")
    return "" if env == "auto" else env


def _resolve_name(name: str, device: torch.device, dtype: torch.dtype, activation: str,
                  batch_invariant: bool = False, decode: bool = False, inference: bool = False,
                  sizes: Optional[Tuple[int, int]] = None) -> str:
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is invalid; expected one of {BACKENDS}")
        return name
    env = _env_backend()
    if env:
        return env
    fused_ok = activation == "silu"
    if fused_ok and device.type == "cuda" and TritonBackend(activation).unavailable_reason(device, dtype) is None:
        return "triton"
    # On CPU the compiled extension measured 2-7% faster than the torch backend for fp32 training, and its inference
    # ops (decode: the weights of a few tokens' experts streamed once; blocks: brgemm over sorted blocks) faster in
    # fp32 and bf16; batch-invariant inference runs its decode op at every token count, also faster than the torch
    # backend's tiles (docs/benchmarks.md). Batch-invariant training: torch.
    if fused_ok and device.type == "cpu" and _ext.has_prebuilt() and (inference or not batch_invariant):
        if dtype == torch.float32 or (dtype == torch.bfloat16 and (
                decode or inference and (batch_invariant or _blocks_bf16(sizes)))):
            return "ext"
    return "torch"


def _blocks_bf16(sizes: Optional[Tuple[int, int]]) -> bool:
    """Whether the extension's blocks op runs bf16 of these sizes here (loading the ahead-of-time build to ask)."""
    ExtBackend.prepare()
    return _ext_blocks_supported(torch.bfloat16, sizes)


def _build(name: str, device: torch.device, dtype: torch.dtype, activation: str, inference: bool,
           sizes: Optional[Tuple[int, int]], batch_invariant: bool = False, decode: bool = False) -> Backend:
    """Implementation ``name`` configured for (device, dtype, activation, mode); ValueError for a bad
    DEEPSEEK_MOE_TORCH_STRATEGY."""
    if name == "torch":
        strategy = os.environ.get("DEEPSEEK_MOE_TORCH_STRATEGY", "auto").strip() or "auto"
        if strategy not in _TORCH_STRATEGIES:
            raise ValueError(f"DEEPSEEK_MOE_TORCH_STRATEGY={strategy!r} is invalid; expected one of "
                             f"{_TORCH_STRATEGIES}")
        return TorchBackend.for_device(device, dtype, strategy, inference, activation, sizes, batch_invariant)
    if name == "ext":
        backend = ExtBackend.for_device(device, dtype, activation, decode, inference, sizes, batch_invariant)
    elif name == "triton":
        backend = TritonBackend.for_device(device, dtype, activation, sizes)
    else:
        backend = _CLASSES[name](activation)
    backend.batch_invariant = batch_invariant
    return backend


def for_experts_implementation(experts_implementation: Optional[str], configured: str) -> str:
    """The backend a layer converted from transformers runs under the model's ``experts_implementation`` (None:
    ``configured``, the layer's ``config.backend``); a backend named explicitly (not "auto") wins. Raises
    ValueError for a name without a counterpart here, listing the supported ones."""
    if experts_implementation is None:
        return configured
    if experts_implementation not in _TRANSFORMERS_NAMES:
        raise ValueError(f"experts_implementation={experts_implementation!r} has no counterpart in deepseek_moe's "
                         f"converted layers; supported: 'eager' (the reference loop), 'grouped_mm', 'batched_mm' "
                         f"and {TRANSFORMERS_NAME!r} (the layer's backend, {configured!r}). Choose one with "
                         f"model.set_experts_implementation(...)")
    return (_TRANSFORMERS_NAMES[experts_implementation] if configured == "auto" else None) or configured


def _refusal(name: str, activation: str, batch_invariant: bool = False) -> Optional[str]:
    """Why implementation ``name`` cannot compute experts with the GLU ``activation`` (batch-invariantly) at all
    (not in this release, another activation), before anything is built or loaded; None if it can."""
    reason = _NOT_IN_RELEASE.get(name) or _CLASSES[name].activation_reason(activation)
    if reason is None and batch_invariant and _CLASSES[name].not_batch_invariant:
        reason = _invariance_refusal(_CLASSES[name].not_batch_invariant)
    return reason


def _invariance_refusal(reason: str) -> str:
    return f"under torch.use_deterministic_algorithms(True) it must compute batch-invariantly, but {reason}"


def _status(name: str, device: torch.device, dtype: torch.dtype, activation: str) -> Optional[str]:
    """None when implementation ``name`` can run on (device, dtype) with ``activation``, else why not."""
    reason = _refusal(name, activation)
    if reason is not None:
        return reason
    try:
        return _build(name, device, dtype, activation, False, None).unavailable_reason(device, dtype)
    except ValueError as err:  # an invalid DEEPSEEK_MOE_TORCH_STRATEGY
        return str(err)


def select(name: str = "auto", device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
           activation: str = "silu", *, inference: bool = False,
           sizes: Optional[Tuple[int, int]] = None, batch_invariant: bool = False, decode: bool = False) -> Backend:
    """The implementation ``name`` ("auto" | "eager" | "torch" | "triton" | "ext" | "megablocks") configured for
    (device, dtype), experts with the GLU gate ``activation`` and of ``sizes`` (hidden_size, expert_hidden_size)
    when known, for forwards with (``inference=False``) or without a backward, batch-invariant when
    ``batch_invariant`` (the layer asks for it under ``torch.use_deterministic_algorithms(True)``), for decoding
    when ``decode`` (inference on at most :func:`decode_tokens` tokens on the CPU: ``ext`` then streams the
    weights, strategy "decode"; ``auto`` picks it when an ahead-of-time build is installed).

    A backend chosen by name (argument or ``DEEPSEEK_MOE_BACKEND``) that needs a build or a load (ext) gets it
    here. Raises ValueError for an unknown name or a bad environment variable, and :class:`BackendUnavailable`
    (with the reason) for a known backend that cannot run here.
    """
    device = torch.device(device)
    decode = decode and inference and device.type == "cpu"
    resolved = _resolve_name(name, device, dtype, activation, batch_invariant, decode, inference, sizes)
    via = " (from DEEPSEEK_MOE_BACKEND)" if name == "auto" and _env_backend() else ""
    reason = _refusal(resolved, activation, batch_invariant)
    if reason is None:
        if resolved == "ext":
            ExtBackend.prepare()  # build or load it before asking whether it can run
        # ValueError: a bad environment
        backend = _build(resolved, device, dtype, activation, inference, sizes, batch_invariant, decode)
        reason = backend.unavailable_reason(device, dtype)
        if reason is None and batch_invariant:
            reason = backend.invariance_reason(device, dtype)
            reason = reason and _invariance_refusal(reason)
    if reason is not None:
        raise BackendUnavailable(f"backend {resolved!r}{via} cannot run on {device} / {dtype}: {reason}")
    return backend


def decode_tokens(dtype: torch.dtype, sizes: Optional[Tuple[int, int]] = None) -> int:
    """The most tokens an inference call on the CPU in ``dtype`` may have to be a decode step: where the loaded
    extension's blocks op runs (dtype, sizes), the measured crossover with the streaming op, else
    :data:`DECODE_TOKENS`."""
    crossover = _DECODE_TOKENS_BESIDE_BLOCKS.get(_vector_isa(), {})
    if dtype in crossover and _ext_blocks_supported(dtype, sizes):
        return crossover[dtype]
    return DECODE_TOKENS


@functools.lru_cache(maxsize=None)
def _vector_isa() -> str:
    """ATen's CPU capability ("AVX512" where the CPU has AVX-512, "AVX2", ...), which the extension's kernels
    choose by as well (csrc/cpu/cpu_features.h)."""
    return torch.backends.cpu.get_cpu_capability()


def selected(cache: Dict[tuple, Backend], name: str, device: torch.device, dtype: torch.dtype, activation: str,
             sizes: Tuple[int, int], tokens: Optional[int] = None) -> Backend:
    """:func:`select` for (name, device, dtype, grad mode, whether ``tokens`` is a decode step), kept in ``cache``
    (selection reads the environment and the filesystem, so once per key); under torch.compile a trace-time
    constant (:func:`selected_spec`), nothing cached: a graph traced without autograd gets the inference
    implementation as in eager mode, and with ``tokens`` symbolic the decode decision becomes a guard on it
    (crossing :func:`decode_tokens` recompiles). The selection without the decode flag comes first: it loads
    the extension where it is chosen, and what the extension can run sets where decoding ends
    (:func:`decode_tokens`), so the first call decides as every later one."""
    batch_invariant = invariant.enabled()
    inference = not torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        spec = selected_spec(name, device, dtype, activation, sizes, batch_invariant, inference)
        if (inference and device.type == "cpu" and tokens is not None
                and tokens <= _decode_limit(dtype, sizes)):
            spec = selected_spec(name, device, dtype, activation, sizes, batch_invariant, inference, True)
        return from_spec(spec)
    key = (name, device, dtype, inference, batch_invariant, False)
    if key not in cache:
        cache[key] = select(name, device, dtype, activation, inference=inference, sizes=sizes,
                            batch_invariant=batch_invariant)
    if not (inference and device.type == "cpu" and tokens is not None and tokens <= decode_tokens(dtype, sizes)):
        return cache[key]
    key = key[:-1] + (True,)
    if key not in cache:
        cache[key] = select(name, device, dtype, activation, inference=inference, sizes=sizes,
                            batch_invariant=batch_invariant, decode=True)
    return cache[key]


def selected_spec(name: str, device: torch.device, dtype: torch.dtype, activation: str = "silu",
                  sizes: Optional[Tuple[int, int]] = None, batch_invariant: bool = False, inference: bool = False,
                  decode: bool = False) -> str:
    """:func:`select`'s implementation for a graph traced by torch.compile, as a string for :func:`from_spec`: the
    inference form where it traces (:meth:`Backend.traces`), else the one with a backward. It runs once, at trace
    time, and its result is a constant of the graph: it reads the environment and the filesystem, which dynamo
    cannot trace."""
    backend = select(name, device, dtype, activation, inference=inference, sizes=sizes,
                     batch_invariant=batch_invariant, decode=decode)
    if inference and not backend.traces():
        backend = select(name, device, dtype, activation, sizes=sizes, batch_invariant=batch_invariant)
    return backend.spec()


def _decode_limit(dtype: torch.dtype, sizes: Optional[Tuple[int, int]]) -> int:
    """:func:`decode_tokens` at trace time, a constant of the graph; called after the selection without the decode
    flag, which loads the extension that decides where decoding ends."""
    return decode_tokens(dtype, sizes)


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (1.6 s, and triton with it) when
# the package is imported; the fullgraph compile tests fail loudly should a torch release change the marker.
selected_spec._dynamo_marked_constant = True
_decode_limit._dynamo_marked_constant = True


def from_spec(spec: str) -> Backend:
    """The implementation that :meth:`Backend.spec` describes."""
    name, activation, batch_invariant, *rest = spec.split(":")
    if name == "torch":
        strategy, pad, inference = rest
        backend = TorchBackend(strategy, int(pad), bool(int(inference)), activation)
    elif name == "ext":
        backend = ExtBackend(rest[0], activation)
    elif name == "triton":
        backend = TritonBackend(activation, [int(v) for v in rest] or None)
    else:
        backend = _CLASSES[name](activation)
    backend.batch_invariant = bool(int(batch_invariant))
    return backend


def backend_status(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                   activation: str = "silu") -> Dict[str, Optional[str]]:
    """{backend name: None if usable on (device, dtype) with ``activation`` else the reason} for every named
    backend. Queries only: builds and loads nothing that is not built ahead of time."""
    device = torch.device(device)
    return {name: _status(name, device, dtype, activation) for name in BACKENDS if name != "auto"}
