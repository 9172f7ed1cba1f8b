"""Quality study: the DeepSeekMoE ablation ladder (arXiv 2401.06066, Figure 3) at small scale on real text.

    python -m benchmarks.quality.run --all              # every config x 3 seeds, then plots and the report
    python -m benchmarks.quality.run --quick            # two configs, a few steps (the CI smoke test)
    python -m benchmarks.quality.run --configs deepseekmoe --seeds 0 --steps 200
    python -m benchmarks.quality.run --report           # plots and docs/quality.md from the saved runs

A byte-level decoder LM (pre-norm, causal attention; its MLPs are the compared layers) trains on the Python
standard library's sources (or ``--data FILE``) with a fixed train/validation split. Ladder configs have equal
total expert parameters and equal active FLOPs (16 expert widths of F total, 2 active): dense (active size),
GShard-style 16 experts top-2, + shared isolation (1 + 15, top-1), + fine-grained (1 + 31 of F/2, top-3),
DeepSeekMoE (1 + 63 of F/4, top-7); plus the balancing ablation on DeepSeekMoE: expert-level aux loss
(α = 0.01), aux-loss-free bias (γ = 0.001), neither. Every run writes JSON (config, params, FLOPs, validation
bits per byte and MaxVio over steps, git revision) under ``--out``; an interrupted run resumes from its
checkpoint, a finished one is skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import deepseek_moe as dm
from deepseek_moe.experts import SharedExperts

from benchmarks.quality.lm import TinyLM, byte_batches, load_text

HIDDEN, LAYERS, SEQ, BATCH, WIDTH = 128, 2, 128, 16, 128  # WIDTH = F, one GShard expert's hidden size

LADDER = {
    # name: (shared, routed, top_k, expert width as a fraction of F); None = the dense FFN of width 2F
    "dense": None,
    "gshard": (0, 16, 2, 1),
    "shared": (1, 15, 1, 1),
    "fine": (1, 31, 3, 2),
    "deepseekmoe": (1, 63, 7, 4),
}
BALANCE = {"deepseekmoe-aux": dict(aux_loss_alpha=0.01), "deepseekmoe-bias": dict(bias_update_speed=0.001),
           "deepseekmoe-none": {}}
CONFIGS = list(LADDER) + list(BALANCE)


def layer_config(name: str) -> Optional[dm.MoEConfig]:
    """The MoE config of ``name`` (None for dense). Ladder configs use the expert-level aux loss α = 0.01."""
    base = "deepseekmoe" if name in BALANCE else name
    spec = LADDER[base]
    if spec is None:
        return None
    shared, routed, k, split = spec
    balance = BALANCE.get(name, dict(aux_loss_alpha=0.01))
    return dm.MoEConfig(hidden_size=HIDDEN, expert_hidden_size=WIDTH // split, num_routed_experts=routed,
                        num_shared_experts=shared, top_k=k, score_func="softmax", norm_topk_prob=False, **balance)


def build(name: str) -> TinyLM:
    cfg = layer_config(name)
    make = (lambda: SharedExperts.dense(HIDDEN, 2 * WIDTH)) if cfg is None else (lambda: dm.DeepSeekMoELayer(cfg))
    return TinyLM(256, HIDDEN, LAYERS, SEQ, make)


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@torch.no_grad()
def evaluate(model: TinyLM, val_N: torch.Tensor, batches: int) -> float:
    """Validation bits per byte over ``batches`` fixed windows."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    stream = byte_batches(val_N, BATCH, SEQ, gen)
    total = 0.0
    for _ in range(batches):
        ids, target = next(stream)
        total += F.cross_entropy(model(ids).reshape(-1, 256), target.reshape(-1)).item()
    model.train()
    return total / batches / math.log(2)


def train_one(name: str, seed: int, steps: int, data: Dict[str, torch.Tensor], out_dir: str, eval_every: int,
              eval_batches: int, progress: bool) -> Dict:
    """Train config ``name`` with ``seed`` (resuming from its checkpoint) and write its JSON; returns the record."""
    path = os.path.join(out_dir, f"{name}-seed{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record["steps"] == steps:
            return record
    torch.manual_seed(seed)
    model = build(name)
    moe = [m for m in model.modules() if isinstance(m, dm.DeepSeekMoELayer)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "val_bpb": [], "max_vio": [], "load_layer0": []}
    start_step, ckpt = 0, path.replace(".json", ".pt")
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, start_step = state["history"], state["step"]
    stream = byte_batches(data["train"], BATCH, SEQ, gen)
    cfg = layer_config(name)
    began = time.perf_counter()
    load_sum = None
    for step in range(start_step + 1, steps + 1):
        ids, target = next(stream)
        loss = F.cross_entropy(model(ids).reshape(-1, 256), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + dm.aux_loss(model)).backward()
        opt.step()
        sched.step()
        for layer in moe:
            layer.update_bias()
        if moe:
            load = moe[0].tokens_per_expert.double()
            load_sum = load if load_sum is None else load_sum + load
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["val_bpb"].append(evaluate(model, data["val"], eval_batches))
            history["max_vio"].append(sum(m.last_stats["max_vio"] for m in moe) / len(moe) if moe else 0.0)
            history["load_layer0"].append((load_sum / load_sum.sum()).tolist() if load_sum is not None else [])
            load_sum = None
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "history": history, "step": step}, ckpt)
            if progress:
                print(f"  {name} seed {seed}: step {step}/{steps}  val {history['val_bpb'][-1]:.3f} bits/byte  "
                      f"MaxVio {history['max_vio'][-1]:.2f}  ({time.perf_counter() - began:.0f}s)",
                      file=sys.stderr, flush=True)
    record = {
        "config": name, "seed": seed, "steps": steps, "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d"),
        "model": dict(hidden=HIDDEN, layers=LAYERS, seq=SEQ, batch=BATCH, expert_width_F=WIDTH),
        "layer": None if cfg is None else {k: v for k, v in cfg.__dict__.items()},
        "params": sum(p.numel() for p in model.parameters()),
        "mlp_flops_per_token": (cfg.flops_per_token if cfg is not None else 2 * 3 * HIDDEN * 2 * WIDTH) * LAYERS,
        "history": history, "final_val_bpb": history["val_bpb"][-1], "seconds": time.perf_counter() - began,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    os.remove(ckpt)
    return record


def load_records(out_dir: str) -> List[Dict]:
    records = []
    for file in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if file.endswith(".json"):
            with open(os.path.join(out_dir, file)) as f:
                records.append(json.load(f))
    return records


def summary(records: List[Dict]) -> List[Dict]:
    """Per config: seeds, mean and std of the final validation bits per byte, mean final MaxVio."""
    rows = []
    for name in CONFIGS:
        finals = [r["final_val_bpb"] for r in records if r["config"] == name]
        vios = [r["history"]["max_vio"][-1] for r in records if r["config"] == name]
        if not finals:
            continue
        mean = sum(finals) / len(finals)
        std = (sum((v - mean) ** 2 for v in finals) / max(len(finals) - 1, 1)) ** 0.5
        rows.append({"config": name, "seeds": len(finals), "val_bpb": mean, "std": std,
                     "max_vio": sum(vios) / len(vios)})
    return rows


def plots(records: List[Dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in CONFIGS:
        runs = [r for r in records if r["config"] == name]
        if not runs:
            continue
        steps = runs[0]["history"]["step"]
        curves = torch.tensor([r["history"]["val_bpb"] for r in runs if r["history"]["step"] == steps])
        mean = curves.mean(0)
        ax.plot(steps, mean, label=f"{name} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0).values, curves.max(0).values, alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "val_loss.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    runs = [r for r in records if r["config"] == "deepseekmoe" and r["history"]["load_layer0"]]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        load = torch.tensor(runs[0]["history"]["load_layer0"]).T
        im = ax.imshow(load, aspect="auto", cmap="viridis",
                       extent=[0, runs[0]["history"]["step"][-1], load.shape[0] - 0.5, -0.5])
        ax.set_xlabel("step")
        ax.set_ylabel("expert (layer 0)")
        fig.colorbar(im, ax=ax, label="share of routed pairs")
        paths.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help=f"every config: {', '.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="dense and deepseekmoe, 1 seed, 20 steps (smoke test)")
    p.add_argument("--configs", help="comma list of configs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run (1000: ~2 min for deepseekmoe on 2 cores)")
    p.add_argument("--data", help="a text file (default: the standard library's *.py sources)")
    p.add_argument("--out", help="results folder (default benchmarks/results/quality; --quick: quality_quick)")
    p.add_argument("--report", action="store_true", help="only the plots and the summary of saved runs")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        configs, seeds, steps, eval_every, eval_batches = ["dense", "deepseekmoe"], [0], 20, 10, 2
    else:
        configs = CONFIGS if args.all or not args.configs else args.configs.split(",")
        seeds, steps, eval_every, eval_batches = [int(s) for s in args.seeds.split(",")], args.steps, 50, 16
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"run: unknown config {unknown[0]!r}; expected one of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = os.path.join("benchmarks", "results", "quality_quick" if args.quick else "quality")
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        text = torch.frombuffer(bytearray(load_text(args.data, 8_000_000)), dtype=torch.uint8)
        split = int(0.9 * text.numel())
        data = {"train": text[:split], "val": text[split:]}
        print(f"text: {text.numel() / 1e6:.1f} MB ({args.data or 'stdlib *.py'}), train/val 90/10; "
              f"{len(configs)} configs x {len(seeds)} seeds x {steps} steps", file=sys.stderr)
        for i, name in enumerate(configs):
            for seed in seeds:
                print(f"[{i * len(seeds) + seeds.index(seed) + 1}/{len(configs) * len(seeds)}] {name} seed {seed}",
                      file=sys.stderr, flush=True)
                train_one(name, seed, steps, data, args.out, eval_every, eval_batches, progress=True)
    records = [r for r in load_records(args.out) if r["config"] in configs or args.report]
    print(f"{'config':18s} {'seeds':>5s} {'val bits/byte':>14s} {'MaxVio':>7s}")
    for row in summary(records):
        print(f"{row['config']:18s} {row['seeds']:5d} {row['val_bpb']:8.4f} ± {row['std']:.4f} {row['max_vio']:7.2f}")
    try:
        for path in plots(records, args.out):
            print(f"wrote {path}")
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'deepseek-moe[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
