"""The one program for a CUDA machine: build, check, test, tune, time and profile in a single call.

    python benchmarks/gpu/run_all.py --out-dir $OUT                  # bf16, three shapes, T = 4096, 16384, 65536
    python benchmarks/gpu/run_all.py --out-dir $OUT --budget 420     # the matrix trimmed to fit 7 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu/run_all.py --smoke      # the whole program on CPU at toy sizes

Steps, each printed with its time; everything lands in ``<out-dir>/gpu_run.json`` (and the tile table in
``<out-dir>/tuned_tiles.json``):

1. **build**: the extension (csrc/, CUDA half on a GPU): its build time, or why it failed.
2. **check**: every backend that runs here (triton, torch, ext) against the eager layer in float64 on the same
   weights and tokens, output and every gradient; each must be within 2x the error of the eager layer run in the
   same dtype (the reference twin) against that float64 truth (plus 1e-3 of slack for fp32 sums).
3. **tests**: ``pytest -m gpu`` (skipped with ``--smoke``: the CPU suite runs those files' CPU twins).
4. **tune** (``--no-tune`` skips it): the tile sweep of :mod:`deepseek_moe.kernels.tuning` per shape; the winners
   go to the package's table (so step 5 runs them) and to the out-dir copy to commit. ``--smoke`` sweeps its first
   shape in the interpreter and writes only the out-dir copy.
5. **time**: per shape, T and mode (fwd, fwd+bwd), interleaved: our triton, torch and ext backends, the dense FFN
   of equal active FLOPs, transformers' own block with ``experts_implementation="grouped_mm"`` (DeepSeek-V3's for a
   shape with shared experts, Mixtral's otherwise), megablocks' dMoE and sonic-moe when they import (else the
   reason is recorded); ms, TFLOP/s, x dense, and each contender's peak memory above what it held before.
6. **profile**: the per-stage split (``deepseek_moe.stages``) of the triton and torch backends at each shape's
   middle T, forward and backward.

``--budget`` (seconds, default 450) trims: a (shape, T) cell whose estimated time (the last cell's, scaled by
T) would pass the deadline is skipped and listed; the tests get at most a quarter of the budget.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import deepseek_moe as dm
from deepseek_moe.bench.contenders import hf_contender
from deepseek_moe.bench.profile import profile_stages
from deepseek_moe.bench.timing import interleaved, peak_memory, run_once
from deepseek_moe.experts import SharedExperts

sys.path.insert(0, str(Path(__file__).parent))
from peers import megablocks_dmoe, sonic_moe  # noqa: E402  (this folder's helper)
from shapes import SHAPES, SMOKE_SHAPES, oracle_check  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Log:
    """Step timing and the JSON record, written after every step (a later failure keeps what was measured), and
    the rate of the last timed cell (seconds per active FLOP) that the budget's estimates scale."""

    def __init__(self, budget: float, out_dir: Optional[Path]):
        self.begin, self.deadline, self.record = time.perf_counter(), time.perf_counter() + budget, {"steps": {}}
        self.out_dir, self.rate = out_dir, None
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def step(self, name: str, result) -> None:
        self.record["steps"][name] = result
        print(f"[{time.perf_counter() - self.begin:6.1f} s] {name}: {json.dumps(result)[:400]}", flush=True)
        self.save()

    def save(self) -> None:
        if self.out_dir is not None:
            (self.out_dir / "gpu_run.json").write_text(json.dumps(self.record, indent=1, default=str))


def build_extension(device: torch.device) -> Dict[str, object]:
    if device.type == "cuda":  # compile for this GPU only (every architecture would take minutes)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*torch.cuda.get_device_capability(device)))
    begin = time.perf_counter()
    try:
        from deepseek_moe import ext
        ext.load()
        return {"built": True, "seconds": round(time.perf_counter() - begin, 1)}
    except Exception as err:  # a compiler or toolkit problem: the ext contender is then left out, saying why
        return {"built": False, "reason": f"{type(err).__name__}: {str(err)[-300:]}"}


def run_tests(seconds: float) -> Dict[str, object]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_triton.py", "tests/test_ext.py",
           "tests/test_gpu_program.py"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(seconds, 10))
        return {"command": " ".join(cmd[2:]), "exit": done.returncode, "tail": done.stdout[-600:]}
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[2:]), "exit": None, "tail": f"stopped after {seconds:.0f} s (budget)"}


def tune(shape: dict, T: int, dtype, device, interpret: bool, seconds: float, out_dir: Optional[Path],
         package: bool) -> Dict[str, object]:
    from deepseek_moe.kernels import heuristics
    from deepseek_moe.kernels.tuning import sweep

    cfg = shape["config"]
    H, I = cfg.hidden_size, cfg.expert_hidden_size
    result = sweep(T, H, I, cfg.num_routed_experts, cfg.top_k, dtype, device, interpret, budget_s=seconds)
    arch = heuristics.cuda_arch(device) if device.type == "cuda" else "interpreter"
    key = heuristics.table_key(arch, dtype, (H, I))
    measured = {"device": str(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tokens": T,
                "shape": shape["name"], **result.measured()}
    for path in ([out_dir / "tuned_tiles.json"] if out_dir else []) + ([heuristics.TABLE_PATH] if package else []):
        heuristics.write_table(path, key, result.best, measured)
    return {"key": key, "best": {k: list(v.__dict__.values()) for k, v in result.best.items()},
            "skipped": result.skipped}


def contenders(cfg: dm.MoEConfig, names: List[str], dtype, device, notes: Dict[str, str]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for name in names:
        try:
            out[name] = dm.DeepSeekMoELayer(cfg.replace(backend=name))
            out[name].backend  # noqa: B018  (selection: raises BackendUnavailable with the reason)
        except Exception as err:
            out.pop(name, None)
            notes[name] = f"{type(err).__name__}: {err}"
    width = cfg.dense_equivalent_width
    out[f"dense-{width}"] = SharedExperts.dense(cfg.hidden_size, width)
    peer = hf_contender("peer", "b", cfg, "grouped_mm")
    try:
        if peer is None:
            raise ValueError("no transformers block has this layout")
        out[f"{peer.name} grouped_mm"] = peer.build(next(iter(out.values())) if names else None)
    except Exception as err:
        notes["hf grouped_mm"] = f"{type(err).__name__}: {str(err)[:200]}"
    for label, make in (("megablocks dMoE", megablocks_dmoe), ("sonic-moe", sonic_moe)):
        module, reason = make(cfg, dtype, device)
        if module is None:
            notes[label] = reason
        else:
            out[label] = module
    for module in out.values():
        module.to(device, dtype)
    return out


def time_shape(shape: dict, tokens: List[int], dtype, device, repeats: int, log: Log, ours: List[str],
               profile_calls: int) -> dict:
    cfg, notes, rows, skipped = shape["config"], {}, [], []
    modules = contenders(cfg, ours, dtype, device, notes)
    dense = f"dense-{cfg.dense_equivalent_width}"
    for T in tokens:
        # The last cell's seconds per FLOP (this shape's or the previous one's; its first cell includes compiles,
        # so this errs long), scaled to this cell's FLOPs.
        estimate = 0.0 if log.rate is None else log.rate * cfg.flops_per_token * T
        if estimate > log.left():
            skipped.append({"tokens": T, "reason": f"budget: ~{estimate:.0f} s needed, {log.left():.0f} s left"})
            continue
        begin = time.perf_counter()
        x = torch.randn(T, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
        for mode in ("fwd", "fwdbwd"):
            for m in modules.values():
                m.train(mode == "fwdbwd")  # fwd: inference (eval, under inference mode)
            flops = cfg.flops_per_token * T * (3 if mode == "fwdbwd" else 1)
            fns = {name: (lambda r, m=m: run_once(m, x, mode)) for name, m in modules.items()}
            times = {k: statistics.median(v) for k, v in interleaved(fns, repeats, device, 1).items()}
            for name, sec in times.items():
                rows.append({"tokens": T, "mode": mode, "contender": name, "ms": sec * 1e3,
                             "tflops": flops / sec / 1e12, "x_dense": sec / times[dense],
                             "peak_bytes": peak_memory(lambda: run_once(modules[name], x, mode), device)
                             if device.type == "cuda" else None})
        log.rate = (time.perf_counter() - begin) / (cfg.flops_per_token * T)
    timed = sorted({r["tokens"] for r in rows})
    middle = timed[len(timed) // 2] if timed else None
    stages = {}
    for name in [n for n in ("triton", "torch") if n in modules and middle is not None]:
        # A profile: (calls + 1) forwards and training steps of one contender, about a cell's share.
        estimate = log.rate * cfg.flops_per_token * middle * (profile_calls + 1) / max(len(modules), 1)
        if estimate > log.left():
            stages[name] = {"skipped": f"budget: ~{estimate:.0f} s needed, {log.left():.0f} s left"}
            continue
        x = torch.randn(middle, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)
        stages[name] = {mode: profile_stages(modules[name], x, mode, profile_calls) for mode in ("fwd", "fwdbwd")}
    return {"rows": rows, "not_run": notes, "skipped": skipped, "stages_tokens": middle, "stages": stages}


def print_rows(name: str, result: dict) -> None:
    print(f"== {name}")
    for peer, why in result["not_run"].items():
        print(f"   not run: {peer}: {why}")
    for r in result["rows"]:
        mem = "" if r["peak_bytes"] is None else f" {r['peak_bytes'] / 2 ** 30:6.2f} GiB"
        print(f"{r['tokens']:6d} {r['mode']:7s} {r['contender']:28s} {r['ms']:9.2f} ms {r['tflops']:7.1f} TFLOP/s "
              f"{r['x_dense']:6.2f}x dense{mem}")
    for s in result["skipped"]:
        print(f"   skipped T={s['tokens']}: {s['reason']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16384,65536")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole program")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True, help="run the tile sweep")
    p.add_argument("--smoke", action="store_true", help="toy sizes; on CPU with TRITON_INTERPRET=1")
    p.add_argument("--out-dir", default=None, help="where gpu_run.json and tuned_tiles.json go")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("run_all.py: no CUDA device; use --smoke (with TRITON_INTERPRET=1) for a CPU run", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else None
    dtype, log = DTYPES[args.dtype], Log(args.budget, out_dir)
    shapes = SMOKE_SHAPES if args.smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    tokens = [16, 32] if args.smoke else [int(t) for t in args.tokens.split(",")]
    repeats = 1 if args.smoke else args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    log.record.update(device=name, torch=torch.__version__, dtype=args.dtype, date=time.strftime("%Y-%m-%d"),
                      command=" ".join(sys.argv))
    print(f"device: {name}; torch {torch.__version__}; {args.dtype}; budget {args.budget:.0f} s", flush=True)
    ours = ["triton", "torch", "ext"]
    log.step("build", build_extension(device))
    first = next(iter(shapes.values()))
    log.step("check", oracle_check(first["config"], ours, dtype, device, min(tokens[0], 1024)))
    log.step("tests", {"skipped": "--smoke"} if args.smoke else run_tests(log.left() / 4))
    if args.tune is not False:  # the smoke run tunes its first shape in the interpreter (the plumbing)
        for shape in list(shapes.values())[:1] if args.smoke else shapes.values():
            share = log.left() / (2 * len(shapes))
            log.step(f"tune {shape['name']}", tune(shape, tokens[len(tokens) // 2], dtype, device,
                                                    device.type == "cpu", share, out_dir, not args.smoke))
    log.record["shapes"] = {}
    fields = ("hidden_size", "expert_hidden_size", "num_routed_experts", "top_k", "num_shared_experts", "score_func")
    for i, (key, shape) in enumerate(shapes.items()):
        cells = tokens[:1] if args.smoke and i else tokens  # smoke: one T past the first shape (under a minute)
        result = time_shape(shape, cells, dtype, device, repeats, log, ours, 1 if args.smoke else 3)
        print_rows(shape["name"], result)
        log.record["shapes"][key] = {"config": {n: getattr(shape["config"], n) for n in fields}, **result}
        log.save()
    log.step("time", {k: {"rows": len(v["rows"]), "skipped": len(v["skipped"])}
                      for k, v in log.record["shapes"].items()})
    failures = failed_steps(log.record["steps"], device)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def failed_steps(steps: Dict[str, object], device: torch.device) -> List[str]:
    """What makes the run fail: a backend off the float64 truth; on a GPU, triton or torch not running at all (the
    extension may fail to build there: its step says why); GPU tests that failed or did not finish."""
    failures = [f"check {b}: {r}" for b, r in steps["check"].items() if isinstance(r, dict) and r.get("ok") is False]
    if device.type == "cuda":
        failures += [f"check {b}: {steps['check'][b]['not_run']}" for b in ("triton", "torch")
                     if "not_run" in steps["check"].get(b, {})]
    tests = steps.get("tests", {})
    if "exit" in tests and tests["exit"] != 0:
        failures.append(f"tests: exit {tests['exit']}: {tests['tail'][-300:]}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
