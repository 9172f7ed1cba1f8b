"""The ``ext`` backend and the differentiable wrappers of the compiled extension's dispatch ops.

``backend="ext"`` (CPU) builds the dispatch plan with the extension's stable counting sort
(``route_plan``, one pass instead of an argsort) and runs the routed experts through the segment loop in C++
(``segment_mlp_fused``: per expert, gather rows → GEMM → SwiGLU·w → GEMM → add into y; ATen's GEMMs). On CPU
that fused loop is the best available GEMM path: separate permute / grouped GEMM / combine passes over the
(N, H) rows measured 1.87× a dense FFN against ≈1.3× for the segment loop (docs/benchmarks.md). On CUDA (with the
CUDA build of the extension) it runs the extension's permute and combine around PyTorch's grouped GEMM.

:func:`permute` and :func:`combine` are the extension's data-movement ops with mirror-image backwards
(permute ↔ unweighted combine; weighted combine's backward is a weighted gather plus per-pair dot products);
they are what an expert-parallel or custom expert layer builds on.

Legend: T tokens, K slots per token, E experts, N sorted pairs, H hidden size.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .. import ext
from ..dispatch import DispatchPlan, build_plan
from .grouped import TorchBackend, _cuda_grouped_mm_ok, grouped_mm_mlp

_registered = False
_register_lock = threading.Lock()


def ensure_loaded() -> None:
    """Load the extension (building it if needed) and register autograd and fake implementations of its ops.

    Raises :class:`deepseek_moe.ext.ExtensionUnavailable` when it cannot be loaded."""
    global _registered
    if torch.compiler.is_compiling():  # a traced forward runs after the backend's selection, which loaded it
        return
    ext.load()
    with _register_lock:
        if _registered:
            return
        _register()
        _registered = True


def _register() -> None:
    lib = "deepseek_moe::"

    @torch.library.register_fake(lib + "route_plan")
    def _(topk_idx, num_experts):
        T, K = topk_idx.shape
        new = topk_idx.new_empty
        return new(num_experts), new(num_experts + 1), new(T * K), new(T * K), new(T, K)

    @torch.library.register_fake(lib + "permute")
    def _(x, token, slot):
        return x.new_empty(token.shape[0], x.shape[1])

    @torch.library.register_fake(lib + "combine")
    def _(o, slot, weight):
        return o.new_empty(slot.shape[0], o.shape[1])

    @torch.library.register_fake(lib + "combine_backward")
    def _(grad_y, o, slot, weight):
        acc = torch.promote_types(o.dtype, torch.float32)
        return o.new_empty(o.shape), (o.new_empty(slot.shape, dtype=acc) if weight is not None
                                      else o.new_empty(0, dtype=acc))

    @torch.library.register_fake(lib + "segment_mlp_fused")
    def _(x, gate_up, down, token, weight, counts, h_out):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "segment_mlp_fused_backward")
    def _(grad_y, x, gate_up, down, token, weight, counts, h, grad_gate_up_out, grad_down_out):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    torch.library.register_autograd(lib + "permute", _permute_backward, setup_context=_permute_setup)
    torch.library.register_autograd(lib + "combine", _combine_backward, setup_context=_combine_setup)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _permute_backward(ctx, grad_NH):
    """grad_x[t] = Σ_k grad_NH[slot[t, k]]: the unweighted combine (the mirror image of the gather)."""
    (slot_TK,) = ctx.saved_tensors
    return torch.ops.deepseek_moe.combine(grad_NH.contiguous(), slot_TK, None), None, None


def _combine_setup(ctx, inputs, output):
    o, slot, weight = inputs
    ctx.save_for_backward(o, slot, weight)


def _combine_backward(ctx, grad_y):
    o, slot, weight = ctx.saved_tensors
    grad_o, grad_w = torch.ops.deepseek_moe.combine_backward(grad_y.contiguous(), o, slot, weight)
    return grad_o, None, (grad_w.to(weight.dtype) if weight is not None else None)


def permute(x_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, H) -> (N, H): each kept pair's token row in expert-sorted order (differentiable; the extension's
    equivalent of :func:`deepseek_moe.dispatch.gather_rows`, bit-identical)."""
    ensure_loaded()
    return torch.ops.deepseek_moe.permute(x_TH, plan.token_N, plan.slot_TK)


def combine(o_NH: torch.Tensor, plan: DispatchPlan, weighted: bool = False) -> torch.Tensor:
    """(N, H) -> (T, H): y[t] = Σ_k w[t, k] · o[slot[t, k]] in fp32, o's dtype out; w = 1 unless ``weighted``
    (then the plan's gate weights, differentiable). Unweighted it is bit-identical to
    :func:`deepseek_moe.dispatch.combine_rows`."""
    ensure_loaded()
    return torch.ops.deepseek_moe.combine(o_NH, plan.slot_TK, plan.weight_TK if weighted else None)


def route_plan(topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """The dropless :class:`DispatchPlan` from the extension's stable counting sort (identical to
    :func:`deepseek_moe.dispatch.build_plan` without capacity)."""
    ensure_loaded()
    T, K = topk_idx_TK.shape
    counts_E, offsets_E1, pair_N, token_N, slot_TK = torch.ops.deepseek_moe.route_plan(topk_idx_TK, num_experts)
    device = topk_idx_TK.device
    return DispatchPlan(topk_idx_TK=topk_idx_TK, weight_TK=weight_TK,
                        keep_TK=torch.ones(T, K, dtype=torch.bool, device=device), pair_N=pair_N, token_N=token_N,
                        slot_TK=slot_TK, counts_E=counts_E, offsets_E1=offsets_E1, routed_counts_E=counts_E,
                        num_dropped=torch.zeros((), dtype=torch.int64, device=device))


def has_cuda_kernels() -> bool:
    """Whether the loaded extension carries its CUDA kernels (an ahead-of-time build with a CUDA torch)."""
    return ext.is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key("deepseek_moe::permute", "CUDA")


class ExtBackend(TorchBackend):
    """The compiled extension. ``strategy``:

    * ``"segments"`` (``auto`` on CPU): the counting-sort plan and the C++ segment loop (module docstring);
    * ``"grouped_mm"`` (``auto`` on CUDA): the counting-sort plan, the extension's permute, PyTorch's grouped GEMM
      and the extension's combine. On CUDA this needs the CUDA build of the extension and torch's grouped GEMM
      (bf16, compute capability >= 9.0); on CPU it runs with the CPU ops (slower than the segment loop there).

    With capacity, the plan comes from :func:`deepseek_moe.dispatch.build_plan` (the extension sorts dropless
    plans only)."""

    name = "ext"
    compiled = True
    activations = ("silu",)  # the C++ segment loop implements SwiGLU only

    def auto_strategy(self, device: torch.device, dtype: torch.dtype) -> str:
        # DEEPSEEK_MOE_TORCH_STRATEGY belongs to the torch backend; the C++ segment loop exists on CPU only.
        return "segments" if device.type == "cpu" else "grouped_mm"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"the ext backend supports floating dtypes, not {dtype}"
        if device.type not in ("cpu", "cuda"):
            return f"the ext backend runs on CPU and CUDA, not {device.type!r}"
        if not ext.is_loaded():
            if ext.build_error():
                return ext.build_error()
            return ("the compiled extension is not loaded: select backend='ext' by name or call "
                    "deepseek_moe.ext.load() (builds it just in time, ~30 s once), or build it ahead of time with "
                    "DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . --no-build-isolation")
        if device.type == "cuda":
            if not has_cuda_kernels():
                return ("the loaded extension has no CUDA kernels (a just-in-time build is CPU-only): build it ahead "
                        "of time with a CUDA torch, TORCH_CUDA_ARCH_LIST=... DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . "
                        "--no-build-isolation")
            if self.resolve_strategy(device, dtype) == "segments":
                return "the ext backend's segment loop runs on CPU only; use strategy 'grouped_mm' on CUDA"
            if not _cuda_grouped_mm_ok(device, dtype):
                return ("the ext backend on CUDA uses PyTorch's grouped GEMM, which runs bf16 on compute capability "
                        f">= 9.0; got {dtype} on {torch.cuda.get_device_name(device)}")
        return None

    def ready(self) -> bool:
        """Whether the extension is usable without compiling anything: loaded, or built ahead of time (then it is
        loaded now, ~0.1 s)."""
        if not ext.is_loaded() and not ext.has_prebuilt():
            return False
        self.prepare()
        return ext.is_loaded()

    def prepare(self) -> None:
        """Load (or build) the extension; a failure is reported by :meth:`unavailable_reason`."""
        try:
            ensure_loaded()
        except ext.ExtensionUnavailable:
            pass

    def routed_mlp(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, activation="silu"):
        self.check_activation(activation)
        ensure_loaded()
        if self.resolve_strategy(x_TH.device, x_TH.dtype) == "grouped_mm":
            return grouped_mm_mlp(x_TH, plan, gate_up_EJH, down_EHI, gather=permute, combine=combine)
        return super().routed_mlp(x_TH, plan, gate_up_EJH, down_EHI)

    def build_plan(self, topk_idx_TK, weight_TK, num_experts, capacity=None, affinity_TK=None) -> DispatchPlan:
        on_device = topk_idx_TK.device.type == "cpu" or (topk_idx_TK.device.type == "cuda" and has_cuda_kernels())
        if capacity is not None or not on_device:
            return build_plan(topk_idx_TK, weight_TK, num_experts, capacity, affinity_TK)
        return route_plan(topk_idx_TK, weight_TK, num_experts)
