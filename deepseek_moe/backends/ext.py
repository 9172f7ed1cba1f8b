"""The ``ext`` backend: the routed experts through the compiled extension (``csrc/``).

* ``segments`` (CPU): the plan from the extension's stable counting sort (``route_plan``, one pass instead of an
  argsort) and the segment loop in C++ (``segment_mlp_fused``: per expert, gather rows → GEMM → SwiGLU·w →
  GEMM → add into y; ATen's GEMMs).
* ``decode`` (CPU, inference on at most ``backends.decode_tokens(dtype)`` tokens, and every inference call in the
  deterministic mode, chosen at selection): ``expert_gemv`` streams each chosen expert's rows once, the gate/up dot
  products with the SwiGLU·w fused, then the down rows into y, in two parallel regions over all experts
  (csrc/cpu/expert_gemv.cpp); batch-invariant (:meth:`ExtBackend.invariance_reason`); no backward.
* ``blocks`` (CPU, inference on more tokens, fp32 and bf16, chosen at selection): ``expert_blocks`` runs every
  expert's pairs (in pieces of up to 256; 32 for fp32 GEMMs without AVX-512) through GEMM micro-kernels (in bf16
  its own AMX loop that fetches the next weight rows while it computes, where H and the widths are multiples of 32;
  brgemm otherwise; on a CPU without a bf16 micro-kernel, fp32 brgemm on weight chunks widened just before), the
  weights as the A operand in their public layout, the SwiGLU·w in GEMM 1's
  epilogue, in two parallel regions over all experts (csrc/cpu/expert_blocks.cpp); no backward.
* ``decode`` also offers the router's gate GEMM (``router_logits``, :meth:`ExtBackend.router_gemm`: each logit
  one fixed-order dot product, no parallel region for a decode step's size).
* ``decode`` and ``blocks`` also offer the router's choice after its gate GEMM as one op (``route_topk``,
  :meth:`ExtBackend.selector`), and the layer's whole routed step as one op (``fused_moe``: gate GEMM, route_topk,
  the plan, their experts op with the shared experts, :meth:`ExtBackend.fused_step`), which the layer calls where
  its pipeline would compute the same, stage by stage (:meth:`Backend.fused_step`).
* ``grouped_mm`` (CUDA, with the CUDA build of the extension and PyTorch's grouped GEMM): the extension's radix-sort
  plan, the reference's gather, PyTorch's grouped GEMMs, and the extension's CUDA weighted ``combine`` (one pass
  per token row, fp32, the same order as the reference's combine).

What each op gains over the torch path is measured in docs/benchmarks.md.

Legend: T tokens, K slots per token, E experts, N sorted pairs, H hidden size, I expert hidden size, J = 2·I.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from .. import ext
from ..glu import acc_dtype
from ..plan import DispatchPlan, sorted_weights
from ..stages import stage
from .base import Backend
from .grouped import _grouped_mm, cuda_grouped_mm_ok, grouped_mm_experts

_registered = False
_register_lock = threading.Lock()
_OPS = "deepseek_moe::"
# The inference-only strategies and their ops (same arguments; the shared experts' weights join their pass).
_INFERENCE_OPS = {"decode": "expert_gemv", "blocks": "expert_blocks"}
# route_topk's codes (csrc/cpu/route_topk.cpp).
_SCORE_FUNCS = {"softmax": 0, "sigmoid": 1, "sqrtsoftplus": 2}
_GROUP_SCORES = {"max": 0, "top2_sum": 1}
STRATEGIES = ("segments", "decode", "blocks", "grouped_mm")


def ensure_loaded() -> None:
    """Load the extension (building it if needed) and register autograd and fake implementations of its ops.

    Raises :class:`deepseek_moe.ext.ExtensionUnavailable` when it cannot be loaded. Selection calls it, also under
    torch.compile (at trace time, outside the graph); the ops' callers below skip it while a graph is traced."""
    global _registered
    ext.load()
    with _register_lock:
        if not _registered:
            _register()
            _registered = True


def _ensure_loaded_eager() -> None:
    """:func:`ensure_loaded`, except inside a traced graph: there the backend's selection has loaded it already, at
    trace time, and loading (file system, locks) cannot be traced."""
    if not torch.compiler.is_compiling():
        ensure_loaded()


def _one_device(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """The fake kernels also run for real tensors when one of them is on the meta device, and would return empty
    tensors on the others' device: raise RuntimeError naming the devices instead (ATen's ops refuse such a mix)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"deepseek_moe::{op}: its tensors are on different devices ({sorted(map(str, devices))}); "
                           f"move the layer's weights and its input to one device")


def _register() -> None:
    @torch.library.register_fake(_OPS + "route_plan")
    def _(topk_idx, num_experts):
        T, K = topk_idx.shape
        new = topk_idx.new_empty
        return new(num_experts), new(num_experts + 1), new(T * K), new(T * K), new(T, K)

    @torch.library.register_fake(_OPS + "combine")
    def _(o, slot, weight):
        _one_device("combine", o, slot, weight)
        return o.new_empty(slot.shape[0], o.shape[1])

    @torch.library.register_fake(_OPS + "combine_backward")
    def _(grad_y, o, slot, weight):
        _one_device("combine_backward", grad_y, o, slot, weight)
        acc = acc_dtype(o.dtype)
        return o.new_empty(o.shape), (o.new_empty(slot.shape, dtype=acc) if weight is not None
                                      else o.new_empty(0, dtype=acc))

    @torch.library.register_fake(_OPS + "segment_mlp_fused")
    def _(x, gate_up, down, token, weight, counts, limit):
        _one_device("segment_mlp_fused", x, gate_up, down, token, weight, counts)
        return x.new_empty(x.shape), x.new_empty(token.shape[0], gate_up.shape[1])

    @torch.library.register_fake(_OPS + "expert_gemv")
    def _(x, gate_up, down, token, weight, counts, limit, shared_gate=None, shared_up=None, shared_down=None):
        _one_device("expert_gemv", x, gate_up, down, token, weight, counts, shared_gate, shared_up, shared_down)
        return x.new_empty(x.shape)

    @torch.library.register_fake(_OPS + "expert_blocks")
    def _(x, gate_up, down, token, weight, counts, limit, shared_gate=None, shared_up=None, shared_down=None):
        _one_device("expert_blocks", x, gate_up, down, token, weight, counts, shared_gate, shared_up, shared_down)
        return x.new_empty(x.shape)

    @torch.library.register_fake(_OPS + "router_logits")
    def _(x, weight):
        _one_device("router_logits", x, weight)
        # The CPU kernel's checks, so that a traced graph refuses what a call would.
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise RuntimeError(f"router_logits: weight must be (E, H) float32, got {weight.dtype} "
                               f"{tuple(weight.shape)}")
        if x.dim() != 2 or x.shape[1] != weight.shape[1]:
            raise RuntimeError(f"router_logits: x must be (T, H) with H = {weight.shape[1]}, got {tuple(x.shape)}")
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise RuntimeError(f"router_logits: x must be float32, bfloat16 or float16 (the gate GEMM is fp32), "
                               f"got {x.dtype}")
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake(_OPS + "route_topk")
    def _(logits, bias, score_func, top_k, num_groups, topk_groups, group_score, norm, scale):
        _one_device("route_topk", logits, bias)
        T = logits.shape[0]
        return logits.new_empty(logits.shape), logits.new_empty(T, top_k, dtype=torch.int64), \
            logits.new_empty(T, top_k)

    @torch.library.register_fake(_OPS + "fused_moe")
    def _(x, router_weight, bias, score_func, top_k, num_groups, topk_groups, group_score, norm, scale, gate_up, down,
          limit, blocks, shared_gate=None, shared_up=None, shared_down=None):
        _one_device("fused_moe", x, router_weight, bias, gate_up, down, shared_gate, shared_up, shared_down)
        T, E = x.numel() // x.shape[-1], router_weight.shape[0]
        new = x.new_empty
        return (new(x.shape), new(T, E, dtype=torch.float32), new(T, E, dtype=torch.float32),
                new(T, top_k, dtype=torch.int64), new(T, top_k, dtype=torch.float32), new(E, dtype=torch.int64))

    @torch.library.register_fake(_OPS + "segment_mlp_fused_backward")
    def _(grad_y, x, gate_up, down, token, weight, counts, h, limit):
        _one_device("segment_mlp_fused_backward", grad_y, x, gate_up, down, token, weight, counts, h)
        return x.new_empty(x.shape), gate_up.new_empty(gate_up.shape), down.new_empty(down.shape), \
            weight.new_empty(weight.shape)

    torch.library.register_autograd(_OPS + "combine", _combine_backward, setup_context=_combine_setup)
    torch.library.register_autograd(_OPS + "segment_mlp_fused", _segment_backward, setup_context=_segment_setup)
    # Called directly on tensors that need gradients: say so at backward.
    for op in (*_INFERENCE_OPS.values(), "fused_moe", "router_logits"):
        torch.library.register_autograd(_OPS + op, _inference_only(op))


def _inference_only(op: str):
    def backward(ctx, grad_y):
        raise RuntimeError(f"deepseek_moe::{op} computes inference only and has no backward; the layer selects it "
                           f"only without autograd (strategy 'segments' has one)")
    return backward


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad_y):
    o, slot, weight = ctx.saved_tensors
    grad_o, grad_w = torch.ops.deepseek_moe.combine_backward(grad_y.contiguous(), o, slot, weight)
    return grad_o, None, (grad_w.to(weight.dtype) if weight is not None else None)


def _segment_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1], output[1])
    ctx.limit = inputs[-1]
    ctx.set_materialize_grads(False)  # h is returned only to be saved: never build its (N, 2I) zero gradient


def _segment_backward(ctx, grad_y, grad_h):
    if grad_y is None:
        return (None,) * 7
    x, gate_up, down, token, weight, counts, h = ctx.saved_tensors
    gx, ggu, gdn, gw = torch.ops.deepseek_moe.segment_mlp_fused_backward(grad_y.contiguous(), x, gate_up, down,
                                                                         token, weight, counts, h, ctx.limit)
    return gx, ggu, gdn, None, gw, None, None


def combine(o_NH: torch.Tensor, plan: DispatchPlan, weighted: bool = False) -> torch.Tensor:
    """(N, H) -> (T, H) on CUDA: y[t] = Σ_k w[t, k] · o[slot[t, k]] in fp32, o's dtype out; w = 1 unless
    ``weighted`` (then the plan's gate weights, differentiable). The extension's CUDA kernel for
    :func:`deepseek_moe.rows.combine_rows`."""
    _ensure_loaded_eager()
    return torch.ops.deepseek_moe.combine(o_NH, plan.slot_TK, plan.weight_TK if weighted else None)


def route_plan(topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int) -> DispatchPlan:
    """The dropless :class:`DispatchPlan` from the extension's stable counting sort (identical to
    :func:`deepseek_moe.dispatch.build_plan` without capacity)."""
    _ensure_loaded_eager()
    T, K = topk_idx_TK.shape
    counts_E, offsets_E1, pair_N, token_N, slot_TK = torch.ops.deepseek_moe.route_plan(topk_idx_TK, num_experts)
    device = topk_idx_TK.device
    return DispatchPlan(topk_idx_TK=topk_idx_TK, weight_TK=weight_TK,
                        keep_TK=torch.ones(T, K, dtype=torch.bool, device=device), pair_N=pair_N, token_N=token_N,
                        slot_TK=slot_TK, counts_E=counts_E, offsets_E1=offsets_E1, routed_counts_E=counts_E,
                        num_dropped=torch.zeros((), dtype=torch.int64, device=device))


_blocks_kernels: dict = {}  # dtype -> whether the loaded extension's blocks op has a micro-kernel for it here


def blocks_supported(dtype: torch.dtype, sizes: Optional[Tuple[int, int]] = None) -> bool:
    """Whether the loaded extension's ``expert_blocks`` has a micro-kernel for ``dtype`` on this CPU (fp32; bf16
    where oneDNN packs it, AMX or AVX-512 BF16, or through fp32 where the CPU has AVX2) and, in bf16, the
    (hidden_size, expert_hidden_size) ``sizes`` are even (VNNI pairs; None: assumed so). False while the extension
    is not loaded. Asked on every inference forward on the CPU (:func:`deepseek_moe.backends.decode_tokens`), so
    the op's answer is kept."""
    if dtype not in (torch.float32, torch.bfloat16) or not ext.is_loaded():
        return False
    if dtype == torch.bfloat16 and sizes is not None and any(n % 2 for n in sizes):
        return False
    if dtype not in _blocks_kernels:
        ensure_loaded()
        _blocks_kernels[dtype] = bool(torch.ops.deepseek_moe.expert_blocks_supported(dtype))
    return _blocks_kernels[dtype]


def has_cuda_kernels() -> bool:
    """Whether the loaded extension carries its CUDA kernels (an ahead-of-time build with a CUDA torch)."""
    return ext.is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(_OPS + "route_plan", "CUDA")


class ExtBackend(Backend):
    """The compiled extension, with ``strategy`` "segments", "decode" or "blocks" (CPU; the last two for inference
    only) or "grouped_mm" (CUDA) (module docstring). With
    capacity or a slot mask the plan comes from :func:`deepseek_moe.plan.build_plan` (the extension sorts dropless
    plans only)."""

    name = "ext"
    activations = ("silu",)  # the C++ segment loop implements SwiGLU (clamped or not) only

    def __init__(self, strategy: str = "segments", activation: str = "silu"):
        super().__init__(activation)
        if strategy not in STRATEGIES:
            raise ValueError(f"ExtBackend: strategy={strategy!r} is invalid; expected one of {STRATEGIES}")
        self.strategy = strategy
        self._step = (None, None)  # (config, fused_step(config)) of the last call
        self._gemm = None  # router_gemm()

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, activation: str = "silu", decode: bool = False,
                   inference: bool = False, sizes: Optional[Tuple[int, int]] = None,
                   batch_invariant: bool = False) -> "ExtBackend":
        """On CPU the weight-streaming decode op when ``decode`` (inference on a few tokens) and for every inference
        call that must be ``batch_invariant`` (:meth:`invariance_reason`), the sorted-block op for other inference
        where it has a micro-kernel (:func:`blocks_supported`), else the segment loop (which has a backward);
        elsewhere the grouped GEMM with the extension's combine."""
        if device.type != "cpu":
            return cls("grouped_mm", activation)
        if decode or (inference and batch_invariant):
            return cls("decode", activation)
        return cls("blocks" if inference and blocks_supported(dtype, sizes) else "segments", activation)

    def invariance_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None for the decode op: each output is one fixed-order sum over the token's own pairs (each a fixed-order
        dot product per row, whatever the rows per call) and its shared experts, one thread per output row, so a
        token's bits do not depend on its batch or the thread count (csrc/cpu/expert_gemv.cpp); with its gate GEMM
        (:meth:`router_gemm`) and the router's position-invariant scores the whole step is batch-invariant, at any
        token count. The other strategies' GEMMs take each expert's rows in one call, blocked by their count."""
        if self.strategy == "decode":
            return None
        return ("its GEMMs with a backward (and on CUDA) take each expert's rows in one call, blocked by their count, "
                "so a token's result depends on its batch (inference on the CPU runs its batch-invariant decode op); "
                "use backend='torch' (or 'auto', which picks it)")

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return f"the ext backend supports floating dtypes, not {dtype}"
        if device.type not in ("cpu", "cuda"):
            return f"the ext backend runs on CPU and CUDA, not {device.type!r}"
        reason = ext.unavailable_reason()  # loads an ahead-of-time build
        if reason is not None:
            return reason
        try:
            ensure_loaded()  # registers the ops' autograd and fake implementations (once)
        except ext.ExtensionUnavailable as err:
            return str(err)
        if device.type == "cuda":
            if not has_cuda_kernels():
                return ("the loaded extension has no CUDA kernels (a just-in-time build is CPU-only): build it ahead "
                        "of time with a CUDA torch, TORCH_CUDA_ARCH_LIST=... DEEPSEEK_MOE_BUILD_EXT=1 pip install -e . "
                        "--no-build-isolation")
            if self.strategy != "grouped_mm":
                return (f"the ext backend's {self.strategy} strategy runs on CPU only; use strategy 'grouped_mm' on "
                        f"CUDA")
            if not cuda_grouped_mm_ok(device, dtype):
                return ("the ext backend on CUDA uses PyTorch's grouped GEMM, which runs bf16 on compute capability "
                        f">= 9.0; got {dtype} on {torch.cuda.get_device_name(device)}")
        if self.strategy == "blocks" and device.type == "cpu" and not blocks_supported(dtype):
            return (f"the ext backend's blocks strategy runs fp32, and bf16 on a CPU with AMX; "
                    f"not {dtype} here")
        if self.strategy == "grouped_mm" and _grouped_mm is None:
            return f"torch {torch.__version__} has no grouped_mm"
        return None

    @staticmethod
    def prepare() -> None:
        """Load (or build) the extension; a failure is reported by :meth:`unavailable_reason`."""
        try:
            ensure_loaded()
        except ext.ExtensionUnavailable:
            pass

    def _route_args(self, cfg) -> Optional[tuple]:
        """route_topk's routing arguments for ``cfg`` under the inference strategies (decode and blocks): every score
        function, with or without groups (max or top-2 sum), when no device limit applies; None otherwise."""
        if self.strategy not in _INFERENCE_OPS or cfg.score_func not in _SCORE_FUNCS or (
                cfg.max_devices_per_token is not None and cfg.max_devices_per_token < cfg.num_devices):
            return None
        _ensure_loaded_eager()
        return (_SCORE_FUNCS[cfg.score_func], cfg.top_k, cfg.num_groups, cfg.topk_groups,
                _GROUP_SCORES[cfg.group_score], cfg.norm_topk_prob, float(cfg.routed_scaling_factor))

    def selector(self, cfg):
        """The extension's ``route_topk`` where :meth:`_route_args` allows it."""
        args = self._route_args(cfg)
        if args is None:
            return None

        def select(logits_TE: torch.Tensor, bias_E: torch.Tensor):
            if logits_TE.dtype != torch.float32 or bias_E.dtype != torch.float32:
                return None
            return torch.ops.deepseek_moe.route_topk(logits_TE, bias_E, *args)
        return select

    def router_gemm(self):
        """The extension's ``router_logits`` under the decode strategy, for tokens in fp32, bf16 or fp16 and a router
        weight in fp32: each logit one dot product in a fixed order, so a step's gate logits are the same bits on
        any number of threads and for a token in any batch (ATen's linear splits its work by thread count), and a
        decode step's gate GEMM needs no parallel region (on a CPU shared with another busy process one costs
        milliseconds: docs/benchmarks.md)."""
        if self.strategy != "decode":
            return None
        if self._gemm is None:  # asked on every inference call: built once
            _ensure_loaded_eager()
            op, ok = torch.ops.deepseek_moe.router_logits.default, (torch.float32, torch.bfloat16, torch.float16)

            def gemm(x_TH, weight_EH):
                if x_TH.dtype not in ok or weight_EH.dtype != torch.float32 or x_TH.device != weight_EH.device:
                    return None
                return op(x_TH, weight_EH)
            self._gemm = gemm
        return self._gemm

    def fused_step(self, cfg):
        """The extension's ``fused_moe`` (gate GEMM, route_topk, route_plan and this strategy's op in one call)
        where :meth:`_route_args` allows it, for a router weight and bias in fp32 and x in a dtype of at most 32
        bits (the router's gate GEMM is then fp32)."""
        if self._step[0] is not cfg:  # asked on every inference call: built once per config
            args = self._route_args(cfg)
            self._step = (cfg, None if args is None else self._fused_op(args))
        return self._step[1]

    def _fused_op(self, route_args: tuple):
        op, blocks = torch.ops.deepseek_moe.fused_moe.default, self.strategy == "blocks"

        def step(x, router_weight_EH, bias_E, gate_up_EJH, down_EHI, shared=None):
            # The router's gate runs in promote(x, fp32): the op's fp32 gate GEMM only where that is fp32.
            if router_weight_EH.dtype != torch.float32 or bias_E.dtype != torch.float32 or x.dtype == torch.float64:
                return None
            return op(x, router_weight_EH, bias_E, *route_args, gate_up_EJH, down_EHI, self.limit, blocks,
                      *(shared or ()))
        return step

    def fuses_shared(self, shared) -> bool:
        """The inference ops do; the blocks op in bf16 only for an even shared width (VNNI pairs)."""
        if self.strategy not in _INFERENCE_OPS:
            return False
        return self.strategy != "blocks" or shared[0].dtype != torch.bfloat16 or shared[0].shape[0] % 2 == 0

    def run(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI, shared=None):
        if self.strategy == "grouped_mm":
            return grouped_mm_experts(x_TH, plan, gate_up_EJH, down_EHI, self.activation, combine)
        weight_N = sorted_weights(plan).to(acc_dtype(x_TH.dtype))
        with stage("experts"):
            if self.strategy in _INFERENCE_OPS:  # selected for inference only: the ops have no backward
                op = getattr(torch.ops.deepseek_moe, _INFERENCE_OPS[self.strategy])
                return op(x_TH, gate_up_EJH, down_EHI, plan.token_N, weight_N, plan.counts_E, self.limit,
                          *(shared or ()))
            y_TH, _ = torch.ops.deepseek_moe.segment_mlp_fused(x_TH, gate_up_EJH.contiguous(),
                                                               down_EHI.contiguous(), plan.token_N, weight_N,
                                                               plan.counts_E, self.limit)
        return y_TH

    def plan(self, topk_idx_TK, weight_TK, num_experts, capacity=None, affinity_TK=None, keep_TK=None):
        if capacity is not None or keep_TK is not None:
            return super().plan(topk_idx_TK, weight_TK, num_experts, capacity, affinity_TK, keep_TK)
        return route_plan(topk_idx_TK, weight_TK, num_experts)

    def spec(self) -> str:
        return f"{super().spec()}:{self.strategy}"

    def __repr__(self) -> str:
        return f"<deepseek_moe backend 'ext' strategy={self.strategy!r}>"
