"""One script for a CUDA machine (issue 5): check the triton backend against the torch backend, then time them.

    python benchmarks/gpu/run_all.py                      # bf16, DeepSeekMoE-16B layer, T = 4096, 16384, 65536
    python benchmarks/gpu/run_all.py --smoke              # tiny sizes; also runs on CPU with TRITON_INTERPRET=1

Shape: H = 2048, 64 routed experts of I = 1408 + 2 shared, top-6. Contenders, forward and forward+backward:
our layer with ``backend="triton"``, with ``backend="torch"`` (``torch._grouped_mm``; the segment loop where
that is unavailable), a dense SwiGLU FFN with the same active FLOPs (the practical ceiling), and megablocks'
dMoE when it imports. Prints ms, TFLOP/s and the ratio to dense; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

import deepseek_moe as dm
from deepseek_moe.bench.timing import interleaved, run_once
from deepseek_moe.experts import SharedExperts
from deepseek_moe.testing import assert_close

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _megablocks(cfg: dm.MoEConfig, dtype: torch.dtype, device: torch.device):
    """megablocks' dMoE at the same shape, or (None, reason)."""
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except Exception as err:  # an ImportError, or its compiled ops failing to load
        return None, f"megablocks does not import ({type(err).__name__}: {err})"
    args = Arguments(hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.expert_hidden_size,
                     moe_num_experts=cfg.num_routed_experts, moe_top_k=cfg.top_k, mlp_type="glu",
                     mlp_impl="grouped", bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                     device=device)
    layer = dMoE(args)

    class _Tokens(torch.nn.Module):  # dMoE wants (S, B, H) and returns (y, bias)
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x.unsqueeze(1))[0].squeeze(1)

    return _Tokens(), None


def _check(cfg: dm.MoEConfig, dtype: torch.dtype, device: torch.device, tokens: int) -> float:
    """Triton vs torch backend on one batch: output and every gradient. Returns the worst relative RMS."""
    from deepseek_moe.testing import rel_rms

    fast = dm.DeepSeekMoELayer(cfg.replace(backend="triton")).to(device, dtype)
    ref = dm.DeepSeekMoELayer(cfg.replace(backend="torch")).to(device, dtype)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(tokens, cfg.hidden_size, device=device, dtype=dtype)
    results = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.float().square().mean().backward()
        results.append([y, xi.grad] + [p.grad for p in layer.parameters()])
    worst = 0.0
    for i, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, TOL[dtype], f"check tensor {i}")
        worst = max(worst, rel_rms(a, b))
    return worst


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16384,65536")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and T (CPU interpreter or a quick GPU check)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_<device>.json; "
                                               "--smoke writes none unless given)")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("run_all.py: no CUDA device; use --smoke (with TRITON_INTERPRET=1) for a CPU check", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if args.smoke:
        cfg = dm.MoEConfig(hidden_size=64, expert_hidden_size=32, num_routed_experts=8, num_shared_experts=2,
                           top_k=3)
        tokens = [int(t) for t in "16,48".split(",")]
        args.repeats, args.warmup = 2, 1
    else:
        cfg = dm.MoEConfig(hidden_size=2048, expert_hidden_size=1408, num_routed_experts=64, num_shared_experts=2,
                           top_k=6)
        tokens = [int(t) for t in args.tokens.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; torch {torch.__version__}; dtype {args.dtype}; H={cfg.hidden_size} "
          f"E={cfg.num_routed_experts}x{cfg.expert_hidden_size} +{cfg.num_shared_experts} shared K={cfg.top_k}")

    worst = _check(cfg, dtype, device, min(tokens[0], 2048))
    print(f"correctness: triton vs torch backend, output and all gradients, worst relative RMS {worst:.2e} (ok)")

    width = cfg.dense_equivalent_width
    contenders: Dict[str, torch.nn.Module] = {
        "triton": dm.DeepSeekMoELayer(cfg.replace(backend="triton")),
        "torch": dm.DeepSeekMoELayer(cfg.replace(backend="torch")),
        f"dense-{width}": SharedExperts.dense(cfg.hidden_size, width),
    }
    mb, reason = _megablocks(cfg, dtype, device)
    if mb is not None:
        contenders["megablocks dMoE"] = mb
    else:
        print(f"megablocks: not run: {reason}")
    for m in contenders.values():
        m.to(device, dtype)

    rows = []
    for T in tokens:
        x = torch.randn(T, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
        for mode in ("fwd", "fwdbwd"):
            flops = cfg.flops_per_token * T * (3 if mode == "fwdbwd" else 1)
            fns = {cname: (lambda r, m=m: run_once(m, x, mode)) for cname, m in contenders.items()}
            times = {k: statistics.median(v) for k, v in interleaved(fns, args.repeats, device, args.warmup).items()}
            dense = times[f"dense-{width}"]
            for cname, sec in times.items():
                rows.append({"tokens": T, "mode": mode, "contender": cname, "ms": sec * 1e3,
                             "tflops": flops / sec / 1e12, "x_dense": sec / dense,
                             "x_torch": sec / times["torch"]})

    print(f"{'T':>6s} {'mode':7s} {'contender':16s} {'ms':>9s} {'TFLOP/s':>8s} {'× dense':>8s} {'× torch':>8s}")
    for r in rows:
        print(f"{r['tokens']:6d} {r['mode']:7s} {r['contender']:16s} {r['ms']:9.2f} {r['tflops']:8.1f} "
              f"{r['x_dense']:8.2f} {r['x_torch']:8.2f}")
    out = args.out or (None if args.smoke else os.path.join("benchmarks", "results", "gpu_cuda.json"))
    if out is None:
        return 0
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "dtype": args.dtype, "config": cfg.__dict__,
                   "date": time.strftime("%Y-%m-%d"), "correctness_worst_rel_rms": worst, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
