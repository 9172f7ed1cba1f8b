"""Decode steps on a CPU shared with another busy process: each configuration in a process of its own.

    python benchmarks/shared_cpu.py                          # bf16, T = 1 and 16, beside another 2-thread process
    python benchmarks/shared_cpu.py --idle                   # the same configurations without the other process
    python benchmarks/shared_cpu.py --dtype float32 --tokens 1 --seconds 6 --repeats 3

Beside another process, OpenMP's threads are the question: after a parallel region they spin for milliseconds
(libgomp's default wait policy), and a region ends only when its last thread does, so one process's timings leak
into the next contender's when contenders are interleaved in one process (decode_cpu.py ``--beside-load``). Here
each configuration runs alone in a fresh process for ``--seconds``, back to back on the ext layer of decode_cpu.py's
shape (H = 1024, 64 x 352 + 2 shared, top-6, 1 GiB of weight copies cycled, cold), while the other process runs
2-thread PyTorch GEMMs for the whole run; the configurations alternate, ``--repeats`` times. Configurations:

* ``watch on``: the ext layer with the decode op's shared-CPU watch on (``deepseek_moe.ext.shared_cpu_watch``);
* ``watch off``: the watch off (the op always on ATen's threads);
* ``1 thread``: ``torch.set_num_threads(1)`` for the whole process (the watch on);
* ``dense``: the dense SwiGLU FFN that reads the same bytes as a T = 1 step (width (K + shared) · I);

each under libgomp's default wait policy and under ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead of spinning).
Printed: calls per second (the throughput), the mean and the median time of a call; ``*`` marks what the package
does by itself (the watch starts on, and off where ``OMP_WAIT_POLICY=PASSIVE``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("watch on", "watch off", "1 thread", "dense")


def child(config: str, T: int, dtype_name: str, seconds: float, layers: int) -> None:
    """One configuration in this process: calls for ``seconds``, then a JSON line of the per-call times."""
    import torch

    import deepseek_moe as dm
    from deepseek_moe import ext
    from deepseek_moe.experts import SharedExperts

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    cfg = dm.MoEConfig(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2,
                       top_k=6, score_func="sigmoid", norm_topk_prob=True, backend="ext")
    n = layers or (8 if dtype == torch.bfloat16 else 4)  # 1 GiB of weights: none stays in the L3 between visits
    if config == "dense":
        models = [SharedExperts.dense(1024, (cfg.top_k + cfg.num_shared_experts) * cfg.expert_hidden_size)
                  .to(dtype).eval() for _ in range(n)]
    else:
        ext.load()
        models = [dm.DeepSeekMoELayer(cfg).to(dtype).eval() for _ in range(n)]
        ext.shared_cpu_watch(config != "watch off")
    if config == "1 thread":
        torch.set_num_threads(1)
    xs = [torch.randn(T, 1024, dtype=dtype) for _ in range(n + 1)]
    times = []
    with torch.inference_mode():
        for i in range(2 * n):  # warm-up: the ops loaded, every copy touched once
            models[i % n](xs[i % (n + 1)])
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            i = len(times)
            t0 = time.perf_counter()
            models[i % n](xs[i % (n + 1)])
            times.append(time.perf_counter() - t0)
    print(json.dumps({"calls": len(times), "seconds": sum(times), "mean": statistics.mean(times),
                      "median": statistics.median(times)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", default="1,16")
    p.add_argument("--seconds", type=float, default=4.0, help="calls per configuration, back to back")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--idle", action="store_true", help="without the other process")
    p.add_argument("--configs", default=",".join(CONFIGS), help="which configurations (comma-separated)")
    p.add_argument("--layers", type=int, default=0, help="weight copies cycled (default: 1 GiB of weights)")
    p.add_argument("--child", nargs=2, metavar=("CONFIG", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.dtype, args.seconds, args.layers)
        return 0
    sys.path.insert(0, HERE)
    from decode_cpu import beside_load

    import torch

    print(f"torch {torch.__version__}, {args.dtype}; each configuration in its own process for {args.seconds:g} s, "
          f"{args.repeats} repeats; {'idle' if args.idle else 'beside another 2-thread PyTorch process'}")
    print(f"{'T':>3s} {'configuration':>12s} {'wait policy':>11s} {'calls/s':>8s} {'mean ms':>8s} {'median ms':>9s}")
    with beside_load(not args.idle):
        for T in (int(t) for t in args.tokens.split(",")):
            results = {}
            for _ in range(args.repeats):
                for config in args.configs.split(","):
                    for policy in ("default", "PASSIVE"):
                        env = dict(os.environ)
                        env.pop("OMP_WAIT_POLICY", None)
                        if policy == "PASSIVE":
                            env["OMP_WAIT_POLICY"] = "PASSIVE"
                        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--dtype", args.dtype,
                                              "--seconds", str(args.seconds), "--layers", str(args.layers),
                                              "--child", config, str(T)],
                                             env=env, capture_output=True, text=True, check=True).stdout
                        results.setdefault((config, policy), []).append(json.loads(out.strip().splitlines()[-1]))
            for (config, policy), runs in results.items():
                calls, seconds = sum(r["calls"] for r in runs), sum(r["seconds"] for r in runs)
                median = statistics.median(r["median"] for r in runs)
                shipped = config == ("watch on" if policy == "default" else "watch off")
                print(f"{T:3d} {config + (' *' if shipped else ''):>12s} {policy:>11s} {calls / seconds:8.1f} "
                      f"{seconds / calls * 1e3:8.3f} {median * 1e3:9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
