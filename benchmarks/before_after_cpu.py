"""The CPU ratios of docs/benchmarks.md for two revisions of the package, measured in one run.

    git worktree add /tmp/base <revision>
    python benchmarks/before_after_cpu.py --base /tmp/base            # this checkout against /tmp/base
    python benchmarks/before_after_cpu.py --base /tmp/base --rounds 3 --only decode

Each ratio is measured inside one process against its own dense or Mixtral contender, interleaved round by round
(the package's own timing loop): the MoE layer's forward+backward (fp32, T = 4096) over a dense FFN of equal active
FLOPs (``benchmarks/layer_cpu.py``), DeepSeekMoE 64x over the Mixtral-style 8x2 (the CLI's default comparison,
forward+backward fp32, T = 4096, peers off), and decode (T = 1, fp32, inference mode) over a dense FFN of the same
weight bytes (``benchmarks/decode_cpu.py``). The two revisions run in alternating processes, ``--rounds`` times
each, so that drift of a shared machine reaches both; the medians over the rounds are printed side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(root: str, args) -> str:
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable] + args, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{args} in {root} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def layer_vs_dense(root: str) -> float:
    out = _run(root, ["benchmarks/layer_cpu.py", "--dtypes", "float32", "--repeats", "5", "--no-eager"])
    lines = [ln for ln in out.splitlines() if re.match(r"float32\s+fwdbwd\s+torch", ln)]
    return float(lines[0].split()[-1].rstrip("x"))


def moe_vs_mixtral(root: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        _run(root, ["-m", "deepseek_moe.bench", "--tokens", "4096", "--mode", "fwdbwd", "--peers", "none",
                    "--backend", "torch", "--no-progress", "--json", path])
        with open(path) as f:
            rows = json.load(f)["rows"]
    ours = [r for r in rows if r["config"].startswith("deepseek") and r["implementation"] == "torch"]
    return float(ours[0]["ratio_to_ref"])


def decode_vs_dense(root: str) -> float:
    out = _run(root, ["benchmarks/decode_cpu.py", "--tokens", "1", "--rounds", "15", "--backend", "torch"])
    return float(out.strip().splitlines()[-1].split()[-1].rstrip("x"))


MEASURES = {"layer": ("fp32 fwd+bwd, layer / dense FFN", layer_vs_dense),
            "mixtral": ("fp32 fwd+bwd, DeepSeekMoE 64x / Mixtral 8x2", moe_vs_mixtral),
            "decode": ("decode T=1 fp32, layer / dense of equal bytes", decode_vs_dense)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a checkout of the revision to compare against")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=",".join(MEASURES), help=f"comma list of {tuple(MEASURES)}")
    args = p.parse_args(argv)
    chosen = args.only.split(",")
    results = {(name, side): [] for name in chosen for side in ("before", "after")}
    for r in range(args.rounds):
        for name in chosen:
            for side, root in (("before", os.path.abspath(args.base)), ("after", HERE)):
                value = MEASURES[name][1](root)
                results[(name, side)].append(value)
                print(f"round {r + 1}/{args.rounds} {name:8s} {side:6s} {value:.3f}", flush=True)
    print(f"\n{'ratio':50s} {'before':>8s} {'after':>8s}  rounds (before | after)")
    for name in chosen:
        b, a = results[(name, "before")], results[(name, "after")]
        print(f"{MEASURES[name][0]:50s} {statistics.median(b):8.3f} {statistics.median(a):8.3f}  "
              f"{', '.join(f'{v:.3f}' for v in b)} | {', '.join(f'{v:.3f}' for v in a)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
