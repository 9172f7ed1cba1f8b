"""Benchmark rows: ratios, the terminal tables and their legend, JSON, CSV and the tokens/s plot.

The terminal report fits the terminal's width (rich's own detection: ``COLUMNS``, else the terminal, else 80): the
timing table keeps its first columns and drops the least important ones that do not fit; the per-config columns
(parameters, FLOPs, expert combinations) go to a second table, one row per config.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import textwrap
from typing import Dict, List, Optional, Sequence

COLUMNS = [
    # (key, table header, format): every row's measured and static columns, the order of JSON and CSV.
    ("config", "config", "{}"),
    ("implementation", "impl", "{}"),
    ("device", "device", "{}"),
    ("dtype", "dtype", "{}"),
    ("mode", "mode", "{}"),
    ("tokens", "T", "{}"),
    ("total_params", "params", "{:.3g}"),
    ("active_params", "active", "{:.3g}"),
    ("flops_per_token", "FLOP/tok", "{:.3g}"),
    ("median_s", "median s", "{:.4f}"),
    ("spread", "spread", "{:.0%}"),
    ("tokens_per_s", "tok/s", "{:.4g}"),
    ("flops_per_s", "FLOP/s", "{:.3g}"),
    ("ratio_to_ref", "× ref", "{:.2f}"),
    ("ratio_to_dense", "× dense", "{:.2f}"),
    ("peak_memory_bytes", "peak MiB", "{:.1f}"),
    ("max_vio", "MaxVio", "{:.2f}"),
    ("expert_combinations", "combos", "{:.3g}"),
    ("layout", "layout", "{}"),
    ("ref_config", "ref config", "{}"),
]
_HEADER = {k: h for k, h, _ in COLUMNS}
_FORMAT = {k: f for k, _, f in COLUMNS}
_LEFT = ("config", "implementation", "dtype", "mode", "layout")
# The timing table: the first REQUIRED_TIMING columns always, then the others while they fit, in this order.
TIMING_COLUMNS = ["config", "implementation", "dtype", "mode", "tokens", "median_s", "ratio_to_ref", "ratio_to_dense",
                  "peak_memory_bytes", "spread", "max_vio", "tokens_per_s", "flops_per_s"]
REQUIRED_TIMING = 8
CONFIG_COLUMNS = ["config", "layout", "total_params", "active_params", "flops_per_token", "expert_combinations"]
REQUIRED_CONFIG = 2
GROUP_KEYS = ("device", "dtype", "mode", "tokens")


def add_ratios(rows: List[Dict]) -> None:
    """Fill ``ratio_to_ref`` (time / the reference row of the same group: our layer running config 'a', the same
    backend if there is one; ``ref_config`` names it) and ``ratio_to_dense`` (time / the dense row of the same
    group and width)."""
    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    for group in groups.values():
        refs = [r for r in group if r["side"] == "a" and r["kind"] == "layer"]
        dense = {r["dense_width"]: r for r in group if r["side"] == "dense"}
        for row in group:
            same = [r for r in refs if r["implementation"] == row["implementation"]]
            ref = (same or refs or [row])[0]
            row["ratio_to_ref"] = row["median_s"] / ref["median_s"]
            row["ref_config"], row["ref_implementation"] = ref["config"], ref["implementation"]
            base = dense.get(row["dense_width"])
            row["ratio_to_dense"] = row["median_s"] / base["median_s"] if base else float("nan")


def terminal_width() -> int:
    """The width to print at: rich's (``COLUMNS``, else the terminal's, else 80), or the same from shutil."""
    try:
        from rich.console import Console
    except ImportError:
        return shutil.get_terminal_size((80, 24)).columns
    return Console(file=io.StringIO()).width


_SI = ("total_params", "active_params", "flops_per_token", "tokens_per_s", "flops_per_s")


def _cell(row: Dict, key: str) -> str:
    value = row[key]
    if key == "peak_memory_bytes":
        value = value / 2**20
    elif key in _SI:
        return si(value)
    elif key == "expert_combinations":
        return f"{value}" if value < 10**6 else f"{value:.2g}".replace("e+", "e")
    return _FORMAT[key].format(value)


def si(value: float) -> str:
    """A count in three digits with an SI prefix: 1.97M, 805M, 7.1G."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}"
    return f"{value:.3g}"


def _render(keys: Sequence[str], rows: List[Dict], width: int) -> str:
    """The rows' ``keys`` as a table, natural width (rich if installed, else aligned text), no wider than
    ``width`` (rich folds cells; the plain text folds each line)."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        cells = [[_HEADER[k] for k in keys]] + [[_cell(r, k) for k in keys] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
        lines = []
        for n, line in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if k in _LEFT else c.rjust(w) for k, c, w in zip(keys, line, widths)))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(folded for line in lines for folded in (textwrap.wrap(line.rstrip(), width) or [""]))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    for key in keys:
        table.add_column(_HEADER[key], justify="left" if key in _LEFT else "right", overflow="fold")
    for r in rows:
        table.add_row(*[_cell(r, k) for k in keys])
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def _fitted(keys: List[str], required: int, rows: List[Dict], width: int) -> "tuple[str, List[str]]":
    """The table of the most ``keys`` that fit ``width`` (dropping from the end, never the first ``required``),
    and the keys dropped. If even the required ones do not fit, their cells fold."""
    keys = list(keys)
    dropped: List[str] = []
    text = _render(keys, rows, 10**4)
    while len(keys) > required and _widest(text) > width:
        dropped.insert(0, keys.pop())
        text = _render(keys, rows, 10**4)
    return (text if _widest(text) <= width else _render(keys, rows, width)), dropped


def _widest(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def render_table(rows: List[Dict], title: str, width: Optional[int] = None) -> str:
    """The timing table under ``title``, then the per-config table, then what was left out, all within ``width``
    (default :func:`terminal_width`). The dtype column appears when the run has several dtypes (else it is in
    the title)."""
    width = width or terminal_width()
    keys = [k for k in TIMING_COLUMNS if k != "dtype" or len({r["dtype"] for r in rows}) > 1]
    timing, dropped = _fitted(keys, len([k for k in TIMING_COLUMNS[:REQUIRED_TIMING] if k in keys]), rows, width)
    configs = []
    for r in rows:
        if r["kind"] != "peer" and r["config"] not in {c["config"] for c in configs}:
            configs.append(r)
    config_table, dropped_config = _fitted(CONFIG_COLUMNS, REQUIRED_CONFIG, configs, width)
    out = [wrap(title, width), timing, "", config_table]
    if dropped or dropped_config:
        out.append(wrap("Left out at this width (see --json/--csv, or a wider terminal): "
                        + ", ".join(_HEADER[k] for k in dropped + dropped_config), width))
    return "\n".join(out)


def legend(rows: List[Dict], width: Optional[int] = None) -> str:
    """A few lines saying what the columns mean and which row is the reference."""
    width = width or terminal_width()
    ref = next(r for r in rows if r["side"] == "a" and r["kind"] == "layer")
    widths = {}  # dense width -> the configs ("a", "b") whose × dense divides by it
    for r in rows:
        if r["kind"] == "layer":
            widths.setdefault(r["dense_width"], set()).add(r["side"])
    dense = [f"dense-{w}" + ("" if len(widths) == 1 else f" for config {' and '.join(sorted(sides))}")
             for w, sides in sorted(widths.items())]
    others = "dense and hf-*" if any(r["kind"] == "peer" for r in rows) else "dense"
    lines = [
        f"× ref: median time / the reference's: our layer running config a = {ref['config']} on the same backend "
        f"(its rows read 1.00; {others} rows divide by its {ref['implementation']} row); below 1 is faster.",
        f"× dense: median time / a dense SwiGLU FFN with the same active expert FLOPs ({', '.join(dense)}).",
        "spread: (max − min) / median of the timed repeats; above ~10% the machine was busy, rerun with more "
        "--repeats.",
        "peak MiB: extra memory one call holds at its peak (CPU: PyTorch tensors; CUDA: the caching allocator).",
        "MaxVio: max expert load / mean load − 1 of the routing (random init, random input); 0 is balanced.",
        "tok/s: T / median; FLOP/s: forward FLOPs per token (2 × active parameters) × T / median, × 3 for fwdbwd "
        "(the backward counted as twice the forward).",
        "combos: expert combinations a token can pick, C(E, K); layout: E routed × width I, top-K, shared experts.",
    ]
    if any(r["kind"] == "peer" for r in rows):
        lines.append("hf-*: transformers' own block on the same weights as its config; impl is its experts "
                     "implementation.")
    return "\n".join(wrap(line, width, indent="  ") for line in lines)


def wrap(text: str, width: int, indent: str = "") -> str:
    """``text`` folded to ``width`` columns, continuation lines indented."""
    return "\n".join(textwrap.wrap(text, width, subsequent_indent=indent, break_on_hyphens=False) or [""])


def write_json(path: str, meta: Dict, rows: List[Dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "columns": _keys(rows), "rows": rows}, f, indent=1)


def write_csv(path: str, rows: List[Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_keys(rows))
        writer.writeheader()
        writer.writerows(rows)


def write_plot(path: str, rows: List[Dict], title: Optional[str] = None) -> None:
    """tokens/s against T: one panel per (dtype, mode), one line per (config, implementation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    labels = sorted({f"{r['config']} [{r['implementation']}]" for r in rows})
    colors = {label: plt.get_cmap("tab20")(i % 20) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (dtype, mode) in zip(axes[0], panels):
        series: Dict[str, List[tuple]] = {}
        for r in rows:
            if (r["dtype"], r["mode"]) == (dtype, mode):
                series.setdefault(f"{r['config']} [{r['implementation']}]", []).append((r["tokens"], r["tokens_per_s"]))
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label],
                    linestyle="--" if label.startswith("dense") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per call (T)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{dtype} {mode}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(textwrap.fill(title or "deepseek-moe-bench", 80 * len(panels)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _keys(rows: List[Dict]) -> List[str]:
    """The table's columns, then every other key the rows carry."""
    table = [k for k, _, _ in COLUMNS]
    return table + [k for k in rows[0] if k not in set(table)]
