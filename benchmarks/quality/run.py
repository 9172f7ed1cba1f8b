"""Quality study v2: the DeepSeekMoE ablation ladder (arXiv 2401.06066, Figure 3) at small scale on real text, with
paired seeds and confidence intervals, a balancing ablation, and the paper's redundancy experiment (§4.5, Fig. 4).

    python -m benchmarks.quality.run --all --jobs 2     # every config x 3 seeds x 4000 steps, 2 runs at a time
    python -m benchmarks.quality.run --quick            # two configs, a few steps (the CI smoke test)
    python -m benchmarks.quality.run --configs deepseekmoe --seeds 0 --steps 500
    python -m benchmarks.quality.run --report           # tables, plots and summary.json from the saved runs

A byte-level decoder LM (pre-norm, causal attention; its MLPs are the compared layers) trains on Python source
(the standard library's and torch's ``*.py`` files, up to 32 MB, or ``--data FILE``) with a fixed 90/10
train/validation split. Ladder configs have equal total expert parameters and equal active FLOPs (16 expert widths
of F total, 2 active): dense (active size), GShard-style 16 experts top-2, + shared isolation (1 + 15, top-1),
+ fine-grained (1 + 31 of F/2, top-3), DeepSeekMoE (1 + 63 of F/4, top-7), all with the expert-level balance
loss α = 0.01 and the torch experts backend; plus DeepSeekMoE balanced by the aux-loss-free bias (γ = 0.001, no
aux loss) or not at all.

Paired seeds: seed s gives every config the same embedding/attention/head initialisation and the same batches,
so config differences are measured seed by seed. Every run writes JSON (config, parameters, FLOPs, validation
bits per byte over steps and a final one on 128 fixed batches, batch and global MaxVio, the redundancy curve, the
git revision and corpus hash) under ``--out``; an interrupted run resumes from its checkpoint, a finished one is
skipped. Runs go seed by seed, so a partial study already pairs every config on the first seeds. ``--jobs N`` trains
N runs at a time in N worker processes with 1/N of torch's threads each: these models are too small for two threads
to share one run well (on the 2-core machine a deepseekmoe step took 0.218 s with 2 threads and 0.315 s with 1
thread beside a second run, 1.4x the throughput).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import deepseek_moe as dm
from deepseek_moe.analysis import redundancy_curve
from deepseek_moe.experts import SharedExperts

from benchmarks.quality.lm import TinyLM, byte_batches

HIDDEN, LAYERS, SEQ, BATCH, WIDTH = 128, 2, 128, 16, 128  # WIDTH = F, one GShard expert's hidden size
LR, CLIP = 2e-3, 1.0
BACKEND = "torch"  # the experts backend of every MoE run
EVAL_BATCHES, FINAL_EVAL_BATCHES = 16, 128  # fixed validation batches of BATCH x SEQ bytes
REDUNDANCY_FRACTIONS = [0.0, 1 / 16, 2 / 16, 3 / 16, 4 / 16]  # DeepSeekMoE Fig. 4's x-axis
REDUNDANCY_BATCHES = 32

LADDER = {
    # name: (shared, routed, top_k, expert width as a fraction of F); None = the dense FFN of width 2F
    "dense": None,
    "gshard": (0, 16, 2, 1),
    "shared": (1, 15, 1, 1),
    "fine": (1, 31, 3, 2),
    "deepseekmoe": (1, 63, 7, 4),
}
# Balancing on DeepSeekMoE. The ladder's own balancing is the aux loss, so "deepseekmoe-aux" is the ladder's
# "deepseekmoe" runs (the same configuration, not trained twice).
BALANCE = {"deepseekmoe-bias": dict(aux_loss_alpha=0.0, bias_update_speed=0.001),
           "deepseekmoe-none": dict(aux_loss_alpha=0.0)}
ALIASES = {"deepseekmoe-aux": "deepseekmoe"}
CONFIGS = list(LADDER) + list(BALANCE)
# (a, b): a's final bits/byte minus b's, seed by seed. Negative = a is better.
COMPARISONS = [("shared", "gshard"), ("fine", "shared"), ("deepseekmoe", "fine"), ("deepseekmoe", "gshard"),
               ("deepseekmoe", "dense"), ("deepseekmoe-bias", "deepseekmoe-aux"),
               ("deepseekmoe-none", "deepseekmoe-aux")]
# DeepSeekMoE Fig. 4's comparison: (a, b), a's loss rise with the top routed experts disabled minus b's, seed by seed.
REDUNDANCY_COMPARISON = ("deepseekmoe", "gshard")
MIN_TEXT_BYTES = 10 * (SEQ + 2)  # a 10% validation split must hold one window of SEQ + 1 bytes


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom: the t where
    P(|T| < t) = 0.95, by bisection on the closed-form distribution for integer df (Abramowitz & Stegun 26.7.3-4:
    with θ = atan(t / √df), a finite series in cos² θ)."""
    if df < 1:
        raise ValueError(f"t95: df={df} must be at least 1")

    def inside(t: float) -> float:
        theta = math.atan(t / math.sqrt(df))
        c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:  # odd: (2/π)(θ + sin θ cos θ (1 + 2/3 cos² θ + ... ))
            for k in range(1, (df - 1) // 2):
                term *= c2 * 2 * k / (2 * k + 1)
                total += term
            tail = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
            return 2 / math.pi * (theta + tail)
        for k in range(1, df // 2):  # even: sin θ (1 + 1/2 cos² θ + 1·3/(2·4) cos⁴ θ + ...)
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return math.sin(theta) * total

    low, high = 0.0, 1000.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if inside(mid) < 0.95 else (low, mid)
    return (low + high) / 2


def layer_config(name: str) -> Optional[dm.MoEConfig]:
    """The MoE config of ``name`` (None for dense)."""
    name = ALIASES.get(name, name)
    spec = LADDER["deepseekmoe" if name in BALANCE else name]
    if spec is None:
        return None
    shared, routed, k, split = spec
    balance = BALANCE.get(name, dict(aux_loss_alpha=0.01))
    # backend "auto" would pick the compiled extension in a process that has loaded it and torch in one that has
    # not: its float sums differ in the last bits, so a run's numbers would depend on what ran before it.
    return dm.MoEConfig(hidden_size=HIDDEN, expert_hidden_size=WIDTH // split, num_routed_experts=routed,
                        num_shared_experts=shared, top_k=k, score_func="softmax", norm_topk_prob=False,
                        backend=BACKEND, **balance)


def build(name: str, seed: int) -> TinyLM:
    """The model of ``name``: embedding, attention and head initialised from ``seed`` alone (the same for every
    config), then the MLPs from a seed of their own."""
    torch.manual_seed(seed)
    model = TinyLM(256, HIDDEN, LAYERS, SEQ, nn.Identity)
    cfg = layer_config(name)
    torch.manual_seed(10_000 + seed)
    for block in model.blocks:
        block.mlp = SharedExperts.dense(HIDDEN, 2 * WIDTH) if cfg is None else dm.DeepSeekMoELayer(cfg)
    return model


def corpus(path: Optional[str], max_bytes: int) -> Tuple[bytes, str]:
    """(text, description): the file at ``path``, or the ``*.py`` sources of the standard library (without its
    site-packages) and then of the installed torch package, in sorted path order, up to ``max_bytes``."""
    if path:
        return Path(path).read_bytes()[:max_bytes], path
    import torch as torch_pkg

    chunks, total = [], 0
    for root in (sysconfig.get_paths()["stdlib"], os.path.dirname(torch_pkg.__file__)):
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "dist-packages", "__pycache__"))
            for name in sorted(f for f in files if f.endswith(".py")):
                try:
                    chunks.append(Path(folder, name).read_bytes())
                except OSError:
                    continue
                total += len(chunks[-1])
                if total >= max_bytes:
                    return b"\n".join(chunks)[:max_bytes], f"stdlib *.py then torch {torch_pkg.__version__} *.py"
    return b"\n".join(chunks)[:max_bytes], f"stdlib *.py then torch {torch_pkg.__version__} *.py"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def val_batches(val_N: torch.Tensor, count: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` fixed validation batches (the same for every run)."""
    stream = byte_batches(val_N, BATCH, SEQ, torch.Generator().manual_seed(1234))
    return [next(stream) for _ in range(count)]


def batch_loss(model: TinyLM, batch) -> torch.Tensor:
    ids, target = batch
    return F.cross_entropy(model(ids).reshape(-1, 256), target.reshape(-1))


@torch.no_grad()
def evaluate(model: TinyLM, batches) -> Tuple[float, float]:
    """(mean validation bits per byte, its standard error over the batches)."""
    model.eval()
    bpb = torch.tensor([batch_loss(model, b).item() / math.log(2) for b in batches], dtype=torch.float64)
    model.train()
    sem = (bpb.std() / math.sqrt(len(bpb))).item() if len(bpb) > 1 else 0.0
    return bpb.mean().item(), sem


def _write_json(path: str, obj) -> None:
    """Write atomically (a temporary file renamed into place), so an interrupted write leaves no broken file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def record_path(out_dir: str, name: str, seed: int) -> str:
    return os.path.join(out_dir, f"{name}-seed{seed}.json")


def train_one(name: str, seed: int, steps: int, data: Dict, out_dir: str, eval_every: int, progress: bool) -> Dict:
    """Train config ``name`` with ``seed`` (resuming from its checkpoint) and write its JSON; returns the record.
    Raises ValueError when the folder already holds this run for another number of steps."""
    path = record_path(out_dir, name, seed)
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record["steps"] != steps:
            raise ValueError(f"{path} holds a {record['steps']}-step run; use another --out for {steps} steps")
        return record
    model = build(name, seed)
    moe = [m for m in model.modules() if isinstance(m, dm.DeepSeekMoELayer)]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    # OneCycleLR divides by pct_start · steps − 1, which 10 steps would make 0.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps,
                                                pct_start=0.1 if steps != 10 else 0.15)
    gen = torch.Generator().manual_seed(seed)
    history = {"step": [], "val_bpb": [], "train_loss": [], "grad_norm": [], "batch_max_vio": [],
               "global_max_vio": [], "load_layer0": []}
    start_step, ckpt, elapsed = 0, path.replace(".json", f"-{steps}steps.pt"), 0.0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        history, start_step, elapsed = state["history"], state["step"], state["seconds"]
    stream = byte_batches(data["train"], BATCH, SEQ, gen)
    cfg = layer_config(name)
    began = time.perf_counter()
    losses, norms, vios, load_sum = [], [], [], None
    for step in range(start_step + 1, steps + 1):
        loss = batch_loss(model, next(stream))
        opt.zero_grad(set_to_none=True)
        (loss + dm.aux_loss(model)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        sched.step()
        for layer in moe:
            layer.update_bias()
        losses.append(loss.item())
        if moe:
            loads = torch.stack([m.tokens_per_expert.double() for m in moe])
            vios.append(sum(m.last_stats["max_vio"] for m in moe) / len(moe))
            load_sum = loads if load_sum is None else load_sum + loads
        if step % eval_every == 0 or step == steps:
            history["step"].append(step)
            history["val_bpb"].append(evaluate(model, data["val"][:EVAL_BATCHES])[0])
            history["train_loss"].append(sum(losses) / len(losses))
            history["grad_norm"].append(sum(norms) / len(norms))
            history["batch_max_vio"].append(sum(vios) / len(vios) if vios else 0.0)
            history["global_max_vio"].append(
                (load_sum.max(1).values / load_sum.mean(1) - 1).mean().item() if load_sum is not None else 0.0)
            history["load_layer0"].append((load_sum[0] / load_sum[0].sum()).tolist() if load_sum is not None else [])
            losses, norms, vios, load_sum = [], [], [], None
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "history": history, "step": step,
                        "seconds": elapsed + time.perf_counter() - began}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
            if progress:
                print(f"  {name} seed {seed}: step {step}/{steps}  val {history['val_bpb'][-1]:.3f} bits/byte  "
                      f"batch MaxVio {history['batch_max_vio'][-1]:.2f}  ({time.perf_counter() - began:.0f} s)",
                      file=sys.stderr, flush=True)
    final, final_sem = evaluate(model, data["val"])
    redundancy = None
    if moe:
        batches = data["val"][:REDUNDANCY_BATCHES]
        redundancy = {"top_experts": redundancy_curve(model, batch_loss, batches, REDUNDANCY_FRACTIONS)}
        if cfg.num_shared_experts:
            redundancy["without_shared"] = redundancy_curve(model, batch_loss, batches, [0.0], shared=True)[0]
    record = {
        "config": name, "seed": seed, "steps": steps, "git_revision": git_revision(), "date": time.strftime("%Y-%m-%d"),
        "corpus": data["corpus"],
        "model": dict(hidden=HIDDEN, layers=LAYERS, seq=SEQ, batch=BATCH, expert_width_F=WIDTH, lr=LR, clip=CLIP),
        "layer": None if cfg is None else {k: v for k, v in cfg.__dict__.items()},
        "params": sum(p.numel() for p in model.parameters()),
        "mlp_flops_per_token": (cfg.flops_per_token if cfg is not None else 2 * 3 * HIDDEN * 2 * WIDTH) * LAYERS,
        "history": history, "final_val_bpb": final, "final_val_sem": final_sem,
        "final_eval_batches": len(data["val"]), "redundancy": redundancy,
        "seconds": elapsed + time.perf_counter() - began, "torch_threads": torch.get_num_threads(),
        "backend": None if cfg is None else model.blocks[0].mlp.backend_name,
    }
    _write_json(path, record)
    os.remove(ckpt)
    return record


def _train_in_worker(label: str, name: str, seed: int, steps: int, data: Dict, out_dir: str, eval_every: int,
                     threads: int) -> None:
    torch.set_num_threads(threads)
    print(label, file=sys.stderr, flush=True)
    train_one(name, seed, steps, data, out_dir, eval_every, progress=True)


def train_all(tasks: List[Tuple[str, int]], steps: int, data: Dict, out_dir: str, eval_every: int,
              jobs: int) -> None:
    """Train every (config, seed) of ``tasks`` that has no record in ``out_dir`` yet, in order, ``jobs`` at a
    time (1, or a single run left: in this process). The workers are ``min(jobs, runs left)`` spawned processes
    with ``torch.get_num_threads() // workers`` threads each (at least 1). At most one run per worker is handed
    out at a time, so the first failure (or Ctrl-C) stops the study once the runs under way have ended, and
    re-raises; interrupted runs resume from their checkpoints. A run named twice (or by an alias) is trained
    once: two workers on one run would share its checkpoint."""
    tasks = list(dict.fromkeys((ALIASES.get(name, name), seed) for name, seed in tasks))
    todo = [(name, seed) for name, seed in tasks if not os.path.exists(record_path(out_dir, name, seed))]
    labels = [f"[{i + 1}/{len(todo)}] {name} seed {seed}" for i, (name, seed) in enumerate(todo)]
    workers = min(jobs, len(todo))
    if workers <= 1:
        for label, (name, seed) in zip(labels, todo):
            print(label, file=sys.stderr, flush=True)
            train_one(name, seed, steps, data, out_dir, eval_every, progress=True)
        return
    threads = max(1, torch.get_num_threads() // workers)
    context = multiprocessing.get_context("spawn")  # a fork would inherit the parent's torch thread pools
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = set()
        try:
            for label, (name, seed) in zip(labels, todo):
                if len(running) == workers:
                    done, running = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        future.result()
                running.add(pool.submit(_train_in_worker, label, name, seed, steps, data, out_dir, eval_every,
                                        threads))
            for future in concurrent.futures.as_completed(running):
                future.result()
        except BaseException:
            for future in running:
                future.cancel()
            raise


def load_records(out_dir: str) -> List[Dict]:
    """The finished runs (``<config>-seed<n>.json``) in ``out_dir``."""
    records = []
    for file in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if re.fullmatch(r"[a-z-]+-seed\d+\.json", file) and file.rsplit("-seed", 1)[0] in CONFIGS:
            path = os.path.join(out_dir, file)
            try:
                with open(path) as f:
                    record = json.load(f)
            except ValueError as err:
                raise ValueError(f"{path} is not a finished run's JSON ({err}): move or delete it") from None
            missing = [k for k in ("config", "seed", "steps", "final_val_bpb") if k not in record]
            if missing:
                raise ValueError(f"{path} is not a finished run's JSON (no {missing[0]!r}): move or delete it")
            records.append(record)
    return records


def _runs(records: List[Dict], name: str) -> Dict[int, Dict]:
    name = ALIASES.get(name, name)
    return {r["seed"]: r for r in records if r["config"] == name}


def _mean_ci(values: List[float]) -> Tuple[float, Optional[float], Optional[float]]:
    """(mean, sample std, half-width of the 95% t interval; None below 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, std, t95(n - 1) * std / math.sqrt(n)


# MaxVio (Wang et al. 2024, arXiv 2408.15664, eq. 5) as the runs record it at every evaluation (each window of
# eval_every steps: 250 in the study), in three readings.
MAX_VIO = {"batch_max_vio": "batch MaxVio, last window", "batch_max_vio_training": "batch MaxVio, whole run",
           "global_max_vio": "global MaxVio, last window"}


def _max_vio(record: Dict) -> Dict[str, float]:
    """A run's MaxVio readings (``MAX_VIO``): the mean batch MaxVio over the last window and over the whole run
    (every window has the same number of steps when ``eval_every`` divides the steps), and the MaxVio of the
    load summed over the last window."""
    history = record["history"]
    return {"batch_max_vio": history["batch_max_vio"][-1],
            "batch_max_vio_training": sum(history["batch_max_vio"]) / len(history["batch_max_vio"]),
            "global_max_vio": history["global_max_vio"][-1]}


def _paired(diffs: List[float]) -> Dict:
    """Per-seed differences a - b as the summary reports them: mean, std, 95% half-width and whether it excludes 0."""
    mean, std, half = _mean_ci(diffs)
    return {"diff": mean, "std": std, "ci95": half, "per_seed": diffs, "decided": half is not None and abs(mean) > half}


def summary(records: List[Dict]) -> Dict:
    """Per config: seeds, mean ± std of the final bits/byte, MaxVio; per comparison: the paired difference with its
    95% confidence interval and whether it excludes 0 (decided), and for the balancing comparisons the same for
    each MaxVio reading; per MoE config: the mean redundancy curve. Only
    the runs of the most common step count are used (the study's; others are listed as ignored)."""
    counts = {}
    for r in records:
        counts[r["steps"]] = counts.get(r["steps"], 0) + 1
    steps = max(counts, key=lambda k: (counts[k], k)) if counts else None
    ignored = sorted(f"{r['config']}-seed{r['seed']} ({r['steps']} steps)" for r in records if r["steps"] != steps)
    records = [r for r in records if r["steps"] == steps]
    configs, comparisons = [], []
    for name in list(LADDER) + list(ALIASES) + list(BALANCE):
        runs = _runs(records, name)
        if not runs:
            continue
        finals = [r["final_val_bpb"] for r in runs.values()]
        mean, std, _ = _mean_ci(finals)
        row = {"config": name, "seeds": sorted(runs), "val_bpb": mean, "std": std, "per_seed": finals,
               "eval_sem": max(r.get("final_val_sem", 0.0) for r in runs.values()),
               **{key: sum(_max_vio(r)[key] for r in runs.values()) / len(runs) for key in MAX_VIO}}
        curves = [r["redundancy"] for r in runs.values() if r.get("redundancy")]
        if curves:
            row["redundancy"] = [
                {"fraction": p["fraction"],
                 "loss": sum(c["top_experts"][i]["loss"] for c in curves) / len(curves)}
                for i, p in enumerate(curves[0]["top_experts"])]
            if "without_shared" in curves[0]:
                row["loss_without_shared"] = sum(c["without_shared"]["loss"] for c in curves) / len(curves)
        configs.append(row)
    for a, b in COMPARISONS:
        runs_a, runs_b = _runs(records, a), _runs(records, b)
        seeds = sorted(set(runs_a) & set(runs_b))
        if not seeds:
            continue
        comparison = {"a": a, "b": b, "seeds": seeds,
                      **_paired([runs_a[s]["final_val_bpb"] - runs_b[s]["final_val_bpb"] for s in seeds])}
        if b in ALIASES:  # balancing arms of one architecture: their MaxVio compares like with like
            comparison["max_vio"] = {key: _paired([_max_vio(runs_a[s])[key] - _max_vio(runs_b[s])[key]
                                                   for s in seeds]) for key in MAX_VIO}
        comparisons.append(comparison)
    a, b = REDUNDANCY_COMPARISON
    runs_a, runs_b = _runs(records, a), _runs(records, b)
    seeds = sorted(s for s in set(runs_a) & set(runs_b) if runs_a[s].get("redundancy") and runs_b[s].get("redundancy"))
    redundancy = []
    for i, point in enumerate(runs_a[seeds[0]]["redundancy"]["top_experts"][1:], start=1) if seeds else []:
        rise = lambda r: r["redundancy"]["top_experts"][i]["loss"] - r["redundancy"]["top_experts"][0]["loss"]
        redundancy.append({"fraction": point["fraction"], "a": a, "b": b, "seeds": seeds,
                           **_paired([rise(runs_a[s]) - rise(runs_b[s]) for s in seeds])})
    revisions = sorted({r["git_revision"] for r in records})
    return {"steps": steps, "ignored": ignored, "configs": configs, "comparisons": comparisons,
            "redundancy_comparison": redundancy,
            "git_revisions": revisions,
            "corpus": sorted({json.dumps(r.get("corpus"), sort_keys=True) for r in records})}


def markdown(s: Dict) -> str:
    """The summary as the Markdown tables docs/quality.md shows."""
    lines = ["| config | seeds | final validation bits/byte (mean ± std) | per seed | batch MaxVio (last window "
             "/ whole run) | global MaxVio (last window) |", "|---|---|---|---|---|---|"]
    for r in s["configs"]:
        per_seed = ", ".join(f"{v:.3f}" for v in r["per_seed"])
        std = f" ± {r['std']:.3f}" if r["std"] is not None else ""
        label = r["config"] + (f" (= {ALIASES[r['config']]})" if r["config"] in ALIASES else "")
        routed = layer_config(r["config"]) is not None  # dense has no router, so no MaxVio
        vio = (f"{r['batch_max_vio']:.2f} / {r['batch_max_vio_training']:.2f} | {r['global_max_vio']:.2f}"
               if routed else "– | –")
        lines.append(f"| {label} | {len(r['seeds'])} | {r['val_bpb']:.3f}{std} | {per_seed} | {vio} |")
    lines += ["", "| comparison (a − b, bits/byte) | seeds | mean difference | 95% CI | per seed | decided |",
              "|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
        per_seed = ", ".join(f"{v:+.3f}" for v in c["per_seed"])
        ci = f"± {c['ci95']:.3f}" if c["ci95"] is not None else "n/a (1 seed)"
        verdict = ("yes: " + (c["a"] if c["diff"] < 0 else c["b"]) + " better") if c["decided"] else "no"
        lines.append(f"| {c['a']} − {c['b']} | {len(c['seeds'])} | {c['diff']:+.3f} | {ci} | {per_seed} | {verdict} |")
    balancing = [c for c in s["comparisons"] if c["b"] in ALIASES and "max_vio" in c]
    if balancing:
        lines += ["", "| MaxVio difference, balancing (a − b; negative = a balances better; ± 95% CI) | seeds | "
                  + " | ".join(MAX_VIO.values()) + " |", "|---|---|" + "---|" * len(MAX_VIO)]
        for c in balancing:
            cells = []
            for key in MAX_VIO:
                v = c["max_vio"][key]
                ci = f" ± {v['ci95']:.2f}" if v["ci95"] is not None else " (n/a: 1 seed)"
                cells.append(f"{v['diff']:+.2f}{ci}" + (" decided" if v["decided"] else ""))
            lines.append(f"| {c['a']} − {c['b']} | {len(c['seeds'])} | " + " | ".join(cells) + " |")
    curves = [r for r in s["configs"] if "redundancy" in r and r["config"] != "deepseekmoe-aux"]
    if curves:
        header = " | ".join(f"{p['fraction']:.3g}" for p in curves[0]["redundancy"])
        lines += ["", f"| validation loss (nats/byte) with the top fraction of routed experts disabled | {header} | "
                      f"without shared |", "|---|" + "---|" * (len(curves[0]["redundancy"]) + 1)]
        for r in curves:
            cells = " | ".join(f"{p['loss']:.3f}" for p in r["redundancy"])
            shared = f"{r['loss_without_shared']:.3f}" if "loss_without_shared" in r else "–"
            lines.append(f"| {r['config']} | {cells} | {shared} |")
    if s.get("redundancy_comparison"):
        first = s["redundancy_comparison"][0]
        lines += ["", f"| loss rise with the top fraction disabled, {first['a']} − {first['b']} (nats/byte; positive "
                      f"= {first['a']} less redundant) | seeds | mean difference | 95% CI | per seed | decided |",
                  "|---|---|---|---|---|---|"]
        for c in s["redundancy_comparison"]:
            ci = f"± {c['ci95']:.3f}" if c["ci95"] is not None else "n/a (1 seed)"
            per_seed = ", ".join(f"{v:+.3f}" for v in c["per_seed"])
            lines.append(f"| {c['fraction']:.3g} | {len(c['seeds'])} | {c['diff']:+.3f} | {ci} | {per_seed} | "
                         f"{'yes' if c['decided'] else 'no'} |")
    return "\n".join(lines)


def plots(records: List[Dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in CONFIGS:
        runs = list(_runs(records, name).values())
        if not runs:
            continue
        steps = runs[0]["history"]["step"]
        curves = torch.tensor([r["history"]["val_bpb"] for r in runs if r["history"]["step"] == steps])
        ax.plot(steps, curves.mean(0), label=f"{name} ({len(curves)} seeds)")
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
    arms = {name: list(_runs(records, name).values()) for name in list(ALIASES) + list(BALANCE)}
    if any(arms.values()):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for ax, key, title in zip(axes, ("batch_max_vio", "global_max_vio"),
                                  ("batch MaxVio (mean over each window)", "global MaxVio (load summed over each window)")):
            for name, runs in arms.items():
                if runs:
                    steps = runs[0]["history"]["step"]
                    values = torch.tensor([r["history"][key] for r in runs if r["history"]["step"] == steps])
                    ax.plot(steps, values.mean(0), label=f"{name} ({len(values)} seeds)")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel(f"MaxVio (mean of the {LAYERS} layers)")
        axes[0].legend(fontsize=8)
        paths.append(os.path.join(out_dir, "max_vio.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    curves = {r["config"]: r["redundancy"] for r in summary(records)["configs"]
              if "redundancy" in r and r["config"] in ("gshard", "deepseekmoe")}
    if curves:
        from deepseek_moe.analysis import plot_redundancy

        paths.append(plot_redundancy(curves, os.path.join(out_dir, "redundancy.png")))
    plt.close("all")
    return paths


def _refuse_study_options(args: argparse.Namespace, why: str) -> None:
    given = [f"--{k}" for k in ("configs", "seeds", "steps") if getattr(args, k) is not None]
    if given or args.all:
        raise ValueError(f"{why}; drop {(given or ['--all'])[0]}")


def _plan(args: argparse.Namespace) -> Tuple[List[str], List[int], int, int, int]:
    """(configs, seeds, steps, eval_every, final evaluation batches) from the command line, each config and
    seed once (an alias names its config); ValueError with what is wrong."""
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if args.quick:
        _refuse_study_options(args, "--quick runs a fixed smoke test")
        return ["dense", "deepseekmoe"], [0], 20, 10, 4
    if args.configs is not None and args.all:
        raise ValueError("give --all or --configs, not both")
    if args.report:
        _refuse_study_options(args, "--report summarises every saved run in --out")
    if args.configs is None and not args.all and not args.report:
        raise ValueError("say what to train: --all (the whole study, ~3 h), --configs LIST, or --quick; "
                         "--report only summarises the saved runs")
    configs = CONFIGS if args.configs is None else [c.strip() for c in args.configs.split(",")]
    configs = list(dict.fromkeys(ALIASES.get(c, c) for c in configs))
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown config {unknown[0]!r}; expected one of {', '.join(CONFIGS + list(ALIASES))}")
    try:
        seeds = list(dict.fromkeys(int(v) for v in ("0,1,2" if args.seeds is None else args.seeds).split(",")))
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected a comma list of integers, e.g. 0,1,2") from None
    if any(seed < 0 for seed in seeds):
        raise ValueError(f"--seeds {args.seeds!r}: seeds must be non-negative")
    steps = 4000 if args.steps is None else args.steps
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    return configs, seeds, steps, 250, FINAL_EVAL_BATCHES


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help=f"every config: {', '.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="dense and deepseekmoe, 1 seed, 20 steps (smoke test)")
    p.add_argument("--configs", help="comma list of configs")
    p.add_argument("--seeds", help="comma list of non-negative seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, help="training steps per run (default 4000: ~7 min for deepseekmoe)")
    p.add_argument("--data", help="a text file (default: the stdlib's and torch's *.py sources, up to 32 MB)")
    p.add_argument("--out", help="results folder (default benchmarks/results/quality; --quick: quality_quick)")
    p.add_argument("--report", action="store_true", help="only the plots and the summary of saved runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at a time, in worker processes with 1/jobs of torch's threads each")
    args = p.parse_args(argv)
    try:
        configs, seeds, steps, eval_every, final_batches = _plan(args)
        if args.out is None:
            args.out = os.path.join("benchmarks", "results", "quality_quick" if args.quick else "quality")
        if not args.report:
            clash = [r for r in load_records(args.out) if r["steps"] != steps and r["config"] in configs]
            if clash:
                raise ValueError(f"{args.out} holds {clash[0]['steps']}-step runs; use another --out for {steps} "
                                 "steps")
            try:
                raw, source = corpus(args.data, 32_000_000 if not args.quick else 2_000_000)
            except OSError as err:
                raise ValueError(f"--data: {err}") from None
            if len(raw) < MIN_TEXT_BYTES:
                raise ValueError(f"the text ({source}) has {len(raw)} bytes; the study needs at least "
                                 f"{MIN_TEXT_BYTES}")
        records = None if not args.report else load_records(args.out)
    except ValueError as err:
        print(f"run: {err}", file=sys.stderr)
        return 2
    if not args.report:
        os.makedirs(args.out, exist_ok=True)
        text = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        split = int(0.9 * text.numel())
        data = {"train": text[:split], "val": val_batches(text[split:], final_batches),
                "corpus": {"source": source, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
        print(f"text: {len(raw) / 1e6:.1f} MB ({source}), train/val 90/10; {len(configs)} configs x {len(seeds)} "
              f"seeds x {steps} steps" + (f", {args.jobs} at a time" if args.jobs > 1 else ""), file=sys.stderr)
        train_all([(name, seed) for seed in seeds for name in configs], steps, data, args.out, eval_every,
                  args.jobs)
        records = load_records(args.out)
    if not records:
        print(f"run: no finished runs in {args.out}", file=sys.stderr)
        return 2
    result = summary(records)
    print(markdown(result))
    if result["ignored"]:
        print(f"ignored (another step count than {result['steps']}): {', '.join(result['ignored'])}")
    _write_json(os.path.join(args.out, "summary.json"), {**result, "written_at_revision": git_revision()})
    try:
        for path in plots([r for r in records if r["steps"] == result["steps"]], args.out):
            print(f"wrote {path}")
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'deepseek-moe[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
