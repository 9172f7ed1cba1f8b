"""Compile every kernel for a CUDA architecture without a GPU (Triton + its bundled ptxas).

    python -m deepseek_moe.kernels.compile_check --capability 80,90 --dtype bfloat16,float16,float32
    python -m deepseek_moe.kernels.compile_check --capability 90 --dtype bfloat16 --candidates

Uses the tiles :func:`~deepseek_moe.kernels.heuristics.gpu_tile_config` picks for that architecture (with
``--candidates``: every tile the autotune sweep of :mod:`.tuning` tries, each kernel once) and prints each
kernel's shared-memory use; a kernel needing more than an SM offers (:data:`SHARED_LIMIT`) fails. It catches GPU-only compile errors (the interpreter runs kernels as
Python and never lowers them) on machines without a GPU, such as CI. Run it with ``TRITON_INTERPRET`` unset:
Triton fixes interpreted-or-compiled when it is first imported.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .heuristics import gpu_tile_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_ELEMENT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Pointer arguments that are not of the activation dtype, by name; every other *_ptr is.
_POINTER_TYPES = {"token_ptr": "*i64", "scatter_ptr": "*i64", "a_index_ptr": "*i64", "b_index_ptr": "*i64",
                  "tile_start_ptr": "*i64", "offsets_ptr": "*i64", "tile_expert_ptr": "*i32",
                  "weight_ptr": "*fp32", "grad_w_part_ptr": "*fp32"}
# Scalar arguments that are not int32, by name.
_SCALAR_TYPES = {"limit": "fp32"}
# Shared memory one block may use, bytes (opt-in maximum): sm_80 163 KB, sm_90 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def compile_all(capability: int, dtype: torch.dtype, candidates: bool = False) -> List[Dict]:
    """Compile each kernel (and each constexpr variant the launchers use) for sm_<capability> with the heuristic's
    tiles, or with ``candidates`` each kernel's first variant with every tile the sweep tries for the kinds it
    serves; returns one dict per compiled kernel: name, kind, tiles, shared memory bytes. Raises on a compile
    error or a kernel needing more shared memory than :data:`SHARED_LIMIT`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import grouped_mlp as k

    if getattr(k._gate_up_swiglu_kernel, "cache_key", None) is None:
        raise RuntimeError("compile_check: the kernels were decorated for Triton's interpreter; "
                           "run with TRITON_INTERPRET unset")
    elem = _ELEMENT[dtype]
    launches = [(k._gate_up_swiglu_kernel, "gate_up", {"CLAMP": c}) for c in (False, True)]
    launches += [(k._grouped_gemm_scatter_kernel, "down", {})]
    launches += [(k._down_swiglu_bwd_kernel, "down_bwd", {"CLAMP": c}) for c in (False, True)]
    launches += [(k._expert_weight_grad_kernel, "wgrad", {"GATHER_A": a, "GATHER_B": not a}) for a in (True, False)]
    if candidates:
        from .tuning import candidates as tried

        first = {kind: (kernel, flags) for kernel, kind, flags in reversed(launches)}
        first["dgrad"] = first["down"]  # the scatter GEMM serves both
        seen, launches = set(), []
        for kind, (kernel, flags) in first.items():
            for cfg in tried(kind, dtype, capability // 10, False):
                if (kernel, cfg) not in seen:
                    seen.add((kernel, cfg))
                    launches.append((kernel, kind, {**flags, "tiles": cfg}))
    results = []
    for kernel, kind, flags in launches:
        flags = dict(flags)
        cfg = flags.pop("tiles", None) or gpu_tile_config(kind, dtype, capability // 10)
        constexprs = {"BM": cfg.block_m, "BC": cfg.block_c, "BR": cfg.block_r, "DOT_FP32": False,
                      "RNE": False, "PRECISION": "ieee", **flags}
        signature = {name: "constexpr" if name in constexprs else
                     (_POINTER_TYPES.get(name, f"*{elem}") if name.endswith("_ptr") else _SCALAR_TYPES.get(name, "i32"))
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{kernel.fn.__name__}: no binary for sm_{capability}")
        limit = SHARED_LIMIT.get(capability)
        if limit is not None and compiled.metadata.shared > limit:
            raise RuntimeError(f"{kernel.fn.__name__} with {cfg}: {compiled.metadata.shared} B of shared memory, more "
                               f"than sm_{capability} offers ({limit} B)")
        results.append({"kernel": kernel.fn.__name__, "kind": kind, **flags, "tiles": cfg,
                        "shared_bytes": compiled.metadata.shared})
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capability", default="80,90", help="comma list of compute capabilities (80 = sm_80)")
    p.add_argument("--dtype", default="bfloat16,float16,float32", help=f"comma list of {tuple(DTYPES)}")
    p.add_argument("--candidates", action="store_true", help="every tile the autotune sweep tries")
    args = p.parse_args(argv)
    for cap in (int(c) for c in args.capability.split(",")):
        for name in args.dtype.split(","):
            for r in compile_all(cap, DTYPES[name], args.candidates):
                t = r["tiles"]
                flags = ",".join(f"{k}={int(v)}" for k, v in r.items() if k.isupper())
                print(f"sm_{cap} {name:8s} {r['kernel']:30s} {flags:21s} {t.block_m}x{t.block_c}x{t.block_r} "
                      f"warps={t.num_warps} stages={t.num_stages} shared={r['shared_bytes']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
