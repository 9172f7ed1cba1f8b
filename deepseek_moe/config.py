"""MoEConfig: the validated description of one DeepSeekMoE layer, presets by name (:mod:`.presets`), size
accounting.

Legend: H hidden size, I expert hidden size, E routed experts, Ks shared experts, K routed experts per token.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from .presets import PRESETS

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
GROUP_SCORES = ("max", "top2_sum")
BACKENDS = ("auto", "eager", "torch", "triton", "ext", "megablocks")
BALANCE_SCOPES = ("micro_batch", "sequence", "global_batch")
# Gate activations of the GLU experts, by transformers' ACT2FN names: silu (SwiGLU, every DeepSeek/Mixtral/Qwen
# model), gelu (exact erf form; GeGLU), gelu_pytorch_tanh (tanh approximation; MegaBlocks' default) and relu.
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")


class ConfigError(ValueError):
    """A MoEConfig field holds a value outside its allowed range."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"MoEConfig.{field}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class MoEConfig:
    """Hyper-parameters of a DeepSeekMoE layer (frozen and validated on construction).

    Routed experts are GLU MLPs ``down(act(gate(x)) * up(x))`` of width ``expert_hidden_size`` (act =
    ``hidden_act``, SiLU by default: SwiGLU); the ``num_shared_experts`` shared experts are fused into one
    always-on GLU MLP of width ``num_shared_experts * expert_hidden_size``.
    Every field is described in docs/routing-and-losses.md; invalid values raise ``ConfigError`` (a
    ``ValueError``) naming the field, the value and the allowed range.

    Example::

        cfg = MoEConfig(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64,
                        num_shared_experts=2, top_k=6)
        cfg = MoEConfig.preset("deepseek-v3", hidden_size=512)
    """

    hidden_size: int
    expert_hidden_size: int
    num_routed_experts: int = 64
    num_shared_experts: int = 2
    top_k: int = 6
    score_func: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = False
    balance_scope: Optional[str] = None
    device_loss_alpha: float = 0.0
    num_devices: int = 1
    comm_loss_alpha: float = 0.0
    max_devices_per_token: Optional[int] = None
    seq_balance_alpha: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_speed: float = 0.0
    capacity_factor: Optional[float] = None
    device_capacity_factor: Optional[float] = None
    shared_expert_gate: bool = False
    shared_expert_hidden_size: Optional[int] = None
    backend: str = "auto"
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    router_jitter_noise: float = 0.0
    hash_vocab_size: Optional[int] = None
    swiglu_limit: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "expert_hidden_size", "num_routed_experts", "top_k", "num_groups",
                     "topk_groups", "num_devices"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                _fail(name, v, "expected an integer >= 1")
        v = self.num_shared_experts
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail("num_shared_experts", v, "expected an integer >= 0")
        E = self.num_routed_experts
        if self.top_k > E:
            _fail("top_k", self.top_k, f"expected 1 <= top_k <= num_routed_experts={E}")
        if self.score_func not in SCORE_FUNCS:
            _fail("score_func", self.score_func, f"expected one of {SCORE_FUNCS}")
        if self.group_score not in GROUP_SCORES:
            _fail("group_score", self.group_score, f"expected one of {GROUP_SCORES}")
        if self.hidden_act not in ACTIVATIONS:
            _fail("hidden_act", self.hidden_act, f"expected one of {ACTIVATIONS}")
        v = self.swiglu_limit
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            _fail("swiglu_limit", v, "expected None (no clamp) or a finite number > 0")
        v = self.hash_vocab_size
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            _fail("hash_vocab_size", v, "expected None (top-k routing) or the vocabulary size, an integer >= 1")
        if v is not None and (self.num_groups > 1 or self.max_devices_per_token is not None):
            _fail("hash_vocab_size", v, "hash routing picks experts from its table: it takes no group or device limit "
                  "(num_groups=1, max_devices_per_token=None)")
        v = self.router_jitter_noise
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v < 1:
            _fail("router_jitter_noise", v, "expected a number in [0, 1)")
        if self.backend not in BACKENDS:
            _fail("backend", self.backend, f"expected one of {BACKENDS}")
        if E % self.num_groups:
            _fail("num_groups", self.num_groups, f"expected a divisor of num_routed_experts={E}")
        if self.topk_groups > self.num_groups:
            _fail("topk_groups", self.topk_groups, f"expected 1 <= topk_groups <= num_groups={self.num_groups}")
        per_group = E // self.num_groups
        if self.top_k > self.topk_groups * per_group:
            _fail("top_k", self.top_k, f"expected top_k <= topk_groups * experts per group = "
                  f"{self.topk_groups * per_group}, else a token cannot get top_k distinct experts")
        if self.num_groups > 1 and self.group_score == "top2_sum" and per_group < 2:
            _fail("group_score", self.group_score, "'top2_sum' needs at least 2 experts per group")
        if E % self.num_devices:
            _fail("num_devices", self.num_devices, f"expected a divisor of num_routed_experts={E}")
        m = self.max_devices_per_token
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= self.num_devices):
            _fail("max_devices_per_token", m, f"expected None or an integer in [1, num_devices={self.num_devices}]")
        if m is not None and self.top_k > m * (E // self.num_devices):
            _fail("max_devices_per_token", m, f"expected max_devices_per_token * experts per device >= "
                  f"top_k={self.top_k}, else a token cannot get top_k distinct experts")
        G, D = self.num_groups, self.num_devices
        if G > 1 and m is not None and m < D:
            # Both limits: a token keeps the experts in its kept groups on its kept devices. When groups and devices
            # nest that is at least min(topk_groups·E/G, M·E/D) experts (groups inside devices) or, with devices
            # inside groups, topk_groups·E/D once the M devices may fall into more than topk_groups groups.
            if G % D and D % G:
                _fail("num_groups", G, f"with max_devices_per_token < num_devices, groups and devices must nest: "
                      f"num_groups a multiple or a divisor of num_devices={D}")
            if G < D and min(m, G) > self.topk_groups and self.top_k > self.topk_groups * (E // D):
                _fail("top_k", self.top_k, f"expected top_k <= topk_groups * experts per device = "
                      f"{self.topk_groups * (E // D)} with devices inside groups and max_devices_per_token={m}: "
                      f"the kept groups may hold one kept device each, else a token cannot get top_k experts")
        for name in ("aux_loss_alpha", "device_loss_alpha", "comm_loss_alpha", "seq_balance_alpha",
                     "z_loss_coef", "bias_update_speed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                _fail(name, v, "expected a finite number >= 0")
        v = self.routed_scaling_factor
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            _fail("routed_scaling_factor", v, "expected a finite number > 0")
        v = self.initializer_range
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            _fail("initializer_range", v, "expected a finite number > 0")
        w = self.shared_expert_hidden_size
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            _fail("shared_expert_hidden_size", w, "expected None (num_shared_experts * expert_hidden_size) or an "
                  "integer >= 1")
        for name in ("capacity_factor", "device_capacity_factor"):
            c = getattr(self, name)
            if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                                  or c <= 0):
                _fail(name, c, "expected None (dropless) or a finite number > 0")
        scope = self.balance_scope
        if scope is not None and scope not in BALANCE_SCOPES:
            _fail("balance_scope", scope, f"expected None or one of {BALANCE_SCOPES}")
        if self.seq_aux is True and scope not in (None, "sequence"):
            _fail("balance_scope", scope, "conflicts with seq_aux=True (which means balance_scope='sequence'); "
                  "set seq_aux=False")
        for name in ("norm_topk_prob", "seq_aux", "shared_expert_gate"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "expected True or False")

    @property
    def resolved_balance_scope(self) -> str:
        """Where the expert-level balance loss counts its load fraction f: ``balance_scope``, or ``"sequence"``
        when ``seq_aux`` is set, else ``"micro_batch"``."""
        if self.balance_scope is not None:
            return self.balance_scope
        return "sequence" if self.seq_aux else "micro_batch"

    @property
    def has_aux_loss(self) -> bool:
        """Whether any balance loss or the z-loss is on (the layer's aux_loss can be non-zero)."""
        multi_device = self.num_devices > 1
        return (self.aux_loss_alpha > 0 or self.seq_balance_alpha > 0 or self.z_loss_coef > 0
                or (multi_device and (self.device_loss_alpha > 0 or self.comm_loss_alpha > 0)))

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MoEConfig":
        """Build a named preset (see ``PRESETS``), with any field overridden by keyword.

        The benchmark pair ``mixtral-8x2`` / ``deepseek-64x`` also takes ``ffn_size`` (F, the Mixtral expert
        width): ``deepseek-64x`` then gets 64 routed + 2 shared experts of width F/8 and top-14, matching the
        8x2 layer's active FLOPs (see :func:`matched_pair`).
        """
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        ffn_size = overrides.pop("ffn_size", None)
        if ffn_size is not None:
            if name not in ("mixtral-8x2", "deepseek-64x"):
                raise ConfigError(f"ffn_size applies to the presets 'mixtral-8x2' and 'deepseek-64x', not {name!r}")
            fields["expert_hidden_size"] = ffn_size if name == "mixtral-8x2" else _fine_width(ffn_size)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown MoEConfig field(s) {unknown} in preset overrides")
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes: Any) -> "MoEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    model_type = "deepseek_moe"  # not a field: what model-config readers (PEFT's get_peft_model) look up

    def to_dict(self) -> Dict[str, Any]:
        """The fields, plus ``model_type``: the dict form model-config readers expect of a module's ``config``
        (PEFT reads it; without ``model_type`` a LoraConfig with only ``target_parameters`` raised KeyError).
        ``MoEConfig(**{k: v for k, v in d.items() if k != "model_type"})`` rebuilds the config."""
        return {**dataclasses.asdict(self), "model_type": self.model_type}

    # --------------------------------------------------------- size accounting
    @property
    def routed_params(self) -> int:
        return self.num_routed_experts * 3 * self.expert_hidden_size * self.hidden_size

    @property
    def shared_width(self) -> int:
        """Width of the fused shared-expert MLP: ``shared_expert_hidden_size`` or Ks·I (0 without shared experts)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden_size or self.num_shared_experts * self.expert_hidden_size

    @property
    def shared_params(self) -> int:
        return (3 * self.shared_width * self.hidden_size
                + (self.hidden_size if self.shared_expert_gate and self.num_shared_experts else 0))

    @property
    def router_params(self) -> int:
        return self.num_routed_experts * self.hidden_size

    @property
    def total_params(self) -> int:
        """Trainable parameters of the layer (router + routed experts + shared experts [+ shared gate])."""
        return self.router_params + self.routed_params + self.shared_params

    @property
    def active_params(self) -> int:
        """Parameters touched by one token: router, shared experts and ``top_k`` routed experts."""
        per_expert = 3 * self.expert_hidden_size * self.hidden_size
        return self.router_params + self.shared_params + self.top_k * per_expert

    @property
    def flops_per_token(self) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add; element-wise work not counted)."""
        return 2 * self.active_params

    @property
    def dense_equivalent_width(self) -> int:
        """Width F of the dense SwiGLU FFN with the same expert FLOPs per token: shared width + K·I."""
        return self.shared_width + self.top_k * self.expert_hidden_size


def _fine_width(ffn_size: int) -> int:
    if ffn_size % 8:
        raise ConfigError(f"ffn_size={ffn_size} must be divisible by 8 to split each expert into 8 fine-grained ones")
    return ffn_size // 8


def matched_pair(hidden_size: int, ffn_size: int) -> "tuple[MoEConfig, MoEConfig]":
    """The benchmark's fair pair at equal active FLOPs: (Mixtral-style 8x2, DeepSeekMoE 64 + 2 shared, top-14).

    Mixtral-style: 8 experts of width F, top-2, no shared experts. DeepSeekMoE: 64 routed experts of width F/8
    (each Mixtral expert split 8 ways) plus 2 shared experts of width F/8, top-14: 2 + 14 = 16 fine experts
    = 2 Mixtral experts per token. Total parameters differ only by the 2 shared experts and the router.
    """
    a = MoEConfig.preset("mixtral-8x2", hidden_size=hidden_size, ffn_size=ffn_size)
    b = MoEConfig.preset("deepseek-64x", hidden_size=hidden_size, ffn_size=ffn_size)
    return a, b
