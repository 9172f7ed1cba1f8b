"""Batch-invariant arithmetic: what the layer computes with when ``torch.use_deterministic_algorithms(True)`` is on.

In that mode a token's output must be bitwise the same alone, in any batch and at any position of it. Two things
in eager PyTorch on CPU break this (measured on the 2-core CI machine, torch 2.13, AVX-512):

* GEMMs. BLAS chooses its blocking and threading by the row count, so a row's dot products are summed in another
  order in a batch of 64 than alone. A GEMM of one fixed shape treats every row alike (measured: MKL fp32 and
  oneDNN bf16, every row position, misaligned inputs), but a batched GEMM over such tiles does not (``bmm``
  changed rows with the batch count). :func:`linear` therefore runs rows through GEMMs of exactly
  :data:`ROW_TILE` rows, one call per tile.
* Element-wise kernels. ATen computes ``silu``, ``sigmoid`` and ``gelu`` with vector code in the body of each
  thread's chunk and with scalar libm code in its tail, and these differ in the last bit for ~4% of fp32 inputs;
  where a chunk ends depends on the tensor's size. ``exp``, ``erf`` and ``tanh`` run one vectorised routine to
  the end, and + − × ÷ are exactly rounded in both paths, so :func:`activate` and :func:`sigmoid` are written
  with those (within an ulp of ATen's kernels, not bitwise equal to them).

Row-wise ops (softmax over E, top-k, gathers) and the fixed-order combines of :mod:`deepseek_moe.rows` are
already invariant. Legend: T rows, H input features, N output features, K experts per token.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator

import torch

# Rows per GEMM. Larger tiles waste less on padding and per-call overhead at many rows (a 4096 x 1024 x 704 fp32
# GEMM took 1.4x the plain GEMM's time in tiles of 64 rows, 2.9x in tiles of 32), smaller ones at decode.
ROW_TILE = 64


def enabled() -> bool:
    """Whether the layer computes batch-invariantly: ``torch.are_deterministic_algorithms_enabled()``."""
    return torch.are_deterministic_algorithms_enabled()


def _tiles(a_TH: torch.Tensor, b_HN: torch.Tensor) -> torch.Tensor:
    T = a_TH.shape[0]
    pad = -T % ROW_TILE
    if pad or T == 0:
        a_TH = torch.cat([a_TH, a_TH.new_zeros(pad if T else ROW_TILE, a_TH.shape[1])])
    out = a_TH.new_empty(a_TH.shape[0], b_HN.shape[1])
    for i in range(0, a_TH.shape[0], ROW_TILE):
        torch.mm(a_TH[i:i + ROW_TILE], b_HN, out=out[i:i + ROW_TILE])
    return out[:T]


class _TiledMM(torch.autograd.Function):
    """Forward in row tiles; backward in whole GEMMs. The backward need only be deterministic (the same bits run
    after run, which plain GEMMs are for given shapes): in tiles its weight gradient took 64-deep reductions and one
    accumulation per tile, and a training step 1.7x the plain layer's time instead of ~1.3x."""

    @staticmethod
    def forward(ctx, a_TH, b_HN):
        ctx.save_for_backward(a_TH, b_HN)
        return _tiles(a_TH, b_HN)

    @staticmethod
    def backward(ctx, grad_TN):
        a_TH, b_HN = ctx.saved_tensors
        grad_a = grad_TN @ b_HN.t() if ctx.needs_input_grad[0] else None
        grad_b = a_TH.t() @ grad_TN if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(enabled)`` inside the block; the previous setting (and its
    ``warn_only``) is restored after it."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def refuse(message: str) -> None:
    """What the mode does where the layer cannot keep its promise: RuntimeError, or a warning when the mode was
    switched on with ``warn_only=True`` (as PyTorch's own nondeterministic ops)."""
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def tiled_mm(a_TH: torch.Tensor, b_HN: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a (T, H), b (H, N) of one dtype, computed in GEMMs of exactly :data:`ROW_TILE` rows (a
    zero-padded last tile), so each row's result depends on that row alone. Differentiable (the backward in whole
    GEMMs: deterministic, not batch-invariant)."""
    if torch.is_grad_enabled() and (a_TH.requires_grad or b_HN.requires_grad):
        return _TiledMM.apply(a_TH, b_HN)
    return _tiles(a_TH, b_HN)


def linear(x: torch.Tensor, weight_NH: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias, batch-invariant: x (..., H) -> (..., N) (see :func:`tiled_mm`); under
    torch.autocast in its dtype, as F.linear."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight_NH = x.to(dtype), weight_NH.to(dtype)
    with torch.autocast(device, enabled=False):
        y = tiled_mm(x.reshape(-1, x.shape[-1]), weight_NH.t())
    return y.view(*x.shape[:-1], weight_NH.shape[0])


def _sigmoid_bits(x: torch.Tensor) -> torch.Tensor:
    return torch.reciprocal(torch.exp(-x) + 1)


def _softplus_bits(x: torch.Tensor) -> torch.Tensor:
    # ATen's softplus (threshold 20: x itself above); the clamp keeps exp finite where the threshold applies.
    return torch.where(x > 20, x, torch.log1p(torch.exp(x.clamp(max=20))))


class _Sigmoid(torch.autograd.Function):
    """Forward in position-invariant arithmetic, backward as torch.sigmoid's (from the saved output alone)."""

    @staticmethod
    def forward(ctx, x):
        s = _sigmoid_bits(x)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved_tensors
        return torch.ops.aten.sigmoid_backward(grad, s)


class _Softplus(torch.autograd.Function):
    """Forward in position-invariant arithmetic, backward as F.softplus's (from the saved input)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _softplus_bits(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.softplus_backward(grad, x, 1, 20)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(−x)), the same bits at every position (within an ulp of ``torch.sigmoid``; the router's
    sigmoid scores, DeepSeek-V3 §2.1.2, in every mode, csrc/cpu/route_topk.cpp's too). Its gradient is
    ``torch.sigmoid``'s formula on the saved output."""
    return _Sigmoid.apply(x)


class _Sqrt(torch.autograd.Function):
    """√u with the gradient g / (2√u) (torch's, bit for bit) where u > 0 and 0 where u = 0, where torch's is ∞ and
    becomes NaN once multiplied by u's own zero gradient."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        root = u.sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        return torch.where(root > 0, grad / (2 * root), torch.zeros_like(grad))


def sqrt_of_softplus(softplus_x: torch.Tensor) -> torch.Tensor:
    """√ of a softplus output (DeepSeek-V4's affinity √softplus(x)), with a finite gradient everywhere: softplus
    underflows to exactly 0 below x ≈ −104 in fp32 (−745 in fp64), where the true derivative e^(x/2)/2 is below
    the dtype's smallest number, so 0 is its value there; torch's sqrt would give NaN for the whole router
    gradient. The same forward bits as ``softplus_x.sqrt()``."""
    return _Sqrt.apply(softplus_x)


def sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    """√softplus(x) (DeepSeek-V4's affinity), softplus as ATen's (threshold 20: x itself above), the same bits at
    every position (the router's scores in every mode, csrc/cpu/route_topk.cpp's too). The gradient: softplus's
    as ``F.softplus``'s, √'s finite where softplus underflows to 0 (:func:`sqrt_of_softplus`)."""
    return sqrt_of_softplus(_Softplus.apply(x))


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_TANH_GELU = math.sqrt(2.0 / math.pi)


def activate(g: torch.Tensor, activation: str) -> torch.Tensor:
    """The GLU gate activation (a ``deepseek_moe.config.ACTIVATIONS`` name) from position-independent kernels:
    silu g·σ(g) as g / (1 + exp(−g)); gelu 0.5·g·(1 + erf(g/√2)); gelu_pytorch_tanh
    0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))); relu. Differentiable."""
    if activation == "silu":
        return g / (torch.exp(-g) + 1)
    if activation == "gelu":
        return 0.5 * g * (torch.erf(g * _SQRT_HALF) + 1)
    if activation == "gelu_pytorch_tanh":
        return 0.5 * g * (torch.tanh(_TANH_GELU * (g + 0.044715 * g * g * g)) + 1)
    if activation == "relu":
        return torch.relu(g)
    raise ValueError(f"activation={activation!r} has no batch-invariant form here")


def row_sum(w_TK: torch.Tensor) -> torch.Tensor:
    """Σ_k w[:, k] added left to right, (T, K) -> (T, 1): the same order for every row and batch size."""
    total = w_TK[:, :1]
    for k in range(1, w_TK.shape[1]):
        total = total + w_TK[:, k:k + 1]
    return total
