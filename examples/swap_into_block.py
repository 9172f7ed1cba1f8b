"""Put a DeepSeekMoELayer where a transformer block's MLP was, and train the model for a few steps on CPU.

    python examples/swap_into_block.py [--steps 30] [--backend torch]

The task is a synthetic language where each token determines the next ((3·t + 1) mod V), so the loss visibly
falls within a few steps.
Every few steps it prints the task loss, the balance loss and the expert load (MaxVio, tokens per expert).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import deepseek_moe as dm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository root
from benchmarks.quality.lm import TinyLM  # noqa: E402


def batch(vocab: int, size: int, seq: int, generator: torch.Generator):
    """Random token sequences and their targets (3·t + 1) mod V."""
    ids = torch.randint(0, vocab, (size, seq), generator=generator)
    return ids, (3 * ids + 1) % vocab


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", default="auto")
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()

    torch.manual_seed(0)
    vocab, seq, bsz = 64, 32, 16
    # bias_update_speed is in units of the scores, and softmax scores over 64 experts average 1/64.
    cfg = dm.MoEConfig(hidden_size=args.hidden, expert_hidden_size=args.hidden // 2, num_routed_experts=64,
                       num_shared_experts=2, top_k=6, aux_loss_alpha=0.01, seq_aux=True, z_loss_coef=1e-4,
                       bias_update_speed=1e-4, backend=args.backend)
    model = TinyLM(vocab, args.hidden, layers=2, seq=seq, make_mlp=lambda: dm.DeepSeekMoELayer(cfg))
    moe_layers = [m for m in model.modules() if isinstance(m, dm.DeepSeekMoELayer)]
    print(f"TinyLM with {len(moe_layers)} DeepSeekMoE blocks: {cfg.num_routed_experts} routed x "
          f"{cfg.expert_hidden_size} + {cfg.num_shared_experts} shared, top-{cfg.top_k}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
          f"({cfg.active_params / cfg.total_params:.0%} of each MoE layer active per token)")
    print(f"MaxVio = max expert load / mean expert load - 1 over a batch (0 is an even load, "
          f"{cfg.num_routed_experts / cfg.top_k - 1:.2f} every token on the same {cfg.top_k} experts)")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, target = batch(vocab, bsz, seq, gen)
        logits = model(ids)
        task = F.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        balance = dm.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        (task + balance).backward()
        opt.step()
        for layer in moe_layers:
            layer.update_bias()
        if step == 1 or step % 5 == 0 or step == args.steps:
            stats = moe_layers[0].last_stats
            load = moe_layers[0].tokens_per_expert
            print(f"step {step:3d}  loss {task.item():.3f}  aux {balance.item():.4f}  "
                  f"block0 MaxVio {stats['max_vio']:.2f}  tokens/expert min {int(load.min())} "
                  f"max {int(load.max())}  ({time.perf_counter() - start:.1f}s)", flush=True)
    print(f"done: {args.steps} steps; the task loss fell from ln({vocab}) = 4.16 at random toward 0.")


if __name__ == "__main__":
    main()
