"""Our converted layer against transformers' own DeepseekV3MoE block, each experts implementation (issue 4).

    python benchmarks/hf_block_cpu.py                  # T=2048, H=1024, 64 routed + 2 shared of I=352, top-6, fp32

Forward+backward, interleaved rounds on fresh inputs, medians; ratios to transformers' fastest implementation
and to a dense SwiGLU FFN with the same active FLOPs. batched_mm is skipped (with the reason) when the weight
gather it performs would not fit in memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from deepseek_moe import hf  # noqa: E402
from deepseek_moe.bench.contenders import BlockOnTokens  # noqa: E402
from deepseek_moe.bench.timing import interleaved, run_once  # noqa: E402
from deepseek_moe.experts import SharedExperts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--expert-hidden-size", type=int, default=352)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-gb", type=float, default=16.0, help="skip implementations needing more than this")
    p.add_argument("--impls", default="eager,grouped_mm,batched_mm", help="transformers experts implementations")
    p.add_argument("--backends", default="torch", help="our backends to time, comma list (e.g. torch,ext)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    T, H, I, E, K, Ks = args.tokens, args.hidden_size, args.expert_hidden_size, 64, 6, 2
    cfg = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                           n_shared_experts=Ks, n_group=8, topk_group=4, norm_topk_prob=True,
                           routed_scaling_factor=2.5)
    contenders = {}
    for impl in args.impls.split(","):
        need_gb = T * K * 3 * I * H * 4 / 1e9  # batched_mm gathers one weight set per (token, expert) pair
        if impl == "batched_mm" and need_gb > args.memory_gb:
            print(f"transformers batched_mm: skipped, its weight gather needs ~{need_gb:.0f} GB "
                  f"(> --memory-gb {args.memory_gb:g})")
            continue
        hf_cfg = DeepseekV3Config(**{**cfg.to_dict()})
        hf_cfg._experts_implementation = impl
        block = DeepseekV3MoE(hf_cfg)
        torch.nn.init.normal_(block.gate.weight, std=0.02)
        if contenders:
            block.load_state_dict(next(iter(contenders.values())).block.state_dict())
        contenders[f"transformers {impl}"] = BlockOnTokens(block)
    first = next(iter(contenders.values())).block
    for backend in args.backends.split(","):
        contenders[f"deepseek_moe (from_hf, {backend})"] = hf.from_hf(first, backend=backend)
    contenders["dense SwiGLU"] = SharedExperts.dense(H, (Ks + K) * I)
    xs = [torch.randn(T, H, requires_grad=True) for _ in range(args.repeats + 1)]
    fns = {name: (lambda r, m=m: run_once(m, xs[r], "fwdbwd")) for name, m in contenders.items()}
    times = interleaved(fns, args.repeats, torch.device("cpu"),
                        on_sample=lambda name, seconds: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    hf_best = min(v for k, v in med.items() if k.startswith("transformers"))
    dense = med["dense SwiGLU"]
    print(f"T={T} H={H} E={E}x{I} +{Ks} shared K={K}, fp32 forward+backward, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'contender':32s} {'median s':>9s} {'vs best transformers':>21s} {'vs dense':>9s}")
    for name, v in med.items():
        print(f"{name:32s} {v:9.3f} {v / hf_best:20.2f}x {v / dense:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
