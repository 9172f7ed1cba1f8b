"""Expert parallelism: all-to-all bytes per token (DeepSeek-V2/V3 presets) and time per step on CPU gloo.

    python benchmarks/expert_parallel_cpu.py               # both parts
    python benchmarks/expert_parallel_cpu.py --bytes-only  # the preset table only (no processes)

Part 1 (no communication): for the deepseek-v2 and deepseek-v3 presets sharded over D ranks, the rows a token
sends (one per destination rank) with device-limited routing at M = 1..8, from the layer's own router on random
router weights and inputs (real checkpoints route less uniformly), and the bytes per token for dispatch +
combine in bf16, counting only rows that leave their rank.

Part 2 (gloo, spawned ranks, small layer): forward+backward time per step and measured bytes per token at world
size 2 and 4, unrestricted vs M = 1 and 2.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import deepseek_moe as dm
from deepseek_moe.parallel import shard_experts
from deepseek_moe.router import select_experts


def bytes_table(devices: int, tokens: int) -> None:
    print(f"Part 1: rows and bytes per token, {devices} ranks, random routing over {tokens} tokens, bf16 rows, "
          f"dispatch + combine, rows that leave their rank")
    print(f"{'preset':12s} {'M':>3s} {'rows/token':>10s} {'remote rows':>11s} {'KB/token':>9s}")
    for name in ("deepseek-v2", "deepseek-v3"):
        base = dm.MoEConfig.preset(name)
        E, K, H = base.num_routed_experts, base.top_k, base.hidden_size
        if E % devices:
            print(f"{name:12s} skipped: {E} experts do not divide over {devices} ranks")
            continue
        L = E // devices
        for M in range(1, min(8, devices) + 1):
            if M * L < K:
                continue
            cfg = base.replace(num_devices=devices, max_devices_per_token=M if M < devices else None)
            torch.manual_seed(0)
            scores = torch.rand(tokens, E) if cfg.score_func == "sigmoid" else torch.randn(tokens, E).softmax(-1)
            idx = select_experts(scores, torch.zeros(E), cfg)
            ranks = idx // L
            rows = torch.tensor([len(set(r.tolist())) for r in ranks], dtype=torch.float64)
            # A token lives on one rank (uniformly): rows to its own rank stay local.
            home = torch.randint(0, devices, (tokens,))
            local = (ranks == home.unsqueeze(1)).any(dim=1).double()
            remote = rows - local
            kb = remote.mean().item() * H * 2 * 2 / 1024
            print(f"{name:12s} {M:3d} {rows.mean().item():10.2f} {remote.mean().item():11.2f} {kb:9.1f}")


def _worker(rank: int, world: int, port: int, results, steps: int, tokens: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for M in (None, 1, 2):
        torch.manual_seed(0)
        cfg = dm.MoEConfig(hidden_size=256, expert_hidden_size=128, num_routed_experts=16, num_shared_experts=1,
                           top_k=4, score_func="sigmoid", norm_topk_prob=True, num_devices=world,
                           max_devices_per_token=M)
        layer = shard_experts(dm.DeepSeekMoELayer(cfg))
        x = torch.randn(tokens, 256)
        times, sent = [], []
        for step in range(steps + 1):
            dist.barrier()
            begin = time.perf_counter()
            layer(x).square().mean().backward()
            dist.barrier()
            if step:  # the first step warms up
                times.append(time.perf_counter() - begin)
                ex = layer.expert_parallel.last_exchange
                sent.append(ex["rows_sent_remote"] * ex["row_bytes"] * 2 / ex["tokens"])
        stats = torch.tensor([statistics.median(times), statistics.mean(sent),
                              layer.expert_parallel.last_exchange["rows_sent"] / tokens], dtype=torch.float64)
        dist.all_reduce(stats)
        if rank == 0:
            results[(world, M)] = (stats / world).tolist()
    dist.barrier()
    dist.destroy_process_group()


def timing_table(steps: int, tokens: int) -> None:
    print(f"\nPart 2: gloo on this machine, H=256, 16 experts of 128 + 1 shared, top-4, {tokens} tokens per rank, "
          f"fp32 forward+backward, median of {steps} steps, one thread per rank")
    print(f"{'world':>5s} {'M':>4s} {'ms/step':>8s} {'rows/token':>10s} {'remote KB/token':>15s}")
    manager = mp.Manager()
    results = manager.dict()
    for world in (2, 4):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(world, port, results, steps, tokens), nprocs=world, join=True)
        for M in (None, 1, 2):
            ms, remote_bytes, rows = results[(world, M)]
            print(f"{world:5d} {str(M):>4s} {ms * 1e3:8.1f} {rows:10.2f} {remote_bytes / 1024:15.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=8, help="ranks for the preset table")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bytes-only", action="store_true")
    args = p.parse_args()
    bytes_table(args.devices, args.tokens)
    if not args.bytes_only:
        timing_table(args.steps, args.tokens // 4)


if __name__ == "__main__":
    main()
