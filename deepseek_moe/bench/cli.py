"""``deepseek-moe-bench``: build the contenders, time them interleaved, report (the flags: :mod:`.args`)."""
from __future__ import annotations

import platform
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from ..backends import BackendUnavailable, select
from ..config import ConfigError, MoEConfig
from .args import DTYPES, UserError, _choices, parse  # noqa: F401 (parse: the CLI's entry, re-exported)
from .contenders import (FFN_SIZE_PRESETS, Contender, backend_choices, configs_for, dense_contender, describe,
                         hf_contender, hf_unsupported, moe_contender, peer_status)
from .memory import available_bytes, estimate
from .progress import Progress
from .report import add_ratios, legend, render_table, terminal_width, wrap, write_csv, write_json, write_plot
from .timing import DECODE_CALLS_PER_SAMPLE, interleaved, peak_memory, run_once, summarize


def _backends_for(text: str, device: torch.device, dtype: torch.dtype) -> Tuple[List[str], Dict[str, str]]:
    """(the backends to time, {backend left out of 'all': why})."""
    if text == "all":
        return backend_choices(device, dtype)
    if text == "auto":
        return [select("auto", device, dtype).name], {}
    names = _choices("--backend", text, ("eager", "torch", "triton", "ext"), also=("auto", "all"),
                     unlisted=("megablocks",))
    for name in names:
        try:
            select(name, device, dtype)  # named: a backend that needs a build (ext) builds here
        except BackendUnavailable as err:
            raise UserError(f"--backend {name}: {str(err).split(': ', 1)[-1]}") from None
    return names, {}


def build_contenders(args, dtype: torch.dtype, skipped: Optional[Dict[str, Dict[str, str]]] = None,
                     ) -> List[Contender]:
    """The contenders of one dtype (nothing is built yet); ``skipped`` collects {what, as printed ("backend ext",
    "mixtral-8x2 hf grouped_mm"): {dtype: why not}}."""
    (name_a, cfg_a), (name_b, cfg_b) = _configs(args)
    chosen, left_out = _backends_for(args.backend, args.device, dtype)
    dtype_name = str(dtype).replace("torch.", "")
    for name, reason in left_out.items():
        if skipped is not None:
            skipped.setdefault(f"backend {name}", {})[dtype_name] = reason
    out = [moe_contender(name_a, "a", cfg_a, b) for b in chosen]
    out += [moe_contender(name_b, "b", cfg_b, b) for b in chosen]
    for width in sorted({cfg_a.dense_equivalent_width, cfg_b.dense_equivalent_width}):
        out.append(dense_contender(args.hidden_size, width))
    if args.peers == "auto" and peer_status()["transformers"] is None:
        peers = []
        for side, name, cfg in (("a", name_a, cfg_a), ("b", name_b, cfg_b)):
            for impl in args.hf_impls:
                why = hf_unsupported(cfg, impl, args.device, dtype)
                if why is not None:
                    if skipped is not None:
                        skipped.setdefault(f"{name} hf {impl}", {})[dtype_name] = why
                    continue
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
        for what, reasons in skipped.items():
            by_reason: Dict[str, List[str]] = {}
            for dtype_name, reason in reasons.items():
                by_reason.setdefault(reason, []).append(dtype_name)
            for reason, dtype_names in by_reason.items():
                where = "" if len(dtype_names) == len(args.dtypes) else f" for {', '.join(dtype_names)}"
                print(wrap(f"{what}: skipped{where} ({reason})", width, indent="  "))
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
