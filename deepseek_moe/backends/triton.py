"""The ``triton`` backend: the routed experts through the Triton kernels of :mod:`deepseek_moe.kernels`.

Two ``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces
the layer with one opaque node per direction; nothing in them synchronises with the host (no ``.item()`` or
``.tolist()``): tile maps and grids come from static shapes and device tensors.

This module imports no Triton at import time; the kernels load on first use. On CPU the kernels run only in
Triton's interpreter (``TRITON_INTERPRET=1``, slow: for tests).

Legend: T tokens, K slots per token, P = T·K, N kept pairs (sorted by expert), H hidden size, I expert hidden
size, J = 2·I, E experts.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch

from ..dispatch import DispatchPlan, sorted_weights
from .base import Backend, acc_dtype


def _kernels():
    from ..kernels import grouped_mlp  # deferred: importing triton is slow and optional

    return grouped_mlp


def _sum_k(rows_PH: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(T·K, H) rows in (token, slot) order -> (T, H): the K-way sum in fp32, cast to ``dtype``."""
    return rows_PH.view(-1, top_k, rows_PH.shape[-1]).sum(1, dtype=acc_dtype(dtype)).to(dtype)


@torch.library.custom_op("deepseek_moe::triton_expert_mlp", mutates_args=())
def triton_expert_mlp(x_TH: torch.Tensor, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
                      token_N: torch.Tensor, pair_N: torch.Tensor, weight_N: torch.Tensor,
                      offsets_E1: torch.Tensor, top_k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """y_TH = Σ_k w · SwiGLU_e(x) over the kept pairs, and h_NJ (the gate/up pre-activations, for the backward).

    token_N/pair_N: int64 (N,) token and pair id of each expert-sorted pair; weight_N: fp32 (N,);
    offsets_E1: int64 (E+1,) segment starts. Pairs that are not kept (capacity) contribute zero.
    """
    k = _kernels()
    T = x_TH.shape[0]
    h_NJ, a_NI = k.gate_up_swiglu(x_TH, token_N, weight_N, gate_up_EJH, offsets_E1)
    o_PH = k.grouped_gemm_scatter(a_NI, down_EHI.transpose(1, 2), pair_N, T * top_k, offsets_E1,
                                  zero_fill=pair_N.numel() < T * top_k, kind="down")
    return _sum_k(o_PH, top_k, x_TH.dtype), h_NJ


@triton_expert_mlp.register_fake
def _(x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, top_k):
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(token_N.shape[0], gate_up_EJH.shape[1])


@torch.library.custom_op("deepseek_moe::triton_expert_mlp_backward", mutates_args=())
def triton_expert_mlp_backward(grad_y_TH: torch.Tensor, x_TH: torch.Tensor, gate_up_EJH: torch.Tensor,
                               down_EHI: torch.Tensor, token_N: torch.Tensor, pair_N: torch.Tensor,
                               weight_N: torch.Tensor, offsets_E1: torch.Tensor, h_NJ: torch.Tensor, top_k: int
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_expert_mlp`: (grad_x_TH, grad_gate_up_EJH, grad_down_EHI, grad_weight_N)."""
    k = _kernels()
    T = x_TH.shape[0]
    grad_y_TH = grad_y_TH.contiguous()
    grad_h_NJ, a_NI, grad_w_N = k.down_swiglu_backward(grad_y_TH, token_N, down_EHI, h_NJ, weight_N, offsets_E1)
    grad_down = k.expert_weight_grad(grad_y_TH, token_N, a_NI, None, offsets_E1, down_EHI.dtype)
    grad_gate_up = k.expert_weight_grad(grad_h_NJ, None, x_TH, token_N, offsets_E1, gate_up_EJH.dtype)
    gx_PH = k.grouped_gemm_scatter(grad_h_NJ, gate_up_EJH, pair_N, T * top_k, offsets_E1,
                                   zero_fill=pair_N.numel() < T * top_k, kind="dgrad")
    return _sum_k(gx_PH, top_k, x_TH.dtype), grad_gate_up, grad_down, grad_w_N.to(weight_N.dtype)


@triton_expert_mlp_backward.register_fake
def _(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, h_NJ, top_k):
    return (x_TH.new_empty(x_TH.shape), gate_up_EJH.new_empty(gate_up_EJH.shape),
            down_EHI.new_empty(down_EHI.shape), weight_N.new_empty(weight_N.shape))


def _setup(ctx, inputs, output):
    x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, top_k = inputs
    ctx.save_for_backward(x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, output[1])
    ctx.top_k = top_k
    ctx.set_materialize_grads(False)  # h_NJ's gradient is never used: don't build an (N, 2I) zero tensor


def _backward(ctx, grad_y_TH, grad_h_NJ):
    if grad_y_TH is None:
        return (None,) * 8
    x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, h_NJ = ctx.saved_tensors
    gx, ggu, gdn, gw = triton_expert_mlp_backward(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, pair_N,
                                                  weight_N, offsets_E1, h_NJ, ctx.top_k)
    return gx, ggu, gdn, None, None, gw, None, None


triton_expert_mlp.register_autograd(_backward, setup_context=_setup)


class TritonBackend(Backend):
    """Fused Triton kernels: gather into the first GEMM, SwiGLU·w in its epilogue, scatter-store of the second
    GEMM's rows and a K-way sum; the backward mirrors it (see docs/kernels.md)."""

    name = "triton"
    activations = ("silu",)  # SiLU is fused into the GEMM epilogues
    gathers = reduces = True  # the gather is fused into the first GEMM's loads, w·SwiGLU and the K-way sum follow

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'deepseek-moe[triton]')"
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the Triton kernels support float32, bfloat16 and float16, not {dtype}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return (f"Triton kernels run on CUDA devices (on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
                f"before importing deepseek_moe; slow, for testing); got device {device.type!r}")

    def run(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        y_TH, _ = triton_expert_mlp(x_TH.contiguous(), gate_up_EJH, down_EHI, plan.token_N, plan.pair_N,
                                    sorted_weights(plan).float(), plan.offsets_E1, plan.top_k)
        return y_TH
