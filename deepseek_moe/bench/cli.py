"""``deepseek-moe-bench``: DeepSeekMoE (shared + fine-grained experts) against a Mixtral-style 8x2 MoE and a
dense SwiGLU FFN of the same active FLOPs, on this machine. See docs/benchmarks.md.

    deepseek-moe-bench --quick                       # < 60 s on a 2-core CPU
    deepseek-moe-bench --tokens 1024,4096 --mode fwd,fwdbwd --dtype float32,bfloat16 --json out.json
    deepseek-moe-bench --a deepseek-v3 --b mixtral-8x7b --hidden-size 512 --match none
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .. import __version__
from ..backends import BackendUnavailable, select
from ..config import ConfigError, PRESETS
from .contenders import (DEFAULT_HF_IMPLEMENTATIONS, HF_IMPLEMENTATIONS, MATCHES, Contender, available_backends, configs_for, dense_contender,
                         hf_contender, moe_contender, peer_status)
from .report import add_ratios, render_table, write_csv, write_json, write_plot
from .timing import DECODE_CALLS_PER_SAMPLE, MODES, interleaved, peak_memory, run_once, summarize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = dict(hidden_size=512, ffn_size=1408, tokens="512,2048", mode="fwd,fwdbwd", repeats=3, warmup=1)
DEFAULTS = dict(hidden_size=1024, ffn_size=2816, tokens="1024,4096", mode="fwdbwd", repeats=5, warmup=1)


class UserError(Exception):
    """A bad flag or an impossible request: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deepseek-moe-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, fwd and fwdbwd: the README's main job")
    p.add_argument("--match", default="flops", help=f"pairing rule {MATCHES} (default flops)")
    p.add_argument("--a", help="reference config (a preset name); default the Mixtral-style 8x2")
    p.add_argument("--b", help="compared config (a preset name); default DeepSeekMoE 64 + 2 shared")
    p.add_argument("--hidden-size", type=int, help="H (default 1024; --quick 512)")
    p.add_argument("--ffn-size", type=int, help="F, the Mixtral expert width (default 2816; --quick 1408)")
    p.add_argument("--tokens", help="comma list of T per call (default 1024,4096; --quick 512,2048)")
    p.add_argument("--decode-tokens", default="8", help="comma list of T per call in decode mode (default 8)")
    p.add_argument("--backend", default="auto", help="comma list of backends, 'auto' or 'all' available")
    p.add_argument("--dtype", default="float32", help=f"comma list of {tuple(DTYPES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--mode", help=f"comma list of {MODES} (default fwdbwd; --quick fwd,fwdbwd)")
    p.add_argument("--warmup", type=int, help="untimed calls per contender (default 1)")
    p.add_argument("--repeats", type=int, help="timed calls per contender (default 5; --quick 3)")
    p.add_argument("--peers", default="auto", help="'auto' (every installed peer) or 'none'")
    p.add_argument("--hf-impls", help=f"transformers experts implementations to time, comma list of "
                   f"{HF_IMPLEMENTATIONS} (default eager,grouped_mm; --quick grouped_mm; batched_mm needs O(T*K*I*H) "
                   "memory)")
    p.add_argument("--json", help="write rows and metadata as JSON")
    p.add_argument("--csv", help="write rows as CSV")
    p.add_argument("--plot", help="write a PNG of tokens/s against T (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", action="version", version=f"deepseek-moe {__version__}")
    return p


def _choices(flag: str, text: str, allowed: Sequence[str]) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise UserError(f"{flag} {text!r}: expected a comma list of {', '.join(allowed)}")
    return items


def _ints(flag: str, text: str, low: int = 1) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise UserError(f"{flag} {text!r}: expected a comma list of integers >= {low}")
    return values


def _positive(flag: str, value: Optional[int], default: int, low: int = 1) -> int:
    value = default if value is None else value
    if value < low:
        raise UserError(f"{flag} {value}: expected an integer >= {low}")
    return value


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.hidden_size = _positive("--hidden-size", args.hidden_size, base["hidden_size"])
    args.ffn_size = _positive("--ffn-size", args.ffn_size, base["ffn_size"])
    args.tokens = _ints("--tokens", args.tokens or base["tokens"])
    args.decode_tokens = _ints("--decode-tokens", args.decode_tokens)
    args.modes = _choices("--mode", args.mode or base["mode"], MODES)
    args.dtypes = _choices("--dtype", args.dtype, tuple(DTYPES))
    args.warmup = _positive("--warmup", args.warmup, base["warmup"], low=0)
    args.repeats = _positive("--repeats", args.repeats, base["repeats"])
    _choices("--match", args.match, MATCHES)
    for flag, name in (("--a", args.a), ("--b", args.b)):
        if name is not None and name not in PRESETS:
            raise UserError(f"{flag} {name!r}: unknown preset; expected one of {', '.join(sorted(PRESETS))}")
    if (args.a or args.b) and args.match == "params":
        raise UserError("--a/--b compare presets as they are: use them with --match none (or leave --match out)")
    if args.a or args.b:
        args.match = "none"
    args.peers = _choices("--peers", args.peers, ("auto", "none"))[0]
    default_impls = ("grouped_mm",) if args.quick else DEFAULT_HF_IMPLEMENTATIONS
    args.hf_impls = _choices("--hf-impls", args.hf_impls or ",".join(default_impls), HF_IMPLEMENTATIONS)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r}: expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {args.device!r}: expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device!r}: CUDA is not available in this torch build/machine")
    args.device = device
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'deepseek-moe[bench]'") from None
    return args


def _backends_for(text: str, device: torch.device, dtype: torch.dtype) -> List[str]:
    if text == "all":
        # Triton on CPU means its interpreter, a testing tool far too slow to time: only when asked by name.
        return [n for n in available_backends(device, dtype) if not (n == "triton" and device.type == "cpu")]
    if text == "auto":
        return [select("auto", device, dtype).name]
    names = _choices("--backend", text, ("eager", "torch", "triton", "ext", "megablocks"))
    for name in names:
        try:
            select(name, device, dtype)  # named: a backend that needs a build (ext) builds here
        except BackendUnavailable as err:
            raise UserError(f"--backend {name}: {str(err).split(': ', 1)[-1]}") from None
    return names


def build_contenders(args, dtype: torch.dtype) -> List[Contender]:
    (name_a, cfg_a), (name_b, cfg_b) = configs_for(args.match, args.hidden_size, args.ffn_size, args.a, args.b)
    chosen = _backends_for(args.backend, args.device, dtype)
    out = [moe_contender(name_a, "a", cfg_a, b) for b in chosen]
    out += [moe_contender(name_b, "b", cfg_b, b) for b in chosen]
    for width in sorted({cfg_a.dense_equivalent_width, cfg_b.dense_equivalent_width}):
        out.append(dense_contender(args.hidden_size, width))
    if args.peers == "auto" and peer_status()["transformers"] is None:
        for side, name, cfg in (("a", name_a, cfg_a), ("b", name_b, cfg_b)):
            for impl in args.hf_impls:
                peer = hf_contender(name, side, cfg, impl)
                if peer is not None:
                    out.append(peer)
    return out


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           transient=True)
            task = bar.add_task("benchmark", total=total)
            return bar, lambda desc, steps=1: bar.update(task, advance=steps, description=desc)
        except ImportError:
            pass
    import contextlib
    return contextlib.nullcontext(), lambda desc, steps=1: None


def run(args) -> List[Dict]:
    torch.manual_seed(args.seed)
    device, rows = args.device, []
    plan = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        contenders = build_contenders(args, dtype)
        for mode in args.modes:
            for T in (args.decode_tokens if mode == "decode" else args.tokens):
                plan.append((dtype_name, dtype, contenders, mode, T))
    total = sum(len(c) * (args.warmup + args.repeats + 1) for _, _, c, _, _ in plan)
    bar, advance = _progress(total, not args.no_progress and sys.stderr.isatty())
    modules: Dict[tuple, torch.nn.Module] = {}
    with bar:
        for dtype_name, dtype, contenders, mode, T in plan:
            group = []
            for c in contenders:
                key = (dtype_name, c.name, c.side, c.implementation)
                if key not in modules:
                    # Every contender of one config family runs the same weights: the first one built.
                    source = modules.get((dtype_name, "source", c.family))
                    modules[key] = c.build(source).to(device=device, dtype=dtype)
                    modules.setdefault((dtype_name, "source", c.family), modules[key])
                module = modules[key]
                module.train(mode == "fwdbwd")
                group.append((c, module))
            xs = [torch.randn(T, args.hidden_size, device=device, dtype=dtype, requires_grad=(mode == "fwdbwd"))
                  for _ in range(args.repeats + 1)]
            calls = DECODE_CALLS_PER_SAMPLE if mode == "decode" else 1
            fns = {i: (lambda r, m=module: run_once(m, xs[r], mode)) for i, (_, module) in enumerate(group)}
            advance(f"{dtype_name} {mode} T={T}", len(group) * args.warmup)
            samples = interleaved(fns, args.repeats, device, args.warmup, calls,
                                  on_sample=lambda: advance(f"{dtype_name} {mode} T={T}"))
            for i, (c, module) in enumerate(group):
                median, spread = summarize(samples[i])
                mem = peak_memory(lambda: run_once(module, xs[-1], mode), device)
                advance(f"memory {c.name}")
                work = c.flops_per_token * T * (3 if mode == "fwdbwd" else 1)
                rows.append(dict(config=c.name, implementation=c.implementation, side=c.side, kind=c.kind,
                                 device=str(device),
                                 dtype=dtype_name, mode=mode, tokens=T, total_params=c.total_params,
                                 active_params=c.active_params, flops_per_token=c.flops_per_token,
                                 median_s=median, spread=spread, tokens_per_s=T / median, flops_per_s=work / median,
                                 peak_memory_bytes=mem, max_vio=c.max_vio(module, xs[-1].detach()),
                                 expert_combinations=c.expert_combinations, dense_width=c.dense_width))
    add_ratios(rows)
    return rows


def meta(args) -> Dict:
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return dict(version=__version__, torch=torch.__version__, device=str(device), device_name=name,
                threads=torch.get_num_threads(), match=args.match, hidden_size=args.hidden_size,
                ffn_size=args.ffn_size, peers={k: v or "available" for k, v in peer_status().items()},
                command=" ".join(["deepseek-moe-bench"] + args.argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        rows = run(args)
    except (UserError, ConfigError, BackendUnavailable) as err:
        print(f"deepseek-moe-bench: error: {err}", file=sys.stderr)
        return 2
    info = meta(args)
    title = (f"deepseek-moe-bench  match={args.match}  H={args.hidden_size} F={args.ffn_size}  "
             f"{info['device_name']} ({info['threads']} threads), torch {info['torch']}")
    print(render_table(rows, title))
    print("× ref: time / our layer running the reference config (a: Mixtral-style by default), same backend "
          "where there is one; × dense: time / a dense SwiGLU FFN with the same active expert FLOPs.")
    for peer, reason in peer_status().items():
        if reason is not None:
            print(f"peer {peer}: not run ({reason})")
    if args.json:
        write_json(args.json, info, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        write_plot(args.plot, rows, title)
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
