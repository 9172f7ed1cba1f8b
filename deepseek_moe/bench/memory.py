"""How much memory a benchmark run needs, estimated from the configs before any module is built, and how much the
device has: the CLI refuses a run that cannot fit rather than swap for minutes and be killed.

Legend: T tokens per call, H hidden size, E routed experts, K routed experts per token, I expert width, S shared
width (all shared experts together), W dense width, s bytes per element of the run's dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .contenders import Contender

GiB = 2**30
ROUTING_BYTES_PER_SCORE = 4 * 4  # fp32 logits, scores, biased scores, top-k mask: one each per (token, expert)
# What the formulas leave out, kept generous. Calls: the allocator's cached blocks, the math libraries' packing
# buffers and fragmentation across contenders. The whole run of deepseek-v3 vs mixtral-8x7b grew by the exact weights
# plus 1.05x the heaviest call's formula at H=64 (measured), and by more than 1.08x it at H=512 (killed at 22.6 GB
# before its peak); single calls resided at up to 0.94x the formula.
CALL_MARGIN = 1.25
LIBRARIES_BYTES = 256 * 2**20  # loaded during the run: transformers' blocks for the peers, the profiler
USABLE_FRACTION = 0.9          # of the available memory a run may take: the rest of the machine keeps running


@dataclass(frozen=True)
class Estimate:
    """The largest memory one dtype's part of a run holds at once, in bytes, and where it comes from."""

    total_bytes: int      # weights + max(build, margin·(call + inputs)) + libraries
    weights_bytes: int    # every module of the dtype, resident together (peers and backends hold their own copy)
    peer_bytes: int       # the part of weights_bytes that the transformers peers hold
    call_bytes: int       # the heaviest call: its activations (and in fwdbwd their gradients and weight gradients)
    inputs_bytes: int     # the random inputs of the heaviest group, one per repeat and one for the memory probe
    build_bytes: int      # a module built in float32 before its cast to a smaller dtype (CPU only)
    modules: int
    dtype: str
    heaviest: str         # the heaviest call, e.g. "fwdbwd T=4096 deepseek-v3 [torch]"
    largest_T: int

    def fits(self, available: Optional[int]) -> bool:
        """Whether the run fits in ``USABLE_FRACTION`` of ``available`` bytes (None: unknown, assumed to)."""
        return available is None or self.total_bytes <= USABLE_FRACTION * available

    def line(self, available: Optional[int], device: torch.device) -> str:
        """The estimate in one line, against ``available`` bytes (None: unknown)."""
        have = (f"{_gib(available)} available, {USABLE_FRACTION:.0%} of it usable ({_gib(USABLE_FRACTION * available)})"
                if available is not None else "available memory unknown")
        return (f"memory: about {_gib(self.total_bytes)} needed at the peak ({self.dtype}: weights "
                f"{_gib(self.weights_bytes)} in {self.modules} modules, heaviest call {_gib(self.call_bytes)}: "
                f"{self.heaviest}); {have} on {device}")

    def advice(self) -> str:
        """What to reduce, the largest part first."""
        parts = [(self.call_bytes + self.inputs_bytes, f"smaller --tokens (largest T={self.largest_T}) or --mode fwd"),
                 (self.weights_bytes - self.peer_bytes, "a smaller --hidden-size"),
                 (self.peer_bytes, f"--peers none (the transformers peers hold {_gib(self.peer_bytes)} of weight "
                                   "copies)")]
        if self.heaviest.endswith("[batched_mm]"):  # a weight matrix gathered per (token, expert) pair
            parts.append((self.call_bytes, "--hf-impls without batched_mm (it gathers a weight matrix per token "
                                           "and expert)"))
        if self.heaviest.endswith("[eager]"):  # eager doubles the weight gradients (see call_bytes)
            peer = self.heaviest.split()[2].startswith("hf-")
            flag = "--hf-impls grouped_mm" if peer else "a --backend other than eager"
            parts.append((self.call_bytes, f"{flag} (eager holds the weight gradients twice)"))
        return "to fit, try " + "; ".join(text for size, text in sorted(parts, key=lambda p: -p[0]) if size > 0)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def call_bytes(c: Contender, mode: str, T: int, hidden_size: int, itemsize: int) -> int:
    """Bytes one call of contender ``c`` on T tokens holds at its peak, an upper bound.

    Activations count a = max(s, 4) bytes per element: the low-precision paths keep float32 intermediates.

    * MoE (ours and the peers): per routed (token, expert) row the gathered row, the expert's output row and its
      float32 copy, the gate/up projection, float32 copies of gate and up, the activation and its cast:
      (3H + 5I)·a; rows are the T·K pairs plus, for 16-bit dtypes, up to 31 padding rows per expert reached (the
      torch backend pads expert segments to 32 rows on CPU, and its segment loop runs blocks of experts); per
      token the shared experts' (3S + 3H)·a (their projections, input and output, the float32 accumulator of the
      output) and the routing's float32 scores 16·E. transformers' ``batched_mm`` also gathers a weight matrix per
      pair: 3·I·H·s more per pair.
    * dense: T·(H + 4W)·a for the input, gate, up, activation and product.
    * fwd holds at most these; fwdbwd keeps them for backward, adds a gradient of each (×2) and the weight gradients,
      state_numel·s. The ``eager`` experts (our reference backend and transformers' eager) index the stacked expert
      weights once per expert: each index's backward makes a zero gradient of the whole stack before it is summed
      into the accumulated one, so they hold twice that (measured: 2.1x the weights at T=512).

    Measured with the CLI's own tensor peak (``timing.peak_memory``) for every contender kind and backend, float32
    and bfloat16, and with the process's resident memory, the peak stays below this bound.
    """
    s, H = itemsize, hidden_size
    a = max(s, 4)
    if c.config is None:  # the dense FFN
        saved = T * (H + 4 * c.dense_width) * a
    else:
        cfg = c.config
        rows = T * cfg.top_k + (31 * min(cfg.num_routed_experts, T * cfg.top_k) if s < 4 else 0)
        saved = (rows * (3 * H + 5 * cfg.expert_hidden_size) * a
                 + T * ((3 * cfg.shared_width + 3 * H) * a + ROUTING_BYTES_PER_SCORE * cfg.num_routed_experts))
        if c.implementation == "batched_mm":
            saved += T * cfg.top_k * 3 * cfg.expert_hidden_size * H * s
    if mode != "fwdbwd":
        return saved
    weight_grads = c.state_numel * s * (2 if c.implementation == "eager" else 1)
    return 2 * saved + weight_grads


def estimate(groups: Sequence[Tuple[str, torch.dtype, List[Contender]]], modes: Sequence[str],
             tokens: Sequence[int], decode_tokens: Sequence[int], hidden_size: int, repeats: int,
             device: torch.device) -> Estimate:
    """The estimate of a run over ``groups`` [(dtype name, dtype, contenders)], each contender built once per dtype
    and every module of a dtype kept until its last call (the CLI frees them before the next dtype's).

    Per dtype: weights = Σ state_numel·s over the contenders (exact: what the modules hold); the heaviest call
    (:func:`call_bytes`) over the contenders, modes and T; inputs = (repeats + 1)·T·H·s; on CPU a module is built in
    float32 and then cast, so a smaller dtype briefly holds the largest module's float32 copy too
    (build = state_numel·4). The peak is

        weights + max(build, CALL_MARGIN·(heaviest call + inputs)) + LIBRARIES_BYTES

    and the run's estimate the largest over the dtypes. The CLI runs it when it fits in ``USABLE_FRACTION`` of the
    available memory.
    """
    worst = None
    for dtype_name, dtype, contenders in groups:
        s = torch.empty((), dtype=dtype).element_size()
        weights = sum(c.state_numel for c in contenders) * s
        peers = sum(c.state_numel for c in contenders if c.kind == "peer") * s
        calls = [(call_bytes(c, mode, T, hidden_size, s), T, f"{mode} T={T} {c.name} [{c.implementation}]")
                 for c in contenders for mode in modes for T in (decode_tokens if mode == "decode" else tokens)]
        heaviest, T, what = max(calls)
        inputs = (repeats + 1) * T * hidden_size * s
        largest_T = max(tokens if any(m != "decode" for m in modes) else decode_tokens)
        build = max(c.state_numel for c in contenders) * 4 if device.type == "cpu" and s < 4 else 0
        total = weights + max(build, int(CALL_MARGIN * (heaviest + inputs))) + LIBRARIES_BYTES
        candidate = Estimate(total_bytes=total, weights_bytes=weights, peer_bytes=peers, call_bytes=heaviest,
                             inputs_bytes=inputs, build_bytes=build, modules=len(contenders), dtype=dtype_name,
                             heaviest=what, largest_T=largest_T)
        if worst is None or candidate.total_bytes > worst.total_bytes:
            worst = candidate
    return worst


def available_bytes(device: torch.device, meminfo: str = "/proc/meminfo") -> Optional[int]:
    """Memory a run can take on ``device`` now: CUDA's free memory, or on CPU the kernel's MemAvailable (free
    memory plus what it can reclaim), falling back to the free physical pages; None if neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
