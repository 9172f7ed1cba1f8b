"""Expert parallelism x FSDP2 on a 2-D device mesh (torchtitan style), on CPU with gloo: 4 ranks = 2 data-parallel
x 2 expert-parallel.

    torchrun --nproc-per-node 4 examples/expert_parallel_fsdp2.py     # under torchrun
    python examples/expert_parallel_fsdp2.py                            # or spawn the 4 ranks itself
    python examples/expert_parallel_fsdp2.py --dp 1 --ep 2              # any dp x ep

Each rank keeps E/ep routed experts (``shard_experts`` over the mesh's "ep" dimension). ``fully_shard_moe`` makes
three FSDP2 units: the router (fp32 parameters even under bf16 mixed precision), the routed experts sharded over
the "dp" dimension (the ranks holding the same experts) and the shared experts over all ranks. Every rank trains
on its own tokens with the global-batch balance loss and aux-loss-free bias updates; every parameter's gradient
is the mean over the ranks (docs/training.md). Rank 0 prints the loss and the expert load summed over ranks.
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy

import deepseek_moe as dm


def train(args) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.dp * args.ep:
        raise SystemExit(f"--dp {args.dp} x --ep {args.ep} must equal the {world} ranks")
    mesh = init_device_mesh("cpu", (args.dp, args.ep), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = dm.MoEConfig(hidden_size=64, expert_hidden_size=32, num_routed_experts=16, num_shared_experts=1, top_k=4,
                       score_func="sigmoid", norm_topk_prob=True, aux_loss_alpha=0.01, balance_scope="global_batch",
                       bias_update_speed=0.001, num_devices=args.ep)
    layer = dm.parallel.shard_experts(dm.DeepSeekMoELayer(cfg), mesh["ep"].get_group())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.bf16 else None
    dm.parallel.fully_shard_moe(layer, init_device_mesh("cpu", (world,)), expert_mesh=mesh["dp"], mp_policy=policy)
    opt = torch.optim.AdamW(layer.parameters(), lr=3e-3)  # after sharding: the optimizer holds the shards
    target = torch.nn.Linear(64, 64)  # a fixed random map for the layer to learn
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        x = torch.randn(args.tokens, 64, generator=gen)
        with torch.no_grad():
            y_true = torch.tanh(target(x))
        loss = (layer(x).float() - y_true).square().mean()
        (loss + layer.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        layer.update_bias()  # loads summed over all ranks; closes the global-batch window
        stats = torch.tensor([loss.item()])
        dist.all_reduce(stats)
        load = layer.tokens_per_expert.clone()
        dist.all_reduce(load)
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == 1):
            print(f"step {step:4d}  loss {stats.item() / world:.4f}  max_vio "
                  f"{dm.losses.load_stats(load)['max_vio']:.2f}  load {load.tolist()}", flush=True)


def _run(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        train(args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, default=2, help="data-parallel degree (ranks holding the same experts)")
    p.add_argument("--ep", type=int, default=2, help="expert-parallel degree (ranks the experts are split over)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    p.add_argument("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 parameters (router stays fp32)")
    args = p.parse_args()
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        try:
            train(args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(args.dp * args.ep, port, args), nprocs=args.dp * args.ep, join=True)


if __name__ == "__main__":
    main()
