"""The CPU ratios of docs/benchmarks.md for two revisions of the package, measured in one process.

    git worktree add /tmp/base <revision>
    python benchmarks/before_after_cpu.py --base /tmp/base        # this checkout ("after") against /tmp/base
    python benchmarks/before_after_cpu.py --base /tmp/base --prefill   # only the ext layers' bf16 prefill
    python benchmarks/before_after_cpu.py --base /tmp/base --decode    # only the ext layers' decode steps

The older revision's package and its csrc/ are copied under another name (``deepseek_moe_before``, its custom-op
namespace and extension renamed with it) so both load into this process; every contender of a measure is timed
interleaved, round by round (the package's own timing loop), so drift of a shared machine reaches all alike.
Measures, fp32 on CPU:

* layer / dense: the layer's forward+backward (T = 4096, H = 1024, 64 routed experts of 352 + 2 shared, top-6) over
  a dense SwiGLU FFN of equal active FLOPs (width 2816);
* 64x / 8x2: DeepSeekMoE 64 routed of 176 + 2 shared, top-14, over the Mixtral-style 8 of 1408, top-2
  (``deepseek-moe-bench``'s default pair at F = 1408), forward+backward at T = 4096;
* decode: T = 1 under inference mode over a dense FFN of the same weight bytes, each call on the next of 8 layers
  (their weights together far exceed the L3 cache, as in a model's decode step).

and, where both revisions' extensions build: bf16 prefill (inference) at T = 512 and 2048 of the ext layers (H =
1024, 64 x 352 + 2 shared, top-6) over the dense FFN of equal active FLOPs (``--prefill``: this measure alone);
``--decode`` alone: the same ext layers' decode steps, T = 1 and 16 in bf16 and fp32, cold (8 layers cycled), over
the dense FFN of the same weight bytes (T = 1: the experts touched + 2 shared; T = 16: width 8 · 352).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import deepseek_moe as after  # noqa: E402
from deepseek_moe.bench.timing import interleaved, run_once  # noqa: E402
from deepseek_moe.experts import SharedExperts  # noqa: E402


def load_before(base: str, into: str):
    """The package of checkout ``base``, imported as ``deepseek_moe_before``."""
    target = os.path.join(into, "deepseek_moe_before")
    shutil.copytree(os.path.join(base, "deepseek_moe"), target,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    if os.path.isdir(os.path.join(base, "csrc")):  # the extension's sources, next to the package as in a checkout
        shutil.copytree(os.path.join(base, "csrc"), os.path.join(into, "csrc"))
    for folder, _, files in itertools.chain(os.walk(target), os.walk(os.path.join(into, "csrc"))):
        for name in files:
            if name.endswith((".py", ".cpp", ".h", ".cu", ".cuh")):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(text.replace("deepseek_moe", "deepseek_moe_before"))
    sys.path.insert(0, into)
    import deepseek_moe_before

    return deepseek_moe_before


def pair(before, cfg: dict):
    """(after's layer, before's layer with the same weights)."""
    new = after.DeepSeekMoELayer(**cfg, backend="torch")
    old = before.DeepSeekMoELayer(**cfg, backend="torch")
    old.load_state_dict(new.state_dict())
    return new, old


def medians(fns: dict, rounds: int, **kw) -> dict:
    return {k: statistics.median(v) for k, v in interleaved(fns, rounds, torch.device("cpu"), **kw).items()}


def extensions_load(before, measure: str) -> bool:
    """Whether both revisions' extensions load (build); if not, says which measure is left out and why."""
    try:
        for package in (after, before):
            importlib.import_module(package.__name__ + ".ext").load()
    except Exception as e:  # noqa: BLE001 -- a measure that cannot run is reported, not fatal
        print(f"{measure} left out: an extension did not load ({type(e).__name__}: {e})", flush=True)
        return False
    return True


def prefill_rows(before, rounds: int) -> list:
    """bf16 prefill of the ext layers, after and before, over the dense FFN of equal active FLOPs; [] (said why)
    where either revision's extension does not build."""
    if not extensions_load(before, "bf16 prefill"):
        return []
    cfg = dict(hidden_size=1024, expert_hidden_size=352, num_routed_experts=64, num_shared_experts=2, top_k=6,
               score_func="sigmoid", norm_topk_prob=True)
    new = after.DeepSeekMoELayer(**cfg, backend="ext").to(torch.bfloat16).eval()
    old = before.DeepSeekMoELayer(**cfg, backend="ext").to(torch.bfloat16).eval()
    old.load_state_dict(new.state_dict())
    dense = SharedExperts.dense(1024, new.config.dense_equivalent_width).to(torch.bfloat16).eval()
    rows = []
    for T in (512, 2048):
        xs = [torch.randn(T, 1024, dtype=torch.bfloat16) for _ in range(rounds + 1)]
        with torch.inference_mode():
            if not torch.equal(new(xs[0]), old(xs[0])):
                print(f"note: at T = {T} the two revisions' outputs differ", flush=True)
            t = medians({name: (lambda r, m=m: m(xs[r])) for name, m in
                         (("after", new), ("before", old), ("dense", dense))}, rounds)
        rows.append((f"bf16 prefill T={T}, ext layer / dense FFN", t["before"] / t["dense"], t["after"] / t["dense"]))
    return rows


def cycling(layers: list, denses: list, xs: list) -> dict:
    """after, before and dense contenders, each call on the next of its modules with the next input (cold weights)."""
    mods = {"after": [n for n, _ in layers], "before": [o for _, o in layers], "dense": denses}
    calls = {name: itertools.cycle(list(zip(ms, xs))) for name, ms in mods.items()}
    return {name: (lambda r, c=c: (lambda m, v: m(v))(*next(c))) for name, c in calls.items()}


def touched_experts(layers: list, xs: list) -> int:
    """The median number of routed experts a call of the after layers reaches."""
    return int(statistics.median(int(n.route(v)[1].counts_E.count_nonzero()) for (n, _), v in zip(layers, xs)))


def decode_rows(before, rounds: int) -> list:
    """Decode steps of the ext layers (the decode op, fused), after and before, over the dense FFN of the same weight
    bytes, T = 1 and 16 in bf16 and fp32, each call on the next of 8 layers (cold weights); [] (said why) where
    either revision's extension does not build."""
    if not extensions_load(before, "ext decode"):
        return []
    H, I = 1024, 352
    cfg = dict(hidden_size=H, expert_hidden_size=I, num_routed_experts=64, num_shared_experts=2, top_k=6)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        layers = []
        for _ in range(8):
            new = after.DeepSeekMoELayer(**cfg, backend="ext").to(dtype).eval()
            old = before.DeepSeekMoELayer(**cfg, backend="ext").to(dtype).eval()
            old.load_state_dict(new.state_dict())
            layers.append((new, old))
        for T in (1, 16):
            xs = [torch.randn(T, H, dtype=dtype) for _ in range(8)]
            with torch.inference_mode():
                touched = touched_experts(layers, xs)
                if not all(torch.equal(n(v), o(v)) for (n, o), v in zip(layers, xs)):
                    print(f"note: {dtype} T = {T}: the two revisions' outputs differ", flush=True)
            width = ((touched if T == 1 else 6) + 2) * I  # T = 1: a token's top-6 experts; T = 16: 8 · 352
            denses = [SharedExperts.dense(H, width).to(dtype).eval() for _ in range(8)]
            with torch.inference_mode():
                t = medians(cycling(layers, denses, xs), rounds, warmup=2, calls=16 if T == 1 else 4)
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            rows.append((f"ext decode T={T} {name}, layer / dense FFN", t["before"] / t["dense"],
                         t["after"] / t["dense"]))
            print(f"{name} T={T}: after {t['after'] * 1e3:.3f} ms, before {t['before'] * 1e3:.3f} ms, "
                  f"dense {t['dense'] * 1e3:.3f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a checkout of the revision to compare against")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prefill", action="store_true", help="only the ext layers' bf16 prefill")
    p.add_argument("--decode", action="store_true", help="only the ext layers' decode steps (bf16, fp32; T = 1, 16)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, T = 1024, 4096
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(os.path.abspath(args.base), tmp)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds; "
              f"before = {args.base}, after = {HERE}", flush=True)
        if args.decode:
            return report(decode_rows(before, args.rounds))
        rows = prefill_rows(before, args.rounds)
        if args.prefill:
            return report(rows)
        x = torch.randn(1, T, H, requires_grad=True)
        step = lambda m: (lambda r: run_once(m, x, "fwdbwd"))  # noqa: E731
        new, old = pair(before, dict(hidden_size=H, expert_hidden_size=352, num_routed_experts=64,
                                     num_shared_experts=2, top_k=6))
        t = medians({"after": step(new), "before": step(old), "dense": step(SharedExperts.dense(H, 2816))},
                    args.rounds, warmup=1)
        rows.append(("fp32 fwd+bwd T=4096, layer / dense FFN", t["before"] / t["dense"], t["after"] / t["dense"]))
        fine = pair(before, dict(hidden_size=H, expert_hidden_size=176, num_routed_experts=64, num_shared_experts=2,
                                 top_k=14))
        coarse = pair(before, dict(hidden_size=H, expert_hidden_size=1408, num_routed_experts=8,
                                   num_shared_experts=0, top_k=2, norm_topk_prob=True))
        t = medians({"after 64x": step(fine[0]), "before 64x": step(fine[1]), "after 8x2": step(coarse[0]),
                     "before 8x2": step(coarse[1])}, args.rounds, warmup=1)
        rows.append(("fp32 fwd+bwd T=4096, 64x / 8x2", t["before 64x"] / t["before 8x2"],
                     t["after 64x"] / t["after 8x2"]))
        layers = [tuple(m.eval() for m in pair(before, dict(hidden_size=H, expert_hidden_size=352,
                                                           num_routed_experts=64, num_shared_experts=2, top_k=6)))
                  for _ in range(8)]
        xs = [torch.randn(1, H) for _ in range(8)]
        with torch.inference_mode():
            touched = touched_experts(layers, xs)
        denses = [SharedExperts.dense(H, (touched + 2) * 352) for _ in range(8)]
        with torch.inference_mode():
            t = medians(cycling(layers, denses, xs), 15, warmup=2, calls=16)
        rows.append(("decode T=1 fp32, layer / dense of equal bytes", t["before"] / t["dense"],
                     t["after"] / t["dense"]))
    return report(rows)


def report(rows) -> int:
    print(f"\n{'ratio':48s} {'before':>7s} {'after':>7s} {'after/before':>13s}")
    for name, b, a in rows:
        print(f"{name:48s} {b:7.3f} {a:7.3f} {a / b:13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
