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
import os
from typing import List, Optional, Sequence

import torch

from .. import __version__
from ..config import PRESETS
from .contenders import DEFAULT_HF_IMPLEMENTATIONS, HF_IMPLEMENTATIONS, MATCHES
from .timing import MODES

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


def _choices(flag: str, text: str, allowed: Sequence[str], also: Sequence[str] = (),
             unlisted: Sequence[str] = ()) -> List[str]:
    """The comma list ``text`` of ``allowed`` names; ``also``: single words the flag takes instead (named in the
    error); ``unlisted``: names accepted here and refused with their reason later (not offered in the error)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed and t not in unlisted]
    if not items or bad:
        alone = f", or one of {', '.join(also)}" if also else ""
        raise UserError(f"{flag} {text!r}: expected a comma list of {', '.join(allowed)}{alone}")
    return items


def _writable(flag: str, path: Optional[str]) -> None:
    """UserError before anything runs where ``path`` cannot be written (its results would be lost at the end)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK) or os.path.isdir(path):
        raise UserError(f"{flag} {path!r}: cannot write there (the folder {folder!r} must exist and be writable)")


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
    args.tokens = _ints("--tokens", base["tokens"] if args.tokens is None else args.tokens)
    args.decode_tokens = _ints("--decode-tokens", args.decode_tokens)
    args.modes = _choices("--mode", base["mode"] if args.mode is None else args.mode, MODES)
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
    if args.peers == "none" and args.hf_impls is not None:
        raise UserError("--hf-impls names transformers' implementations to time as peers, which --peers none "
                        "leaves out: drop one of the two")
    default_impls = ("grouped_mm",) if args.quick else DEFAULT_HF_IMPLEMENTATIONS
    args.hf_impls = _choices("--hf-impls", ",".join(default_impls) if args.hf_impls is None else args.hf_impls,
                             HF_IMPLEMENTATIONS)
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
    _writable("--json", args.json)
    _writable("--plot", args.plot)
    _writable("--csv", args.csv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'deepseek-moe[bench]'") from None
    return args
