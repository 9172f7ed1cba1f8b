"""The ``torch`` backend: the routed experts in plain PyTorch, one of two strategies fixed at selection.

* ``segments`` (CPU): one custom op that walks the expert segments of the sorted pairs and, for each expert,
  gathers its rows, runs gate_up GEMM → GLU·w → down GEMM and adds the rows into y while the segment is still
  in cache. No (N, H) gathered copy, no (N, H) output, no full-size per-expert gradient buffers; the backward
  mirrors it. Registered with ``torch.library`` so ``torch.compile`` treats it as one op. Selected for a forward
  without autograd, it runs the op's body directly and keeps no activations.
* ``grouped_mm`` (CUDA bf16 on compute capability >= 9.0, where PyTorch's grouped GEMM runs): the reference's
  gather, ``grouped_mm`` → GLU → ``grouped_mm``, the reference's weighted combine; autograd through PyTorch's
  kernels.

Legend: T tokens, H hidden size, I expert hidden size, J = 2·I, E routed experts, N kept pairs, M padded pairs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import invariant
from ..glu import acc_dtype, glu, glu_backward
from ..plan import DispatchPlan, segment_ranks, sorted_weights
from ..rows import combine_rows, gather_rows
from ..stages import stage
from .base import Backend

STRATEGIES = ("segments", "grouped_mm")
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ------------------------------------------------------------------------------------------ segments op
@torch.library.custom_op("deepseek_moe::segment_mlp", mutates_args=())
def segment_mlp(x_TH: torch.Tensor, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor, token_N: torch.Tensor,
                weight_N: torch.Tensor, counts_E: torch.Tensor, activation: str = "silu", row_tile: int = 0
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """y_TH = Σ over sorted pairs n of weight_N[n] · GLU_{e(n)}(x_TH[token_N[n]]), and the saved h_NJ.

    token_N must be sorted by expert with ``counts_E`` pairs per expert. ``row_tile`` > 0: batch-invariant (every
    count a multiple of it; GEMMs of exactly that many rows, position-independent GLU). Returns (y_TH in x's
    dtype, h_NJ = the gate_up pre-activations, kept for the backward).
    """
    return _segment_forward(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, activation, True, row_tile)


# Rows per block of the forward loop: consecutive experts are taken together up to this many rows (an expert with
# more forms a block of its own). With few rows per expert (decode) a block holds many experts, so the gather, GLU
# and scatter run once per block instead of once per expert: at T = 1 the per-expert version took 1.2x the time,
# at T = 64 1.35x; with many rows per block (training, prefill) each expert is a block that stays in cache.
BLOCK_ROWS = 256


def _blocks(counts: List[int]) -> List[Tuple[int, int, List[Tuple[int, int, int]]]]:
    """[(first row, end row, [(expert, first row in the block, rows)])]: consecutive non-empty experts grouped into
    blocks of at most BLOCK_ROWS rows (or one expert)."""
    blocks, start, members, begin = [], 0, [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        if members and start + n - begin > BLOCK_ROWS:
            blocks.append((begin, start, members))
            members, begin = [], start
        members.append((e, start - begin, n))
        start += n
    if members:
        blocks.append((begin, start, members))
    return blocks


def _tiles(members: List[Tuple[int, int, int]], row_tile: int) -> List[Tuple[int, int, int]]:
    """(expert, first row, rows) per GEMM: each member whole, or cut into tiles of ``row_tile`` rows."""
    if not row_tile:
        return members
    return [(e, first + i, row_tile) for e, first, n in members for i in range(0, n, row_tile)]


def _segment_forward(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, activation, save: bool,
                     row_tile: int = 0):
    """The body of :func:`segment_mlp`, block by block (:data:`BLOCK_ROWS`): gather the block's rows, each expert's
    gate_up GEMM, one GLU·w pass, each expert's down GEMM, one scatter-add into y. Without ``save`` (no backward
    follows) h_NJ is not kept (returns None). ``row_tile``: see :func:`segment_mlp`."""
    T, H = x_TH.shape
    I = down_EHI.shape[-1]
    h_NJ = x_TH.new_empty(token_N.shape[0], 2 * I) if save else None
    acc = acc_dtype(x_TH.dtype)
    y_TH = torch.zeros(T, H, dtype=acc, device=x_TH.device)
    for begin, end, members in _blocks(counts_E.tolist()):
        tok_b = token_N[begin:end]
        x_bH = x_TH.index_select(0, tok_b)
        h_bJ = h_NJ[begin:end] if save else x_TH.new_empty(end - begin, 2 * I)
        gemms = _tiles(members, row_tile)
        for e, first, n in gemms:
            torch.mm(x_bH[first:first + n], gate_up_EJH[e].t(), out=h_bJ[first:first + n])
        a_bI = glu(h_bJ, activation, weight_N[begin:end], batch_invariant=row_tile > 0).to(x_TH.dtype)
        out_bH = x_TH.new_empty(end - begin, H)
        for e, first, n in gemms:
            torch.mm(a_bI[first:first + n], down_EHI[e].t(), out=out_bH[first:first + n])
        y_TH.index_add_(0, tok_b, out_bH if out_bH.dtype == acc else out_bH.to(acc))
    return y_TH.to(x_TH.dtype), h_NJ


@segment_mlp.register_fake
def _(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, activation="silu", row_tile=0):
    return x_TH.new_empty(x_TH.shape), x_TH.new_empty(token_N.shape[0], 2 * down_EHI.shape[-1])


@torch.library.custom_op("deepseek_moe::segment_mlp_backward", mutates_args=())
def segment_mlp_backward(grad_y_TH: torch.Tensor, x_TH: torch.Tensor, gate_up_EJH: torch.Tensor,
                         down_EHI: torch.Tensor, token_N: torch.Tensor, weight_N: torch.Tensor,
                         counts_E: torch.Tensor, h_NJ: torch.Tensor, activation: str = "silu"
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`segment_mlp`: (grad_x_TH, grad_gate_up_EJH, grad_down_EHI, grad_weight_N)."""
    dtype = x_TH.dtype
    grad_y_TH = grad_y_TH.contiguous()
    grad_gate_up, grad_down = torch.empty_like(gate_up_EJH), torch.empty_like(down_EHI)
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
        grad_h_nJ, gw_n, a_nI = glu_backward(h_seg[e], w_seg[e], grad_a_nI, activation)
        gw_seg[e].copy_(gw_n)
        if dtype != acc:
            a_nI, grad_h_nJ = a_nI.to(dtype), grad_h_nJ.to(dtype)
        torch.mm(grad_out_nH.t(), a_nI, out=grad_down[e])
        torch.mm(grad_h_nJ.t(), x_TH.index_select(0, tok_seg[e]), out=grad_gate_up[e])
        grad_x_nH = torch.mm(grad_h_nJ, gate_up_EJH[e])
        grad_x_TH.index_add_(0, tok_seg[e], grad_x_nH if dtype == acc else grad_x_nH.to(acc))
    return grad_x_TH.to(dtype), grad_gate_up, grad_down, grad_w_N


@segment_mlp_backward.register_fake
def _(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, h_NJ, activation="silu"):
    return (x_TH.new_empty(x_TH.shape), gate_up_EJH.new_empty(gate_up_EJH.shape),
            down_EHI.new_empty(down_EHI.shape), weight_N.new_empty(weight_N.shape))


def _segment_setup(ctx, inputs, output):
    x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, activation, _ = inputs
    ctx.save_for_backward(x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, output[1])
    ctx.activation = activation
    # h_NJ is returned only to be saved: nothing uses its gradient, and materialising that (N, 2I) zero tensor
    # cost ~5% of the layer's forward+backward.
    ctx.set_materialize_grads(False)


def _segment_backward(ctx, grad_y_TH, grad_h_NJ):
    if grad_y_TH is None:  # y unused (grads are not materialised): nothing flows back
        return (None,) * 8
    x_TH, gate_up_EJH, down_EHI, token_N, weight_N, counts_E, h_NJ = ctx.saved_tensors
    gx, ggu, gdn, gw = segment_mlp_backward(grad_y_TH, x_TH, gate_up_EJH, down_EHI, token_N, weight_N,
                                            counts_E, h_NJ, ctx.activation)
    return gx, ggu, gdn, None, gw, None, None, None


segment_mlp.register_autograd(_segment_backward, setup_context=_segment_setup)


# ------------------------------------------------------------------------------------------ backend
def cuda_grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """PyTorch's CUDA grouped GEMM runs bf16 on Hopper-class GPUs (compute capability >= 9.0) only."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and _grouped_mm is not None
            and torch.cuda.get_device_capability(device) >= (9, 0))


def grouped_mm_shape_reason(hidden_size: int, expert_hidden_size: int, dtype: torch.dtype) -> Optional[str]:
    """None when grouped_mm takes these expert shapes (rows of H, 2I and I elements must be multiples of 16
    bytes), else why not."""
    size = torch.empty((), dtype=dtype).element_size()
    if hidden_size * size % 16 or expert_hidden_size * size % 16:
        return (f"PyTorch's grouped_mm needs hidden_size and expert_hidden_size of a multiple of {16 // size} "
                f"elements in {dtype}, got {hidden_size} and {expert_hidden_size}")
    return None


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
    pos_N = starts_E[expert_N] + segment_ranks(expert_N, counts_E)
    M = int(padded_E.sum())
    token_M = token_N.new_zeros(M).index_copy_(0, pos_N, token_N)
    weight_M = weight_N.new_zeros(M).index_copy(0, pos_N, weight_N)
    return token_M, weight_M, padded_E


def grouped_mm_experts(x_TH: torch.Tensor, plan: DispatchPlan, gate_up_EJH: torch.Tensor, down_EHI: torch.Tensor,
                       activation: str = "silu", combine=combine_rows) -> torch.Tensor:
    """y_TH = Σ_k w · down_e · GLU(gate_up_e · x_t) (T, H): the plan's rows gathered in expert order, two grouped
    GEMMs (shapes checked at selection: :func:`grouped_mm_shape_reason`), then ``combine`` (o_NH, plan,
    weighted=True) -> y_TH (:func:`~deepseek_moe.rows.combine_rows` or the extension's), each a profiler stage."""
    with stage("permute"):
        x_NH = gather_rows(x_TH, plan)
    offs_E = plan.offsets_E1[1:].to(torch.int32)
    with stage("gemm1_glu"):
        a_NI = glu(_grouped_mm(x_NH, gate_up_EJH.transpose(1, 2), offs=offs_E), activation).to(x_NH.dtype)
    with stage("gemm2"):
        o_NH = _grouped_mm(a_NI, down_EHI.transpose(1, 2), offs=offs_E)
    with stage("combine"):
        return combine(o_NH, plan, weighted=True)


class TorchBackend(Backend):
    """The experts in PyTorch ops, with ``strategy`` "segments" or "grouped_mm" (module docstring).

    ``pad_multiple`` (segments only): pad expert segments to this many rows. :meth:`for_device` pads 16-bit
    dtypes on CPU to 32, because oneDNN builds a new GEMM primitive for every new row count and ragged counts
    change every step (measured 3-4x slower GEMMs than with padded, cached shapes). fp32 uses MKL and needs no
    padding. ``inference`` (segments only): no backward follows (selected for forwards without autograd), so the
    segment loop runs without its custom op's dispatch (~0.1 ms, a tenth of a decode step) and keeps no
    activations. Batch-invariant (``batch_invariant``, set by selection): segments padded to
    :data:`deepseek_moe.invariant.ROW_TILE` rows and GEMMs of exactly that many.
    """

    name = "torch"

    def __init__(self, strategy: str = "segments", pad_multiple: int = 1, inference: bool = False,
                 activation: str = "silu", sizes: Optional[Tuple[int, int]] = None):
        super().__init__(activation)
        if strategy not in STRATEGIES:
            raise ValueError(f"{type(self).__name__}: strategy={strategy!r} is invalid; expected one of {STRATEGIES}")
        if not isinstance(pad_multiple, int) or pad_multiple < 1:
            raise ValueError(f"{type(self).__name__}: pad_multiple={pad_multiple!r} is invalid; expected an int >= 1")
        if strategy == "grouped_mm" and _grouped_mm is None:
            raise ValueError(f"torch {torch.__version__} has no grouped_mm; use strategy='segments' or torch>=2.9")
        self.strategy = strategy
        self.pad_multiple = pad_multiple
        self.inference = bool(inference) and strategy == "segments"
        self.sizes = sizes  # (H, I) of the experts when known: grouped_mm checks them (unavailable_reason)

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype, strategy: str = "auto", inference: bool = False,
                   activation: str = "silu", sizes: Optional[Tuple[int, int]] = None,
                   batch_invariant: bool = False) -> "TorchBackend":
        """The backend for (device, dtype): ``strategy`` "auto" is grouped_mm where PyTorch's CUDA grouped GEMM
        runs and takes the expert ``sizes`` (H, I), else segments (on a 2-core CPU at T = 4096 the cache-resident
        segment loop took 0.75x the time of grouped_mm with separate gather and combine passes, 0.57x in bf16);
        segments padded for 16-bit dtypes on CPU. ``batch_invariant``: segments in row tiles."""
        if strategy == "auto":
            fits = sizes is None or grouped_mm_shape_reason(*sizes, dtype) is None
            strategy = ("grouped_mm" if cuda_grouped_mm_ok(device, dtype) and fits and not batch_invariant
                        else "segments")
        pad = 32 if strategy == "segments" and device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1
        if batch_invariant and strategy == "segments":
            pad = invariant.ROW_TILE
        backend = cls(strategy, pad, inference, activation, sizes)
        backend.batch_invariant = batch_invariant
        return backend

    def run(self, x_TH, plan: DispatchPlan, gate_up_EJH, down_EHI):
        if self.strategy == "grouped_mm":
            return grouped_mm_experts(x_TH, plan, gate_up_EJH, down_EHI, self.activation)
        token, weight, counts = plan.token_N, sorted_weights(plan).to(acc_dtype(x_TH.dtype)), plan.counts_E
        if self.pad_multiple > 1:
            token, weight, counts = align_segments(token, weight, counts, self.pad_multiple)
        row_tile = self.pad_multiple if self.batch_invariant else 0
        with stage("experts"):
            if self.inference:
                return _segment_forward(x_TH, gate_up_EJH, down_EHI, token, weight, counts, self.activation,
                                        False, row_tile)[0]
            y_TH, _ = segment_mlp(x_TH, gate_up_EJH.contiguous(), down_EHI.contiguous(), token, weight, counts,
                                  self.activation, row_tile)
        return y_TH

    def traces(self) -> bool:
        # Inference runs the segment loop in Python over data-dependent counts: not one graph.
        return not (self.inference and self.strategy == "segments")

    def invariance_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if self.strategy == "grouped_mm":
            return ("PyTorch's grouped_mm blocks a group's rows by the group's size, so a token's result depends on "
                    "its batch; use strategy 'segments' (unset DEEPSEEK_MOE_TORCH_STRATEGY)")
        if self.pad_multiple != invariant.ROW_TILE:
            return f"segments padded to {self.pad_multiple} rows, not deepseek_moe.invariant.ROW_TILE"
        return None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if self.strategy == "grouped_mm" and dtype == torch.float64:
            return ("PyTorch's grouped_mm has no float64 kernels; use strategy 'segments' (unset "
                    "DEEPSEEK_MOE_TORCH_STRATEGY)")
        if self.strategy == "grouped_mm" and self.sizes is not None:
            return grouped_mm_shape_reason(*self.sizes, dtype)
        return None

    def spec(self) -> str:
        return f"{super().spec()}:{self.strategy}:{self.pad_multiple}:{int(self.inference)}"

    def __repr__(self) -> str:
        return (f"<deepseek_moe backend {self.name!r} strategy={self.strategy!r} pad_multiple={self.pad_multiple}"
                f"{' inference' if self.inference else ''}>")
