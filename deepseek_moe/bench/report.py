"""Benchmark rows: ratios, the terminal table, JSON, CSV and the tokens/s plot."""
from __future__ import annotations

import csv
import io
import json
from typing import Dict, List, Optional

COLUMNS = [
    # (key, table header, format)
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
    ("ratio_to_mixtral", "× ref", "{:.2f}"),
    ("ratio_to_dense", "× dense", "{:.2f}"),
    ("peak_memory_bytes", "peak MiB", "{:.1f}"),
    ("max_vio", "MaxVio", "{:.2f}"),
    ("expert_combinations", "combos", "{:.3g}"),
]
GROUP_KEYS = ("device", "dtype", "mode", "tokens")


def add_ratios(rows: List[Dict]) -> None:
    """Fill ``ratio_to_mixtral`` (time / our layer's reference side 'a' row of the same group, same backend if
    there is one) and ``ratio_to_dense`` (time / the dense row of the same group and width)."""
    groups: Dict[tuple, List[Dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    for group in groups.values():
        refs = [r for r in group if r["side"] == "a" and r["kind"] == "layer"]
        dense = {r["dense_width"]: r for r in group if r["side"] == "dense"}
        for row in group:
            same = [r for r in refs if r["implementation"] == row["implementation"]]
            ref = (same or refs or [row])[0]
            row["ratio_to_mixtral"] = row["median_s"] / ref["median_s"]
            base = dense.get(row["dense_width"])
            row["ratio_to_dense"] = row["median_s"] / base["median_s"] if base else float("nan")


def _cell(row: Dict, key: str, fmt: str) -> str:
    value = row[key]
    if key == "peak_memory_bytes":
        value = value / 2**20
    return fmt.format(value)


def render_table(rows: List[Dict], title: str) -> str:
    """The table as text (rich if installed, else aligned columns)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        cells = [[h for _, h, _ in COLUMNS]] + [[_cell(r, k, f) for k, _, f in COLUMNS] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
        lines = [title] + ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
        return "\n".join(lines)
    table = Table(title=title, show_lines=False)
    for key, header, _ in COLUMNS:
        table.add_column(header, justify="left" if key in ("config", "implementation", "mode") else "right")
    for r in rows:
        table.add_row(*[_cell(r, k, f) for k, _, f in COLUMNS])
    console = Console(width=250, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def write_json(path: str, meta: Dict, rows: List[Dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "columns": [k for k, _, _ in COLUMNS], "rows": rows}, f, indent=1)


def write_csv(path: str, rows: List[Dict]) -> None:
    keys = [k for k, _, _ in COLUMNS] + [k for k in rows[0] if k not in {c for c, _, _ in COLUMNS}]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
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
    fig.suptitle(title or "deepseek-moe-bench", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
