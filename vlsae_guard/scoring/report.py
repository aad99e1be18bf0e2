"""Tables (terminal and Markdown) and the A/B plot, from the results dicts of the harness.

A row is one metric of one split: both arms' values, the difference B - A with its paired
bootstrap 95% interval and, for POPE, McNemar's p. Single-arm results print the values only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..outputs import write_with

ARM_COLOURS = ("#8c8c8c", "#2a7ab0")  # arm A (the baseline), arm B


@dataclass(frozen=True)
class Row:
    group: str  # split name ("" for CHAIR)
    metric: str
    values: dict[str, float]  # arm -> value
    intervals: dict[str, tuple[float, float]]  # arm -> 95% interval (may be empty)
    delta: float | None = None
    delta_ci: tuple[float, float] | None = None
    p: float | None = None  # McNemar (POPE, per split)


def rows_from_comparison(
    group: str, arms: dict[str, dict], comparison: dict | None, metrics: Sequence[str], p=None
) -> list[Row]:
    """Rows for one split from per-arm metrics and (optionally) a paired comparison."""
    rows = []
    for k, m in enumerate(metrics):
        intervals, delta, delta_ci = {}, None, None
        if comparison is not None:
            a, b = arms
            intervals = {a: comparison["ci_a"][m], b: comparison["ci_b"][m]}
            delta, delta_ci = comparison["delta"][m], tuple(comparison["ci_delta"][m])
        rows.append(
            Row(
                group,
                m,
                {arm: metrics_[m] for arm, metrics_ in arms.items()},
                intervals,
                delta,
                delta_ci,
                p if k == 0 else None,
            )
        )
    return rows


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.3g}"


def _cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    arms = list(dict.fromkeys(a for r in rows for a in r.values))
    header = ["split", "metric"] if any(r.group for r in rows) else ["metric"]
    header += list(arms)
    paired = any(r.delta is not None for r in rows)
    if paired:
        header += [f"delta ({' - '.join(arms[::-1])})" if len(arms) == 2 else "delta", "95% CI"]
    if any(r.p is not None for r in rows):
        header += ["McNemar p"]
    body = []
    for r in rows:
        cells = [r.group, r.metric] if header[0] == "split" else [r.metric]
        cells += [_fmt(r.values.get(a)) for a in arms]
        if paired:
            ci = "" if r.delta_ci is None else f"[{r.delta_ci[0]:+.1f}, {r.delta_ci[1]:+.1f}]"
            cells += [_fmt(r.delta, signed=True), ci]
        if "McNemar p" in header:
            cells.append(_p(r.p))
        body.append(cells)
    return header, body


def text_table(rows: Sequence[Row]) -> str:
    header, body = _cells(rows)
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
    lines = []
    for k, cells in enumerate([header, *body]):
        left = 2 if header[0] == "split" else 1
        parts = [
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    header, body = _cells(rows)
    left = 2 if header[0] == "split" else 1
    align = ["---" if i < left else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str | Path, title: str) -> Path:
    """PNG: per group, both arms' values with 95% intervals, and B - A with its interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(r.group for r in rows))
    paired = any(r.delta is not None for r in rows)
    # A Figure on an Agg canvas, not pyplot: no global backend state, no display needed.
    fig = Figure(figsize=(11 if paired else 6, 2.8 * len(groups) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 2 if paired else 1, squeeze=False)
    for g, group in enumerate(groups):
        these = [r for r in rows if r.group == group]
        arms = list(dict.fromkeys(a for r in these for a in r.values))
        ax = axes[g][0]
        width = 0.8 / max(len(arms), 1)
        for k, arm in enumerate(arms):
            xs = [i + (k - (len(arms) - 1) / 2) * width for i in range(len(these))]
            ys = [r.values[arm] for r in these]
            err = None
            if all(arm in r.intervals for r in these):
                err = [
                    [max(0.0, y - r.intervals[arm][0]) for y, r in zip(ys, these, strict=True)],
                    [max(0.0, r.intervals[arm][1] - y) for y, r in zip(ys, these, strict=True)],
                ]
            ax.bar(
                xs,
                ys,
                width,
                yerr=err,
                capsize=3,
                label=arm,
                color=ARM_COLOURS[k % 2],
            )
        ax.set_xticks(range(len(these)), [r.metric for r in these])
        ax.set_title(f"{group}: values (95% CI)" if group else "values (95% CI)", fontsize=10)
        ax.legend(fontsize=8)
        if paired:
            ax = axes[g][1]
            ds = [r.delta if r.delta is not None else math.nan for r in these]
            lo = [d - r.delta_ci[0] if r.delta_ci else 0 for d, r in zip(ds, these, strict=True)]
            hi = [r.delta_ci[1] - d if r.delta_ci else 0 for d, r in zip(ds, these, strict=True)]
            ax.errorbar(range(len(these)), ds, yerr=[lo, hi], fmt="o", capsize=4, color="#2a7ab0")
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(these)), [r.metric for r in these])
            ax.set_title("guard on - guard off (paired bootstrap 95% CI)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return write_with(path, lambda tmp: fig.savefig(tmp, dpi=110))
