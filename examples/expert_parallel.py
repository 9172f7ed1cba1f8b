"""Expert parallelism on CPU: a DeepSeekMoE layer's 16 routed experts sharded over 2 or 4 ranks (gloo).

    torchrun --nproc-per-node 2 examples/expert_parallel.py          # under torchrun
    python examples/expert_parallel.py --world 4                      # or spawn the ranks itself
    python examples/expert_parallel.py --world 4 --max-devices 1      # device-limited routing: M = 1

Every rank builds the same layer (same seed), keeps its share of the experts with ``shard_experts``, trains a
few steps on its own tokens (gradients of the replicated router and shared experts averaged like DDP would),
and rank 0 prints the loss, the rows each token sent and the expert load gathered over ranks.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deepseek_moe as dm
from deepseek_moe.parallel import shard_experts


def train(rank: int, world: int, args) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = dm.MoEConfig(hidden_size=64, expert_hidden_size=32, num_routed_experts=16, num_shared_experts=1,
                       top_k=4, score_func="sigmoid", norm_topk_prob=True, bias_update_speed=0.001,
                       num_devices=world, max_devices_per_token=args.max_devices)
    layer = shard_experts(dm.DeepSeekMoELayer(cfg))
    target = torch.nn.Linear(64, 64)  # a fixed random map for the layer to learn
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, 64, generator=gen)
        with torch.no_grad():
            y_true = torch.tanh(target(x))
        loss = (layer(x) - y_true).square().mean()
        opt.zero_grad()
        loss.backward()
        for name, p in layer.named_parameters():
            if not name.startswith("experts."):  # replicated: average over ranks (what DDP would do)
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        layer.update_bias()  # loads summed over ranks inside
        stats = torch.tensor([loss.item(), layer.expert_parallel.last_exchange["rows_sent"]])
        dist.all_reduce(stats)
        load = layer.tokens_per_expert.clone()
        dist.all_reduce(load)
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == 1):
            print(f"step {step:4d}  loss {stats[0].item() / world:.4f}  rows sent per token "
                  f"{stats[1].item() / (world * args.tokens):.2f} (top_k {cfg.top_k}, M {args.max_devices})  "
                  f"load {load.tolist()}", flush=True)
    dist.barrier()  # let every rank finish its last exchange before the group goes away
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(rank, world, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun")
    p.add_argument("--max-devices", type=int, default=None, help="M: ranks a token's experts may span")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    args = p.parse_args()
    torch.set_num_threads(1)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        train(dist.get_rank(), dist.get_world_size(), args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
