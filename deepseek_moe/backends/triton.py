"""The ``triton`` backend: the routed experts through the Triton kernels of :mod:`deepseek_moe.kernels`.

Two ``torch.library`` custom ops with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces
the layer with one opaque node per direction; nothing in them synchronises with the host (no ``.item()`` or
``.tolist()``): tile maps and grids come from static shapes and device tensors.

This module imports no Triton at import time; the kernels load on first use. On CPU the kernels run only in
Triton's interpreter (``TRITON_INTERPRET=1``, slow: for tests). Tiles and interpreter mode reach the ops as an
argument (``settings``), resolved once per device and dtype.

Legend: T tokens, K slots per token, P = T·K, N kept pairs (sorted by expert), H hidden size, I expert hidden
size, J = 2·I, E experts.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

from ..glu import acc_dtype
from ..plan import DispatchPlan, sorted_weights
from ..stages import stage
from ..versions import below_floor, installed, parse
from .base import Backend


def _launchers():
    from ..kernels import launch  # deferred: importing triton is slow and optional

    return launch


def _tiles(settings: List[int]):
    """(interpret, {kind: TileConfig}) from the flat settings list the ops take (see :meth:`TritonBackend.settings`)."""
    from ..kernels.heuristics import KINDS, TileConfig

    return bool(settings[0]), {kind: TileConfig(*settings[1 + 5 * i:6 + 5 * i]) for i, kind in enumerate(KINDS)}


def _sum_k(rows_PH: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """(T·K, H) rows in (token, slot) order -> (T, H): the K-way sum in fp32, cast to ``dtype``."""
    return rows_PH.view(-1, top_k, rows_PH.shape[-1]).sum(1, dtype=acc_dtype(dtype)).to(dtype)


@torch.library.custom_op("deepseek_moe::triton_expert_mlp", mutates_args=())
def triton_expert_mlp(x_TH: torch.Tensor, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
                      token_N: torch.Tensor, pair_N: torch.Tensor, weight_N: torch.Tensor,
                      offsets_E1: torch.Tensor, top_k: int, settings: List[int],
                      limit: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """y_TH = Σ_k w · SwiGLU_e(x) over the kept pairs, and h_NJ (the gate/up pre-activations, for the backward).

    token_N/pair_N: int64 (N,) token and pair id of each expert-sorted pair; weight_N: fp32 (N,);
    offsets_E1: int64 (E+1,) segment starts; settings: interpreter mode and tiles (:meth:`TritonBackend.settings`);
    limit: the SwiGLU's clamp (``swiglu_limit``), None for none. Pairs that are not kept (capacity) contribute zero.
    """
    k = _launchers()
    interpret, tiles = _tiles(settings)
    T = x_TH.shape[0]
    with stage("gemm1_glu"):  # the gather runs in this GEMM's loads
        h_NJ, a_NI = k.gate_up_swiglu(x_TH, token_N, weight_N, gate_up_EJH, offsets_E1, tiles["gate_up"],
                                      interpret, limit)
    with stage("gemm2"):
        o_PH = k.grouped_gemm_scatter(a_NI, down_EHI.transpose(1, 2), pair_N, T * top_k, offsets_E1,
                                      pair_N.numel() < T * top_k, tiles["down"], interpret)
    with stage("combine"):
        return _sum_k(o_PH, top_k, x_TH.dtype), h_NJ


@triton_expert_mlp.register_fake
def _(x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, top_k, settings, limit):
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(token_N.shape[0], gate_up_EJH.shape[1])


@torch.library.custom_op("deepseek_moe::triton_expert_mlp_backward", mutates_args=())
def triton_expert_mlp_backward(grad_y_TH: torch.Tensor, x_TH: torch.Tensor, gate_up_EJH: torch.Tensor,
                               down_EHI: torch.Tensor, token_N: torch.Tensor, pair_N: torch.Tensor,
                               weight_N: torch.Tensor, offsets_E1: torch.Tensor, h_NJ: torch.Tensor, top_k: int,
                               settings: List[int], limit: Optional[float]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`triton_expert_mlp`: (grad_x_TH, grad_gate_up_EJH, grad_down_EHI, grad_weight_N)."""
    k = _launchers()
    interpret, tiles = _tiles(settings)
    T = x_TH.shape[0]
    grad_y_TH = grad_y_TH.contiguous()
    with stage("gemm2"):  # the combine's backward (the gather of grad_y) runs in these kernels' loads
        grad_h_NJ, a_NI, grad_w_N = k.down_swiglu_backward(grad_y_TH, token_N, down_EHI, h_NJ, weight_N,
                                                           offsets_E1, tiles["down_bwd"], interpret, limit)
        grad_down = k.expert_weight_grad(grad_y_TH, token_N, a_NI, None, offsets_E1, down_EHI.dtype,
                                         tiles["wgrad"], interpret)
    with stage("gemm1_glu"):
        grad_gate_up = k.expert_weight_grad(grad_h_NJ, None, x_TH, token_N, offsets_E1, gate_up_EJH.dtype,
                                            tiles["wgrad"], interpret)
        gx_PH = k.grouped_gemm_scatter(grad_h_NJ, gate_up_EJH, pair_N, T * top_k, offsets_E1,
                                       pair_N.numel() < T * top_k, tiles["dgrad"], interpret)
    with stage("permute"):  # the gather's backward: the K rows of each token summed
        return _sum_k(gx_PH, top_k, x_TH.dtype), grad_gate_up, grad_down, grad_w_N.to(weight_N.dtype)


@triton_expert_mlp_backward.register_fake
def _(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, h_NJ, top_k, settings, limit):
    return (x_TH.new_empty(x_TH.shape), gate_up_EJH.new_empty(gate_up_EJH.shape),
            down_EHI.new_empty(down_EHI.shape), weight_N.new_empty(weight_N.shape))


def _setup(ctx, inputs, output):
    x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, top_k, settings, limit = inputs
    ctx.save_for_backward(x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, output[1])
    ctx.top_k, ctx.settings, ctx.limit = top_k, settings, limit
    ctx.set_materialize_grads(False)  # h_NJ's gradient is never used: don't build an (N, 2I) zero tensor


def _backward(ctx, grad_y_TH, grad_h_NJ):
    if grad_y_TH is None:
        return (None,) * 10
    x_TH, gate_up_EJH, down_EHI, token_N, pair_N, weight_N, offsets_E1, h_NJ = ctx.saved_tensors
    gx, ggu, gdn, gw = triton_expert_mlp_backward(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, pair_N,
                                                  weight_N, offsets_E1, h_NJ, ctx.top_k, ctx.settings, ctx.limit)
    return gx, ggu, gdn, None, None, gw, None, None, None, None


triton_expert_mlp.register_autograd(_backward, setup_context=_setup)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; read at selection only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_reason() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run here, or None: the interpreter of triton <= 3.6 fails on numpy >= 2.4
    (InterpreterError converting 0-d arrays)."""
    triton_version, numpy_version = installed("triton"), installed("numpy")
    if triton_version and numpy_version and parse(triton_version) < (3, 7) and parse(numpy_version) >= (2, 4):
        return (f"Triton's CPU interpreter of triton {triton_version} fails with numpy {numpy_version}: "
                f"pip install 'numpy<2.4' (or triton>=3.7)")
    return None


class TritonBackend(Backend):
    """Fused Triton kernels: gather into the first GEMM, SwiGLU·w in its epilogue, scatter-store of the second
    GEMM's rows and a K-way sum; the backward mirrors it (see docs/kernels.md).

    Tiles and interpreter mode (tile overrides of :func:`deepseek_moe.kernels.force_tiles` and
    ``DEEPSEEK_MOE_TRITON_TILES``, the tuning table's entry for the experts' sizes, the GPU's compute capability,
    ``TRITON_INTERPRET``) are resolved when :meth:`for_device` selects it, or, for an instance built without
    ``settings``, on its first run on a (device, dtype), and kept: a launch reads neither the environment nor the
    device."""

    name = "triton"
    activations = ("silu",)  # SiLU (clamped or not) is fused into the GEMM epilogues

    def __init__(self, activation: str = "silu", settings: Optional[List[int]] = None,
                 sizes: Optional[Tuple[int, int]] = None):
        super().__init__(activation)
        self.fixed_settings = settings
        self.sizes = sizes  # the experts' (H, I), for the tuning table's entry
        self._settings: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, activation: str = "silu",
                   sizes: Optional[Tuple[int, int]] = None) -> "TritonBackend":
        """The implementation with its settings resolved for (device, dtype) and experts of ``sizes`` (H, I) now
        (nothing is resolved later)."""
        backend = cls(activation, sizes=sizes)
        if backend.unavailable_reason(device, dtype) is None:
            backend.fixed_settings = backend.settings(device, dtype)
        return backend

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'deepseek-moe[triton]')"
        old = below_floor("triton")
        if old is not None:
            return old
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"the Triton kernels support float32, bfloat16 and float16, not {dtype}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreting():
            return interpreter_reason()
        return (f"Triton kernels run on CUDA devices (on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
                f"before importing deepseek_moe; slow, for testing); got device {device.type!r}")

    def settings(self, device: torch.device, dtype: torch.dtype) -> List[int]:
        """[interpret, then BM, BC, BR, warps, stages for each kernel kind], resolved on the first call for
        (device, dtype) and kept."""
        if self.fixed_settings is not None:
            return self.fixed_settings
        key = (device, dtype)
        if key not in self._settings:
            from ..kernels.heuristics import KINDS, tile_config

            tiles = [tile_config(kind, dtype, device, self.sizes) for kind in KINDS]
            self._settings[key] = [int(interpreting())] + [v for t in tiles for v in
                                                           (t.block_m, t.block_c, t.block_r, t.num_warps,
                                                            t.num_stages)]
        return self._settings[key]

    def spec(self) -> str:
        return ":".join([super().spec()] + [str(v) for v in self.fixed_settings or ()])

    def run(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI):
        y_TH, _ = triton_expert_mlp(x_TH.contiguous(), gate_up_EJH, down_EHI, plan.token_N, plan.pair_N,
                                    sorted_weights(plan).float(), plan.offsets_E1, plan.top_k,
                                    self.settings(x_TH.device, x_TH.dtype), self.limit)
        return y_TH
