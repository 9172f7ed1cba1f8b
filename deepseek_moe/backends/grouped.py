"""The ``torch`` backend: grouped GEMMs in plain PyTorch, two strategies behind one interface.

* ``segments`` (default on CPU): one custom op that walks the expert segments of the sorted pairs and, for each
  expert, gathers its rows, runs gate_up GEMM → GLU·w → down GEMM and scatter-adds into y while the segment
  is still in cache. No (N, H) gathered copy, no (N, H) output, no full-size per-expert gradient buffers; the
  backward mirrors it. Registered with ``torch.library`` so ``torch.compile`` treats it as one op.
* ``grouped_mm`` (default on CUDA bf16, compute capability >= 9.0, where ``torch.nn.functional.grouped_mm``
  exists): gather rows →
  ``grouped_mm`` → GLU·w → ``grouped_mm`` → sum-combine, autograd through PyTorch's kernels.

Legend: T tokens, H hidden size, I expert hidden size, J = 2·I, E routed experts, N kept pairs.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..dispatch import DispatchPlan, combine_rows, gather_rows, sorted_weights
from .base import Backend, acc_dtype, glu_weighted, glu_weighted_backward

STRATEGIES = ("auto", "segments", "grouped_mm")
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ------------------------------------------------------------------------------------- gradient buffers
class _StepBuffers:
    """Recycles large per-step CPU buffers between steps: the (E, 2I, H) and (E, H, I) expert weight gradients
    and the saved (N, 2I) gate/up pre-activations.

    An MoE's expert weight gradient is (E / (K + Ks)) times a dense FFN's (277 MB at E=64, I=352, H=1024, fp32);
    allocated fresh every backward, its pages are faulted in and zeroed by the kernel each time (~50-80 ms on a
    2-core CPU); glibc returns every allocation over 32 MB to the OS when it is freed. A buffer is handed out
    again only when its storage has no other user: after the optimizer step and ``zero_grad(set_to_none=True)``
    a gradient buffer is free, after the backward the saved activations are; while ``param.grad`` (gradient
    accumulation), a retained graph or any other tensor still references it, a fresh buffer is allocated, so
    results never change. Off with ``DEEPSEEK_MOE_REUSE_GRAD_BUFFERS=0``; CUDA's caching allocator already
    recycles memory. Returned buffers must reach autograd as fresh views (``buf.view(buf.shape)``) so that
    AccumulateGrad takes them without a copy.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # (id(owner), tag) -> (weak reference to the owner, buffer, storage users of the buffer when idle).
        # Tensors cannot key a WeakKeyDictionary (their == is element-wise); the weak reference's callback
        # drops the entry when the owner goes away.
        self._buffers: Dict[Tuple[int, str], Tuple["weakref.ref[torch.Tensor]", torch.Tensor, int]] = {}

    @staticmethod
    def _users(t: torch.Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def enabled(self, weight: torch.Tensor) -> bool:
        """Whether buffers for ``weight`` are recycled here."""
        # Inference-mode tensors cannot be written outside inference mode: no recycling there (no backward
        # follows anyway).
        return (weight.device.type == "cpu" and hasattr(torch._C, "_storage_Use_Count")
                and not torch.is_inference_mode_enabled()
                and os.environ.get("DEEPSEEK_MOE_REUSE_GRAD_BUFFERS", "1") != "0")

    def get(self, owner: torch.Tensor, tag: str = "grad", shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (default ``owner``'s) and ``owner``'s dtype and device, recycled
        from the previous call with the same (owner, tag) when nothing else uses that one any more."""
        shape = tuple(owner.shape) if shape is None else tuple(shape)
        if not self.enabled(owner):
            return owner.new_empty(shape)
        key = (id(owner), tag)
        with self._lock:
            entry = self._buffers.get(key)
            if entry is not None:
                ref, buffer, idle_users = entry
                if (ref() is owner and tuple(buffer.shape) == shape and buffer.dtype == owner.dtype
                        and self._users(buffer) == idle_users):
                    return buffer
            buffer = owner.new_empty(shape)
            self._buffers[key] = (weakref.ref(owner, lambda _, key=key: self._buffers.pop(key, None)), buffer,
                                  self._users(buffer))
            return buffer


_step_buffers = _StepBuffers()


# ------------------------------------------------------------------------------------------ segments op
@torch.library.custom_op("deepseek_moe::segment_mlp", mutates_args=())
def segment_mlp(x_TH: torch.Tensor, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor, token_N: torch.Tensor,
                weight_N: torch.Tensor, counts_E: torch.Tensor, compiled: bool = False, activation: str = "silu"
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """y_TH = Σ over sorted pairs n of weight_N[n] · GLU_{e(n)}(x_TH[token_N[n]]), and the saved h_NJ.

    token_N must be sorted by expert with ``counts_E`` pairs per expert. ``compiled``: run the segment loop in
    the C++ extension (``torch.ops.deepseek_moe.segment_mlp_fused``; load it first with
    ``deepseek_moe.ext.load()``; SiLU only) instead of Python. Returns (y_TH in x's dtype, h_NJ = gate_up pre-activations,
    kept for the backward).
    """
    if compiled and activation != "silu":
        raise ValueError(f"segment_mlp: the compiled segment loop implements SwiGLU only, not activation={activation!r}")
    T, H = x_TH.shape
    I = down_EHI.shape[-1]
    h_NJ = _step_buffers.get(gate_up_EJH, "h", (token_N.shape[0], 2 * I)) if x_TH.dtype == gate_up_EJH.dtype \
        else x_TH.new_empty(token_N.shape[0], 2 * I)
    if compiled:
        y_TH = torch.ops.deepseek_moe.segment_mlp_fused(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E,
                                                        h_NJ)
        return y_TH, h_NJ.view(h_NJ.shape)
    counts: List[int] = counts_E.tolist()
    acc = acc_dtype(x_TH.dtype)
    y_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    h_seg, tok_seg, w_seg = h_NJ.split(counts), token_N.split(counts), weight_N.split(counts)
    gate_up_t, down_t = gate_up_EJH.transpose(1, 2), down_EHI.transpose(1, 2)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        torch.mm(x_TH.index_select(0, tok_seg[e]), gate_up_t[e], out=h_seg[e])
        out_nH = torch.mm(glu_weighted(h_seg[e], w_seg[e], x_TH.dtype, activation), down_t[e])
        y_TH.index_add_(0, tok_seg[e], out_nH if out_nH.dtype == acc else out_nH.to(acc))
    return y_TH.to(x_TH.dtype), h_NJ.view(h_NJ.shape)


@segment_mlp.register_fake
def _(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, compiled=False, activation="silu"):
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(token_N.shape[0], 2 * down_EHI.shape[-1])


@torch.library.custom_op("deepseek_moe::segment_mlp_backward", mutates_args=())
def segment_mlp_backward(grad_y_TH: torch.Tensor, x_TH: torch.Tensor, gate_up_EJH: torch.Tensor,
                         down_EHI: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor,
                         counts_E: torch.Tensor, h_NJ: torch.Tensor, compiled: bool = False,
                         activation: str = "silu") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`segment_mlp`: (grad_x_TH, grad_gate_up_EJH, grad_down_EHI, grad_weight_N)."""
    dtype = x_TH.dtype
    grad_y_TH = grad_y_TH.contiguous()
    grad_gate_up = _step_buffers.get(gate_up_EJH)
    grad_down = _step_buffers.get(down_EHI)
    if compiled:
        grad_x_TH, grad_w_N = torch.ops.deepseek_moe.segment_mlp_fused_backward(
            grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, h_NJ, grad_gate_up, grad_down)
        return grad_x_TH, grad_gate_up.view(grad_gate_up.shape), grad_down.view(grad_down.shape), grad_w_N
    counts: List[int] = counts_E.tolist()
    acc = acc_dtype(dtype)
    grad_x_TH = torch.zeros(x_TH.shape, dtype=acc, device=x_TH.device)
    grad_w_N = torch.empty_like(weight_N)
    h_seg, tok_seg = h_NJ.split(counts), token_N.split(counts)
    w_seg, gw_seg = weight_N.split(counts), grad_w_N.split(counts)
    for e, n in enumerate(counts):
        if n == 0:
            grad_gate_up[e].zero_()
            grad_down[e].zero_()
            continue
        grad_out_nH = grad_y_TH.index_select(0, tok_seg[e])
        grad_a_nI = torch.mm(grad_out_nH, down_EHI[e])
        grad_h_nJ, gw_n, a_nI = glu_weighted_backward(h_seg[e], w_seg[e], grad_a_nI, activation)
        gw_seg[e].copy_(gw_n)
        if dtype != acc:
            a_nI, grad_h_nJ = a_nI.to(dtype), grad_h_nJ.to(dtype)
        torch.mm(grad_out_nH.t(), a_nI, out=grad_down[e])
        torch.mm(grad_h_nJ.t(), x_TH.index_select(0, tok_seg[e]), out=grad_gate_up[e])
        grad_x_nH = torch.mm(grad_h_nJ, gate_up_EJH[e])
        grad_x_TH.index_add_(0, tok_seg[e], grad_x_nH if dtype == acc else grad_x_nH.to(acc))
    return grad_x_TH.to(dtype), grad_gate_up.view(grad_gate_up.shape), grad_down.view(grad_down.shape), grad_w_N


@segment_mlp_backward.register_fake
def _(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, h_NJ, compiled=False,
      activation="silu"):
    return (x_TH.new_empty(x_TH.shape), gate_up_EJH.new_empty(gate_up_EJH.shape),
            down_EHI.new_empty(down_EHI.shape), weight_N.new_empty(weight_N.shape))


def _segment_setup(ctx, inputs, output):
    x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, compiled, activation = inputs
    ctx.save_for_backward(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, output[1])
    ctx.compiled, ctx.activation = compiled, activation
    # h_NJ is returned only to be saved: nothing uses its gradient, and materialising that (N, 2I) zero tensor
    # cost ~5% of the layer's forward+backward.
    ctx.set_materialize_grads(False)


def _segment_backward(ctx, grad_y_TH, grad_h_NJ):
    if grad_y_TH is None:  # y unused (grads are not materialised): nothing flows back
        return None, None, None, None, None, None, None, None
    x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, h_NJ = ctx.saved_tensors
    gx, ggu, gdn, gw = segment_mlp_backward(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, weight_N,
                                            counts_E, h_NJ, ctx.compiled, ctx.activation)
    return gx, ggu, gdn, None, gw, None, None, None


segment_mlp.register_autograd(_segment_backward, setup_context=_segment_setup)


# ------------------------------------------------------------------------------------------ backend
def _cuda_grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's CUDA grouped GEMM runs bf16 on Hopper-class GPUs (compute capability >= 9.0) only."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and _grouped_mm is not None
            and torch.cuda.get_device_capability(device) >= (9, 0))


def align_segments(token_N: torch.Tensor, weight_N: torch.Tensor, counts_E: torch.Tensor, multiple: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad every expert segment to a multiple of ``multiple`` rows (M rows in all).

    Padding rows point at token 0 with weight 0, so their activation, output and every gradient they feed are
    exactly zero: the padded problem has the same result. Returns (token_M, weight_M (differentiable w.r.t.
    weight_N), counts_E padded).
    """
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    starts_E = torch.cumsum(padded_E, 0) - padded_E
    expert_N = torch.repeat_interleave(torch.arange(counts_E.numel(), device=counts_E.device), counts_E)
    rank_N = torch.arange(token_N.numel(), device=token_N.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_N]
    pos_N = starts_E[expert_N] + rank_N
    M = int(padded_E.sum())
    token_M = token_N.new_zeros(M).index_copy_(0, pos_N, token_N)
    weight_M = weight_N.new_zeros(M).index_copy(0, pos_N, weight_N)
    return token_M, weight_M, padded_E


class TorchBackend(Backend):
    """Grouped GEMM in PyTorch. ``strategy``: "auto" (segments on CPU, grouped_mm on CUDA bf16 where
    available), "segments" or "grouped_mm". The env var ``DEEPSEEK_MOE_TORCH_STRATEGY`` overrides "auto".

    ``pad_multiple`` (segments only): pad expert segments to this many rows; "auto" pads 16-bit dtypes on CPU
    to 32, because oneDNN builds a new GEMM primitive for every new row count and ragged counts change every
    step (measured 3-4x slower GEMMs than with padded, cached shapes). fp32 uses MKL and needs no padding.
    """

    name = "torch"
    compiled = False  # the segment loop in Python (True: in the C++ extension, see ExtBackend)

    def __init__(self, strategy: str = "auto", pad_multiple="auto"):
        if strategy not in STRATEGIES:
            raise ValueError(f"TorchBackend: strategy={strategy!r} is invalid; expected one of {STRATEGIES}")
        if pad_multiple != "auto" and (not isinstance(pad_multiple, int) or pad_multiple < 1):
            raise ValueError(f"TorchBackend: pad_multiple={pad_multiple!r} is invalid; expected 'auto' or an int >= 1")
        self.strategy = strategy
        self.pad_multiple = pad_multiple

    def resolve_pad_multiple(self, device: torch.device, dtype: torch.dtype) -> int:
        if self.pad_multiple != "auto":
            return self.pad_multiple
        return 32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1

    def resolve_strategy(self, device: torch.device, dtype: torch.dtype) -> str:
        strategy = self.strategy if self.strategy != "auto" else self.auto_strategy(device, dtype)
        if strategy == "grouped_mm" and _grouped_mm is None:
            raise RuntimeError(f"torch {torch.__version__} has no grouped_mm; use strategy='segments' or torch>=2.9")
        return strategy

    def auto_strategy(self, device: torch.device, dtype: torch.dtype) -> str:
        """What "auto" means: ``DEEPSEEK_MOE_TORCH_STRATEGY`` if set, else by device and dtype."""
        strategy = os.environ.get("DEEPSEEK_MOE_TORCH_STRATEGY", "auto")
        if strategy not in STRATEGIES:
            raise ValueError(f"DEEPSEEK_MOE_TORCH_STRATEGY={strategy!r} is invalid; expected one of {STRATEGIES}")
        if strategy == "auto":
            # Measured on a 2-core CPU: the cache-resident segment loop beats grouped_mm + separate gather and
            # combine passes by ~1.4x forward+backward (docs/benchmarks.md); on GPUs one grouped kernel wins.
            strategy = "grouped_mm" if _cuda_grouped_mm_ok(device, dtype) else "segments"
        return strategy

    def routed_mlp(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        if self.resolve_strategy(x_TH.device, x_TH.dtype) == "grouped_mm":
            return grouped_mm_mlp(x_TH, plan, gate_up_EJH, down_EHI, activation=activation)
        token, weight, counts = plan.token_N, sorted_weights(plan).to(acc_dtype(x_TH.dtype)), plan.counts_E
        multiple = self.resolve_pad_multiple(x_TH.device, x_TH.dtype)
        if multiple > 1:
            token, weight, counts = align_segments(token, weight, counts, multiple)
        y_TH, _ = segment_mlp(x_TH, gate_up_EJH.contiguous(), down_EHI.contiguous(), token, weight, counts,
                              self.compiled, activation)
        return y_TH


def grouped_mm_mlp(x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, gather=gather_rows, combine=combine_rows,
                   activation="silu"):
    """The routed experts as permute → grouped GEMM → GLU·w → grouped GEMM → unweighted combine.

    ``gather(x_TH, plan) -> x_NH`` and ``combine(o_NH, plan) -> y_TH`` are the data-movement ops (the torch ops by
    default; the ``ext`` backend passes the compiled extension's, which give bit-identical rows)."""
    offs_E = plan.offsets_E1[1:].to(torch.int32)
    x_NH = gather(x_TH, plan)
    h_NJ = _grouped_mm(x_NH, gate_up_EJH.transpose(1, 2), offs=offs_E)
    a_NI = glu_weighted(h_NJ, sorted_weights(plan), x_TH.dtype, activation)
    out_NH = _grouped_mm(a_NI, down_EHI.transpose(1, 2), offs=offs_E)
    return combine(out_NH, plan)
