"""W5 results: one `Row` per system and the markdown table (the plot: bench/plots.py `service`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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
        """All tasks over the whole run."""
        return self.tasks / self.outcome.seconds if self.outcome.seconds > 0 else math.nan

    @property
    def rate(self) -> float:
        """Tasks/s as the targets compare them: a closed loop's steady state (`Outcome.steady`), else (open
        loops, a bulk, the in-process engine, a closed loop too short to have one) the whole run."""
        if self.outcome.steady is None:
            return self.tasks_per_s
        completions, seconds = self.outcome.steady
        return completions / seconds

    def latency_ms(self, q: float) -> float:
        return 1000 * percentile(self.outcome.latencies_s, q)

    @property
    def commands_per_task(self) -> float | None:
        return None if self.redis_calls is None or not self.tasks else self.redis_calls / self.tasks


def merge(rows: list[Row]) -> Row:
    """One row from the rounds of one system: seconds, samples, failures, Redis commands and CPU summed (so
    tasks/s is all tasks over all the time; the steady state's completions and seconds likewise, if every
    round has one), the mean batch weighted by tasks."""
    first = rows[0]
    steadies = [r.outcome.steady for r in rows if r.outcome.steady is not None]
    steady = None
    if len(steadies) == len(rows):
        steady = (sum(n for n, _ in steadies), sum(s for _, s in steadies))
    outcome = Outcome(
        sum(r.outcome.seconds for r in rows),
        [s for r in rows for s in r.outcome.samples],
        [f for r in rows for f in r.outcome.failures],
        {key: sum(r.outcome.extra.get(key, 0.0) for r in rows) for key in first.outcome.extra},
        steady,
    )
    batches = [(r.batch, r.tasks) for r in rows if r.batch is not None]
    batch = sum(b * n for b, n in batches) / max(sum(n for _, n in batches), 1) if batches else None
    calls = [r.redis_calls for r in rows]
    cpu = {key: sum(r.cpu_s.get(key, 0.0) for r in rows) for key in first.cpu_s}
    return Row(first.system, outcome, first.clients, batch, None if None in calls else sum(calls), cpu)  # type: ignore[arg-type]


def cpu_per_task(row: Row) -> str:
    """`worker 5.1, redis 0.8, ...` CPU ms per task; empty when the row has no CPU counts."""
    if not row.cpu_s or not row.tasks:
        return ""
    return ", ".join(f"{name} {1000 * s / row.tasks:.1f}" for name, s in row.cpu_s.items())


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| system | clients | tasks | failed | seconds | tasks/s | steady tasks/s | p50 ms | p99 ms | mean batch "
        "| Redis cmds/task |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.system} | {r.clients if r.clients is not None else '-'} | {r.tasks} | {len(r.outcome.failures)} "
            f"| {r.outcome.seconds:.2f} | {_num(r.tasks_per_s)} | {_num(r.rate if r.outcome.steady else None)} "
            f"| {_num(r.latency_ms(50))} | {_num(r.latency_ms(99))} "
            f"| {_num(r.batch)} | {_num(r.commands_per_task)} |"
        )
    return "\n".join(lines)


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
