"""W5 results: one `Row` per system, the markdown table, and the plot (tasks/s and latency)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from w5_load import Outcome, percentile


@dataclass
class Row:
    system: str
    outcome: Outcome
    clients: int | None = None  # closed-loop clients; None: open loop / one submission
    batch: float | None = None  # mean requests per engine step of the classifier during the run
    redis_calls: int | None = None  # Redis commands during the run, every client and worker included
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the run, per process

    @property
    def tasks(self) -> int:
        return len(self.outcome.samples)

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.outcome.seconds if self.outcome.seconds > 0 else math.nan

    def latency_ms(self, q: float) -> float:
        return 1000 * percentile(self.outcome.latencies_s, q)

    @property
    def commands_per_task(self) -> float | None:
        return None if self.redis_calls is None or not self.tasks else self.redis_calls / self.tasks


def cpu_per_task(row: Row) -> str:
    """`worker 5.1, redis 0.8, ...` CPU ms per task; empty when the row has no CPU counts."""
    if not row.cpu_s or not row.tasks:
        return ""
    return ", ".join(f"{name} {1000 * s / row.tasks:.1f}" for name, s in row.cpu_s.items())


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| system | clients | tasks | failed | seconds | tasks/s | p50 ms | p99 ms | mean batch | Redis cmds/task |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.clients if r.clients is not None else '-'} | {r.tasks} | {len(r.outcome.failures)} "
            f"| {r.outcome.seconds:.2f} | {_num(r.tasks_per_s)} | {_num(r.latency_ms(50))} | {_num(r.latency_ms(99))} "
            f"| {_num(r.batch)} | {_num(r.commands_per_task)} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> str:
    """Write the tasks/s and p50/p99 latency bars to `path` (PNG); returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    names = [r.system for r in rows][::-1]
    shown = rows[::-1]
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(13, 0.45 * len(rows) + 1.8), sharey=True)
    rate_ax.bar_label(rate_ax.barh(names, [r.tasks_per_s for r in shown], color="tab:blue"), fmt="%.0f", padding=2)
    rate_ax.set_xlabel("tasks/s (log)")
    positions = range(len(shown))
    for offset, q in ((0.2, 50), (-0.2, 99)):
        bars = latency_ax.barh(
            [p + offset for p in positions], [r.latency_ms(q) for r in shown], height=0.4, label=f"p{q}"
        )
        latency_ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    latency_ax.set_xlabel("submit-to-result latency, ms (log)")
    latency_ax.legend(loc="upper right")
    for ax in (rate_ax, latency_ax):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.15)
    fig.suptitle("W5: the whole service through the queue")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def engine_work(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    """What each model's executor did between two `engine_model_stats` snapshots: requests, steps, and per step
    the requests (encoders) or tokens generated (decoders), and encoder tokens computed (padding included)."""
    parts = []
    for model, counters in sorted(after.items()):
        delta = {name: value - before.get(model, {}).get(name, 0.0) for name, value in counters.items()}
        steps = delta.get("steps", 0.0)
        if steps <= 0:
            continue
        if delta.get("generated_tokens"):  # a decoder: its steps are tokens, requests span many of them
            per_step = [f"{delta['generated_tokens'] / steps:.1f} generated tokens"]
        else:
            per_step = [f"{delta['num_requests_finished'] / steps:.1f} requests"]
        if delta.get("computed_tokens"):
            per_step.append(f"{delta['computed_tokens'] / steps:.0f} tokens computed")
        done = delta["num_requests_finished"]
        parts.append(f"{model} {done:.0f} requests in {steps:.0f} steps ({', '.join(per_step)} per step)")
    return "; ".join(parts)
