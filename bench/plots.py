"""The benchmarks' pictures: PNG bar charts written to bench/plots/ (committed: the README shows them).

One function per kind of result; each takes plain rows, not a benchmark's objects, so a test draws them from a
few synthetic rows in a second:
  rates     W1-W4: a rate per system (tok/s, texts/s), each bar annotated with its ratio to its panel's
            baseline; one panel per part of the table, side by side (W3 fp32 | bf16, W4 greedy | beam 4)
  service   W5: tasks/s and p50/p99 submit-to-result latency per system
  faults    lost tasks, final-state flips and time until the tasks in flight were back, per fault
matplotlib is optional (`pip install -e ".[bench]"`): without it each function writes nothing and returns a
line saying the plot was skipped, and the benchmark carries on. Each returns the line its script prints.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PLOTS_DIR = Path(__file__).resolve().parent / "plots"
WORKLOAD = "{workload}"  # in a --plot path: replaced by the workload's name (engine.py: w1, w2)
SKIPPED = 'plot skipped: matplotlib is not installed (pip install -e ".[bench]")'
OURS, OTHERS = "tab:blue", "tab:gray"  # pagedq's bars stand out from the baselines'


def add_plot_argument(parser: argparse.ArgumentParser, name: str = WORKLOAD) -> None:
    """`--plot PATH`, by default bench/plots/<name>.png (`{workload}` in the path: one file per workload)."""
    parser.add_argument(
        "--plot",
        type=Path,
        default=PLOTS_DIR / f"{name}.png",
        help=f"PNG of the results (default: bench/plots/{name}.png; {WORKLOAD} becomes the workload's name)",
    )


def path_for(template: Path, workload: str) -> Path:
    return Path(str(template).replace(WORKLOAD, workload))


def _pyplot() -> Any | None:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path, dpi: int = 110) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return f"plot: {path}"


def _stamp(title: str, note: str) -> str:
    """The title, and under it what was run and when: a picture may outlive the table it came with."""
    return f"{title}\n{note + '; ' if note else ''}{time.strftime('%Y-%m-%d')}"


# ---- W1-W4: rates with ratios -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One part of a table: (system, rate) rows in table order; `baseline` names the row that is 1.00x."""

    title: str
    rows: Sequence[tuple[str, float]]
    baseline: str

    def ratio(self, value: float) -> float:
        return value / dict(self.rows)[self.baseline]


def _rate_text(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def rates(path: Path, title: str, unit: str, panels: Sequence[Panel], note: str = "", columns: int = 0) -> str:
    """Horizontal bars of each panel's rates (pagedq's in blue), labelled `rate  (ratio x)`; the baseline's
    reads `(1.00x, baseline)`. Panels sit side by side (at most `columns` to a row; 0: all in one row) and share
    the y axis when they list the same systems. Returns `plot: <path>`, or the skipped line."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    same_systems = len({tuple(name for name, _ in p.rows) for p in panels}) == 1
    tallest = max(len(p.rows) for p in panels)
    cols = min(columns or len(panels), len(panels))
    lines = -(-len(panels) // cols)
    width = (5.5 if same_systems else 7.0) * cols + (2.5 if same_systems else 0.0)
    fig, axes = plt.subplots(lines, cols, figsize=(width, (0.5 * tallest + 2.0) * lines), sharey=same_systems,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        names = [name for name, _ in panel.rows][::-1]  # the table's first row on top
        values = [value for _, value in panel.rows][::-1]
        colors = [OURS if name.startswith("pagedq") else OTHERS for name in names]
        labels = [
            f"{_rate_text(v)}  ({panel.ratio(v):.2f}x{', baseline' if n == panel.baseline else ''})"
            for n, v in zip(names, values, strict=True)
        ]
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=labels, padding=3, fontsize=9)
        ax.set_xlim(0, max(values) * 1.45)  # room for the labels
        ax.set_xlabel(unit)
        ax.set_title(panel.title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(_stamp(title, note), fontsize=11)
    fig.tight_layout()
    return _save(plt, fig, path)


# ---- W5: the service ----------------------------------------------------------------------------------------


class ServiceRow(Protocol):
    """What bench/w5_report.Row gives: a system's tasks/s (whole run; `rate`: a closed loop's steady state)
    and latency percentiles (NaN: not measured)."""

    system: str

    @property
    def tasks_per_s(self) -> float: ...

    @property
    def rate(self) -> float: ...

    def latency_ms(self, q: float) -> float: ...


def service(rows: Sequence[ServiceRow], path: Path) -> str:
    """Tasks/s and p50/p99 latency bars per system, both on log axes (they span three decades)."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    from matplotlib.ticker import NullFormatter

    shown = list(rows)[::-1]
    names = [r.system for r in shown]
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(13, 0.45 * len(shown) + 1.8), sharey=True)
    rate_ax.bar_label(rate_ax.barh(names, [r.rate for r in shown], color=OURS), fmt="%.0f", padding=2)
    rate_ax.set_xlabel("tasks/s (log; closed loops: steady state)")
    positions = range(len(shown))
    for offset, q in ((0.2, 50), (-0.2, 99)):
        bars = latency_ax.barh([p + offset for p in positions], [r.latency_ms(q) for r in shown], 0.4, label=f"p{q}")
        latency_ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    latency_ax.set_xlabel("submit-to-result latency, ms (log)")
    latency_ax.legend(loc="upper right")
    for ax in (rate_ax, latency_ax):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
    fig.suptitle(_stamp("W5: the whole service through the queue", ""))
    fig.tight_layout()
    return _save(plt, fig, path, dpi=120)


# ---- faults -------------------------------------------------------------------------------------------------


class FaultRow(Protocol):
    """What bench/_faults_support.Row gives."""

    fault: str
    lost: int
    flips: int
    recover_s: float | None  # None: nothing was in flight at the fault, or it never came back
    never_recovered: int


def faults(rows: Sequence[FaultRow], path: Path, note: str = "") -> str:
    """Bars of lost tasks, flips and recovery time per fault; a fault with tasks that never came back in red."""
    plt = _pyplot()
    if plt is None:
        return SKIPPED
    names = [r.fault for r in rows]
    series = [
        ("lost", [r.lost for r in rows]),
        ("final-state flips", [r.flips for r in rows]),
        ("in flight back (s); red: some never came back", [r.recover_s or 0.0 for r in rows]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
    for ax, (title, values) in zip(axes, series, strict=True):
        bars = ax.bar(names, values)
        ax.bar_label(bars, fmt="%g", padding=2, fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, max(1.0, *values) * 1.15)
        ax.tick_params(axis="x", labelrotation=60)
        ax.set_xticks(range(len(names)), names, ha="right", fontsize=8)
    for bar, row in zip(bars, rows, strict=True):  # the last panel's bars
        if row.never_recovered:
            bar.set_color("tab:red")
            axes[2].annotate(f"never: {row.never_recovered}", (bar.get_x(), bar.get_height()), fontsize=8)
    fig.suptitle(_stamp("Faults: what each fault cost", note))
    fig.tight_layout()
    return _save(plt, fig, path, dpi=100)
