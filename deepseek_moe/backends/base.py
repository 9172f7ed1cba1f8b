"""The one contract every routed-experts implementation fulfils.

    y_TH = impl.run(x_TH, plan, gate_up_EJH, down_EHI)

An implementation owns permute -> compute -> unpermute for the pairs of ``plan`` (and may fuse them): it reads each
pair's token row, runs the pair's expert, weighs the output by the pair's gate weight ``plan.weight_TK`` and sums
each token's K outputs. The expert weights come in as arguments, so a wrapped experts module (PEFT's parameter
wrapper, FSDP2, transformers' experts interface handing in the stock weights) runs through the same code.

Everything an implementation depends on besides its inputs (device, dtype, GLU activation, whether a backward
follows, tile sizes, interpreter mode, batch invariance) is fixed when :func:`deepseek_moe.backends.select` builds
it: ``run`` never branches on data or reads the environment.

Batch invariance (selected under ``torch.use_deterministic_algorithms(True)``): a token's output rows must be
bitwise the same whatever else is in the batch and wherever the token sits in it (:mod:`deepseek_moe.invariant`);
an implementation that cannot promise it on a device says why in :meth:`Backend.invariance_reason`.

Legend: T tokens, H hidden size, I expert hidden size, J = 2·I (gate rows then up rows), E routed experts.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..config import ACTIVATIONS
from ..glu import split_name
from ..plan import DispatchPlan, build_plan


class Backend:
    """A routed-experts implementation (see the module docstring), configured for one device, dtype and mode.

    Attributes: ``name`` (the ``MoEConfig.backend`` name), ``activations`` (the GLU gate activations it
    implements), ``activation`` (the one this instance computes), ``batch_invariant`` (whether it computes
    batch-invariantly; set by selection).
    """

    name = "base"
    activations = ACTIVATIONS
    not_batch_invariant: Optional[str] = None  # why it can never compute batch-invariantly, when it cannot

    def __init__(self, activation: str = "silu"):
        reason = self.activation_reason(activation)
        if reason is not None:
            raise ValueError(reason)
        self.activation = activation
        self.limit = split_name(activation)[1]  # the GLU's clamp (swiglu_limit), None for none
        self.batch_invariant = False

    @classmethod
    def activation_reason(cls, activation: str) -> Optional[str]:
        """None if this implementation computes the GLU ``activation`` (a GLU name, :mod:`deepseek_moe.glu`), else
        why not."""
        base = split_name(activation)[0]
        if base not in ACTIVATIONS:
            return f"hidden_act={base!r} is invalid; expected one of {ACTIVATIONS}"
        if base in cls.activations:
            return None
        return (f"the {cls.name} backend implements the {'/'.join(cls.activations)} GLU only, not "
                f"hidden_act={base!r}; use backend='torch' or 'auto' (which picks it unless "
                f"DEEPSEEK_MOE_BACKEND names {cls.name!r})")

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this implementation can run on (device, dtype), else a sentence saying why not and what to
        install or change."""
        return None

    def invariance_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this implementation can compute batch-invariantly and deterministically on (device, dtype),
        else why not."""
        return self.not_batch_invariant

    def plan(self, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, num_experts: int,
             capacity: Optional[int] = None, affinity_TK: Optional[torch.Tensor] = None,
             keep_TK: Optional[torch.Tensor] = None) -> DispatchPlan:
        """The planner: :func:`deepseek_moe.plan.build_plan`; an implementation with a faster sort overrides it and
        returns the same plan."""
        return build_plan(topk_idx_TK, weight_TK, num_experts, capacity, affinity_TK, keep_TK)

    def selector(self, cfg) -> Optional[Callable]:
        """A faster form of the router's choice for config ``cfg`` (:class:`~deepseek_moe.MoEConfig`), or None:
        ``select(logits_TE fp32, bias_E) -> (scores_TE, topk_idx_TK, weight_TK)`` as
        :class:`~deepseek_moe.router.Router` computes them from the logits (or None where it cannot, e.g. another
        dtype: the router then computes them itself). Used by the layer without autograd only."""
        return None

    def router_gemm(self) -> Optional[Callable]:
        """The router's gate GEMM in this implementation's form, or None (the router then calls ``F.linear``):
        ``gemm(x_TH, weight_EH) -> logits_TE`` in fp32 as ``F.linear(x.float(), weight)`` computes them up to
        rounding, or None where it cannot (e.g. fp64 tokens); batch-invariant where this implementation was selected
        so (the router then uses it in the deterministic mode too). Used by the layer without autograd only; the
        implementation's :meth:`fused_step` computes the logits the same way."""
        return None

    def fused_step(self, cfg) -> Optional[Callable]:
        """The layer's whole routed step for inference as one call, or None: ``step(x, router_weight_EH, bias_E,
        gate_up_EJH, down_EHI, shared) -> (y, logits_TE, scores_TE, topk_idx_TK, weight_TK, counts_E)`` for x
        (..., H) (its rows the T tokens; y in x's shape) as the router (gate GEMM in fp32, its choice), a dropless
        plan and :meth:`run` (with ``shared`` as there) compute them, or None where it cannot (e.g. a router weight
        not in fp32). The layer calls it only where that pipeline would run unchanged
        (:meth:`~deepseek_moe.DeepSeekMoELayer._inference_step`: no autograd, eval, no padding, local dispatch, the
        router and experts called plainly, no override or forced ids, no autocast)."""
        return None

    def fuses_shared(self, shared: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> bool:
        """Whether :meth:`run` takes ``shared=(gate (Is, H), up (Is, H), down (H, Is))`` of these weights and adds
        the shared experts in its own pass (the layer then leaves them out)."""
        return False

    def run(self, x_TH: torch.Tensor, plan: DispatchPlan, gate_up_EJH: torch.Tensor,
            down_EHI: torch.Tensor) -> torch.Tensor:
        """y_TH (T, H) = Σ_k w[t, k] · down_e · GLU(gate_up_e · x_t) over the kept pairs of ``plan``.

        x_TH (T, H), gate_up_EJH (E, 2I, H), down_EHI (E, H, I), all one dtype; y in x's dtype, differentiable
        w.r.t. x, both weights and ``plan.weight_TK``. An implementation that :meth:`fuses_shared` also takes
        ``shared=(gate (Is, H), up (Is, H), down (H, Is))`` and adds the shared experts' GLU of every row of x."""
        raise NotImplementedError

    def traces(self) -> bool:
        """Whether torch.compile can trace :meth:`run` into one graph (custom ops with fake implementations, no
        data-dependent Python); selection under torch.compile falls back to the form with a backward otherwise."""
        return True

    def spec(self) -> str:
        """This configured implementation as a string for :func:`deepseek_moe.backends.from_spec`."""
        return f"{self.name}:{self.activation}:{int(self.batch_invariant)}"

    def __repr__(self) -> str:
        return f"<deepseek_moe backend {self.name!r}>"
