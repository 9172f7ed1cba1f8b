"""What the fine-tuning and RL features cost on CPU, each against the plain layer in the same run
(docs/finetuning-and-rl.md).

    python benchmarks/finetune_rl_cpu.py                  # T=4096, H=1024, 64x352 + 2 shared, top-6, fp32
    python benchmarks/finetune_rl_cpu.py --tokens 2048 --dtype bfloat16 --rank 8

Contenders, interleaved round by round (median of --repeats), each a forward + backward unless marked:
* plain: the layer, every weight trained.
* lora: PEFT LoRA of rank --rank on the routed experts and the router (target_parameters) and the shared experts
  (target_modules); only the adapters train.
* replay: the plain layer inside replay_routing (ids recorded on the same input).
* deterministic: the plain layer under torch.use_deterministic_algorithms(True) (batch-invariant computation).
* plain fwd / deterministic fwd at T and at --decode-tokens: the layer in eval mode, forwards under inference mode.
* with --ext, ext fwd / ext deterministic fwd at both sizes: the same weights on backend "ext" (its inference ops;
  in the mode its batch-invariant decode op at every token count), against plain fwd (the torch backend).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

import deepseek_moe as dm
from deepseek_moe.bench.timing import interleaved, run_once
from deepseek_moe.invariant import deterministic_algorithms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--expert-hidden-size", type=int, default=352)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--shared", type=int, default=2)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ext", action="store_true", help="also the forwards on backend 'ext' (builds the extension)")
    args = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    cfg = dm.MoEConfig(hidden_size=args.hidden_size, expert_hidden_size=args.expert_hidden_size,
                       num_routed_experts=args.experts, num_shared_experts=args.shared, top_k=args.top_k,
                       backend="torch")

    def layer():
        torch.manual_seed(0)
        return dm.DeepSeekMoELayer(cfg).to(dtype)

    plain, lora, served = layer(), layer(), layer().eval()
    lora = get_peft_model(lora, LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=["gate_proj", "up_proj", "down_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj", "gate.weight"]))
    T, H = args.tokens, cfg.hidden_size
    xs = [torch.randn(T, H, dtype=dtype, requires_grad=True) for _ in range(args.repeats + 1)]
    decode = [torch.randn(args.decode_tokens, H, dtype=dtype) for _ in range(args.repeats + 1)]
    routes = []
    for x in xs:
        with dm.record_routing(plain) as recorded:
            plain(x)
        routes.append(recorded)

    def replayed(r):
        with dm.replay_routing(plain, routes[r]):
            run_once(plain, xs[r], "fwdbwd")

    def det(fn):
        def call(r):
            with deterministic_algorithms():
                fn(r)
        return call

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; T={T} H={H} "
          f"E={cfg.num_routed_experts}x{cfg.expert_hidden_size} +{cfg.num_shared_experts} shared, K={cfg.top_k}; "
          f"LoRA rank {args.rank}; {args.repeats} rounds", flush=True)
    fns = {
        "plain": lambda r: run_once(plain, xs[r], "fwdbwd"),
        "lora": lambda r: run_once(lora, xs[r], "fwdbwd"),
        "replay": replayed,
        "deterministic": det(lambda r: run_once(plain, xs[r], "fwdbwd")),
        "plain fwd": lambda r: run_once(served, xs[r].detach(), "fwd"),
        "deterministic fwd": det(lambda r: run_once(served, xs[r].detach(), "fwd")),
        f"plain fwd T={args.decode_tokens}": lambda r: run_once(served, decode[r], "fwd"),
        f"deterministic fwd T={args.decode_tokens}": det(lambda r: run_once(served, decode[r], "fwd")),
    }
    if args.ext:
        served_ext = dm.DeepSeekMoELayer(dataclasses.replace(cfg, backend="ext")).to(dtype).eval()
        served_ext.load_state_dict(served.state_dict())
        fns.update({
            "ext fwd": lambda r: run_once(served_ext, xs[r].detach(), "fwd"),
            "ext deterministic fwd": det(lambda r: run_once(served_ext, xs[r].detach(), "fwd")),
            f"ext fwd T={args.decode_tokens}": lambda r: run_once(served_ext, decode[r], "fwd"),
            f"ext deterministic fwd T={args.decode_tokens}": det(lambda r: run_once(served_ext, decode[r], "fwd")),
        })
    times = interleaved(fns, args.repeats, torch.device("cpu"),
                        on_sample=lambda name, s: print(f"  {name}: {s:.4f} s", flush=True))
    base = {"plain": "plain", "lora": "plain", "replay": "plain", "deterministic": "plain",
            "plain fwd": "plain fwd", "deterministic fwd": "plain fwd", "ext fwd": "plain fwd",
            "ext deterministic fwd": "plain fwd"}
    print(f"{'contender':28s} {'median s':>9s} {'vs plain':>9s}")
    for name, ts in times.items():
        ref = base.get(name, f"plain fwd T={args.decode_tokens}")
        med = statistics.median(ts)
        print(f"{name:28s} {med:9.4f} {med / statistics.median(times[ref]):8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
