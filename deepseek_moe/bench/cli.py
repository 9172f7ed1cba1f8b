"""``deepseek-moe-bench``: a reference MoE config ("a", by default a Mixtral-style 8x2) against a compared one
("b", by default DeepSeekMoE: 64 fine-grained + 2 shared experts) and both against a dense SwiGLU FFN of the same
active FLOPs, on this machine. See docs/benchmarks.md.

    deepseek-moe-bench --quick                       # < 60 s on a 2-core CPU
    deepseek-moe-bench --tokens 1024,4096 --mode fwd,fwdbwd --dtype float32,bfloat16 --json out.json
    deepseek-moe-bench --a qwen2-moe --b deepseek-moe-16b --hidden-size 512 --match none

Before building anything it estimates the memory the run needs and refuses (exit 2) one that cannot fit.
"""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from ..backends import BackendUnavailable, select
from ..config import ConfigError, MoEConfig, PRESETS
from .contenders import (DEFAULT_HF_IMPLEMENTATIONS, FFN_SIZE_PRESETS, HF_IMPLEMENTATIONS, MATCHES, Contender,
                         backend_choices, configs_for, dense_contender, describe, hf_contender, moe_contender,
                         peer_status)
from .memory import available_bytes, estimate
from .progress import Progress
from .report import add_ratios, legend, render_table, terminal_width, wrap, write_csv, write_json, write_plot
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
    p.add_argument("--match", default="flops", help=f"pairing rule {MATCHES} (default flops; none with --a/--b)")
    p.add_argument("--a", help="reference config a, the one '× ref' divides by (a preset name); default mixtral-8x2")
    p.add_argument("--b", help="compared config b (a preset name); default DeepSeekMoE 64 + 2 shared (deepseek-64x)")
    p.add_argument("--hidden-size", type=int, help="H (default 1024; --quick 512)")
    p.add_argument("--ffn-size", type=int, help="F, the expert width of mixtral-8x2 (deepseek-64x gets F/8; other "
                   "presets keep their own; default 2816; --quick 1408)")
    p.add_argument("--tokens", help="comma list of T per call (default 1024,4096; --quick 512,2048)")
    p.add_argument("--decode-tokens", default="8", help="comma list of T per call in decode mode (default 8)")
    p.add_argument("--backend", default="auto", help="comma list of backends, 'auto', or 'all' that can run here "
                   "(the others are listed with the reason)")
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
    p.add_argument("--no-progress", action="store_true", help="no progress on stderr (a bar on a terminal, else a "
                   "line per timed sample)")
    p.add_argument("--skip-memory-check", action="store_true", help="run even when the memory estimate exceeds the "
                   "available memory")
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
    if args.match not in MATCHES:
        raise UserError(f"--match {args.match!r}: expected one of {', '.join(MATCHES)}")
    for flag, name in (("--a", args.a), ("--b", args.b)):
        if name is not None and name not in PRESETS:
            raise UserError(f"{flag} {name!r}: unknown preset; expected one of {', '.join(sorted(PRESETS))}")
    if (args.a or args.b) and args.match == "params":
        raise UserError("--a/--b compare presets as they are: use them with --match none (or leave --match out)")
    if args.a or args.b:
        args.match = "none"  # said in the title; --help says so too
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


def _backends_for(text: str, device: torch.device, dtype: torch.dtype) -> Tuple[List[str], Dict[str, str]]:
    """(the backends to time, {backend left out of 'all': why})."""
    if text == "all":
        return backend_choices(device, dtype)
    if text == "auto":
        return [select("auto", device, dtype).name], {}
    names = _choices("--backend", text, ("eager", "torch", "triton", "ext", "megablocks"))
    for name in names:
        try:
            select(name, device, dtype)  # named: a backend that needs a build (ext) builds here
        except BackendUnavailable as err:
            raise UserError(f"--backend {name}: {str(err).split(': ', 1)[-1]}") from None
    return names, {}


def build_contenders(args, dtype: torch.dtype, skipped: Optional[Dict[str, Dict[str, str]]] = None,
                     ) -> List[Contender]:
    """The contenders of one dtype (nothing is built yet); ``skipped`` collects {backend: {dtype: why not}}."""
    (name_a, cfg_a), (name_b, cfg_b) = _configs(args)
    chosen, left_out = _backends_for(args.backend, args.device, dtype)
    for name, reason in left_out.items():
        if skipped is not None:
            skipped.setdefault(name, {})[str(dtype).replace("torch.", "")] = reason
    out = [moe_contender(name_a, "a", cfg_a, b) for b in chosen]
    out += [moe_contender(name_b, "b", cfg_b, b) for b in chosen]
    for width in sorted({cfg_a.dense_equivalent_width, cfg_b.dense_equivalent_width}):
        out.append(dense_contender(args.hidden_size, width))
    if args.peers == "auto" and peer_status()["transformers"] is None:
        peers = []
        for side, name, cfg in (("a", name_a, cfg_a), ("b", name_b, cfg_b)):
            for impl in args.hf_impls:
                peer = hf_contender(name, side, cfg, impl)
                if peer is not None:
                    peers.append(peer)
        if len({(p.name, p.side) for p in peers}) > len({p.name for p in peers}):
            for p in peers:  # both configs map to the same transformers block: say whose weights each runs
                p.name = f"{p.name}:{p.side}"
        out += peers
    return out


def plan(args) -> "tuple[List[tuple], Dict[str, Dict[str, str]]]":
    """[(dtype name, dtype, contenders)] and the backends that ``--backend all`` leaves out, nothing built."""
    skipped: Dict[str, Dict[str, str]] = {}
    groups = [(name, DTYPES[name], build_contenders(args, DTYPES[name], skipped)) for name in args.dtypes]
    return groups, skipped


def check_memory(args, groups) -> str:
    """The memory estimate as one line; raises UserError when it exceeds the available memory."""
    est = estimate(groups, args.modes, args.tokens, args.decode_tokens, args.hidden_size, args.repeats, args.device)
    available = available_bytes(args.device)
    line = est.line(available, args.device)
    if not est.fits(available) and not args.skip_memory_check:
        raise UserError(f"not enough memory: {line.split(': ', 1)[1]}; {est.advice()} (or pass --skip-memory-check)")
    return line


def run(args, groups: Optional[List[tuple]] = None) -> List[Dict]:
    """Time every contender of ``groups`` (default :func:`plan`'s) and return the table's rows."""
    torch.manual_seed(args.seed)
    groups = groups if groups is not None else plan(args)[0]
    steps = []
    for dtype_name, dtype, contenders in groups:
        for mode in args.modes:
            for T in (args.decode_tokens if mode == "decode" else args.tokens):
                steps.append((dtype_name, dtype, contenders, mode, T))
    samples_total = sum(len(c) * args.repeats for _, _, c, _, _ in steps)
    steps_total = sum(len(c) * (args.warmup + args.repeats + 1) for _, _, c, _, _ in steps)
    progress = Progress.for_stream(samples_total, steps_total, not args.no_progress)
    modules: Dict[tuple, torch.nn.Module] = {}
    rows: List[Dict] = []
    with progress:
        for dtype_name, dtype, contenders, mode, T in steps:
            if any(key[0] != dtype_name for key in modules):
                modules.clear()  # the previous dtype's modules: free them before building this one's
            rows += _time_step(args, modules, progress, dtype_name, dtype, contenders, mode, T)
    add_ratios(rows)
    return rows


def _time_step(args, modules: Dict[tuple, torch.nn.Module], progress: Progress, dtype_name: str, dtype: torch.dtype,
               contenders: List[Contender], mode: str, T: int) -> List[Dict]:
    """The rows of one (dtype, mode, T): build what ``modules`` lacks, time the contenders interleaved, measure
    each one's peak memory and MaxVio."""
    device = args.device
    where = f"{mode} T={T} {dtype_name}"
    progress.note(f"{where}: building and warming up {len(contenders)} contenders")
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
    # One sequence of T tokens, as a transformer block hands it over: configs whose balance loss is per sequence
    # need the (batch, seq, H) shape in training.
    xs = [torch.randn(1, T, args.hidden_size, device=device, dtype=dtype, requires_grad=(mode == "fwdbwd"))
          for _ in range(args.repeats + 1)]
    calls = DECODE_CALLS_PER_SAMPLE if mode == "decode" else 1
    fns = {i: (lambda r, m=module: run_once(m, xs[r], mode)) for i, (_, module) in enumerate(group)}
    progress.advance(len(group) * args.warmup)
    names = [f"{where} {c.name} [{c.implementation}]" for c, _ in group]
    samples = interleaved(fns, args.repeats, device, args.warmup, calls,
                          on_sample=lambda i, seconds: progress.sample(names[i], seconds))
    rows = []
    for i, (c, module) in enumerate(group):
        median, spread = summarize(samples[i])
        mem = peak_memory(lambda: run_once(module, xs[-1], mode), device)
        progress.advance(1)
        work = c.flops_per_token * T * (3 if mode == "fwdbwd" else 1)
        rows.append(dict(config=c.name, implementation=c.implementation, side=c.side, kind=c.kind,
                         device=str(device), dtype=dtype_name, mode=mode, tokens=T, total_params=c.total_params,
                         active_params=c.active_params, flops_per_token=c.flops_per_token,
                         median_s=median, spread=spread, tokens_per_s=T / median, flops_per_s=work / median,
                         peak_memory_bytes=mem, max_vio=c.max_vio(module, xs[-1].detach().flatten(0, 1)),
                         expert_combinations=c.expert_combinations, dense_width=c.dense_width,
                         layout=describe(c.config) if c.config is not None else f"dense {c.dense_width}",
                         runs_config=c.family))
    return rows


def _configs(args) -> "tuple[tuple[str, MoEConfig], tuple[str, MoEConfig]]":
    return configs_for(args.match, args.hidden_size, args.ffn_size, args.a, args.b)


def title(args, info: Dict) -> str:
    """What the run compares, on which machine: the two configs by name and layout, H, the matching rule."""
    (name_a, cfg_a), (name_b, cfg_b) = _configs(args)
    ffn = f" F={args.ffn_size}" if info["ffn_size"] is not None else ""
    return (f"deepseek-moe-bench: a = {name_a} ({describe(cfg_a)}, the reference) vs b = {name_b} "
            f"({describe(cfg_b)}), H={args.hidden_size}{ffn}, match={args.match}; {'/'.join(args.dtypes)} on "
            f"{info['device_name']} ({info['threads']} threads), torch {info['torch']}")


def meta(args) -> Dict:
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    (name_a, cfg_a), (name_b, cfg_b) = _configs(args)
    uses_ffn = name_a in FFN_SIZE_PRESETS or name_b in FFN_SIZE_PRESETS or args.match != "none"
    configs = {name: dict(layout=describe(cfg), num_routed_experts=cfg.num_routed_experts,
                          expert_hidden_size=cfg.expert_hidden_size, top_k=cfg.top_k,
                          num_shared_experts=cfg.num_shared_experts, shared_width=cfg.shared_width,
                          total_params=cfg.total_params, active_params=cfg.active_params)
               for name, cfg in ((name_a, cfg_a), (name_b, cfg_b))}
    return dict(version=__version__, torch=torch.__version__, device=str(device), device_name=name,
                threads=torch.get_num_threads(), match=args.match, hidden_size=args.hidden_size,
                ffn_size=args.ffn_size if uses_ffn else None, reference=name_a, compared=name_b, configs=configs,
                peers={k: v or "available" for k, v in peer_status().items()},
                command=" ".join(["deepseek-moe-bench"] + args.argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        groups, skipped = plan(args)
        memory_line = check_memory(args, groups)
        width = terminal_width()
        for backend, reasons in skipped.items():
            by_reason: Dict[str, List[str]] = {}
            for dtype_name, reason in reasons.items():
                by_reason.setdefault(reason, []).append(dtype_name)
            for reason, dtype_names in by_reason.items():
                where = "" if len(dtype_names) == len(args.dtypes) else f" for {', '.join(dtype_names)}"
                print(wrap(f"backend {backend}: skipped{where} ({reason})", width, indent="  "))
        print(wrap(memory_line, width, indent="  "), flush=True)
        rows = run(args, groups)
    except (UserError, ConfigError, BackendUnavailable) as err:
        print(f"deepseek-moe-bench: error: {err}", file=sys.stderr)
        return 2
    info = meta(args)
    info["title"] = title(args, info)
    print(render_table(rows, info["title"], width))
    print(legend(rows, width))
    for peer, reason in peer_status().items():
        if reason is not None:
            print(wrap(f"peer {peer}: not run ({reason})", width, indent="  "))
    if args.json:
        write_json(args.json, info, rows)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        write_plot(args.plot, rows, info["title"])
    return 0


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())
