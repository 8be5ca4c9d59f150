"""W5 mix: what each system answered to each job, whether pagedq and the naive worker agree, and where each
kind of job spent its time.

The closed loop runs items `(index, job)` through `recording(connect, answers)`, which keeps every answer under
its job's index. Agreement, on the jobs both systems answered:
  classify   the same label, and scores within `SCORE_TOLERANCE`
  translate  the same text and the same number of output tokens (greedy; the result carries the text, not the
             ids -- text and count equal is as close to "token for token" as a client can check)
  qa         the same span (character start and end), scores within `SCORE_TOLERANCE`
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from w5_load import Connect
from w5_pagedq import Trace
from w5_workload import Job

SCORE_TOLERANCE = 1e-4
SHOWN_MISMATCHES = 3


@dataclass
class Answer:
    seconds: float  # submit to result, in the client
    value: Any  # what the client's run returned: a pagedq `Trace`, or the naive worker's result dict

    def result(self) -> dict[str, Any]:
        """The result fields, whichever system answered."""
        if isinstance(self.value, Trace):
            assert self.value.status.result is not None
            return self.value.status.result.model_dump()
        return dict(self.value)

    def inner_s(self) -> float | None:
        """Seconds inside the worker: pagedq's started-to-finished, the naive task's `in_task_s`."""
        if isinstance(self.value, Trace):
            return self.value.stages().get("in worker")
        return self.value.get("in_task_s")


def recording(connect: Connect, answers: dict[int, Answer]) -> Connect:
    """`connect` for items `(index, job)`: each job runs as before, its answer kept in `answers[index]`."""

    @contextmanager
    def session() -> Iterator[Callable[[tuple[int, Job]], Any]]:
        with connect() as run:

            def run_item(item: tuple[int, Job]) -> Any:
                index, job = item
                start = time.perf_counter()
                value = run(job)
                answers[index] = Answer(time.perf_counter() - start, value)
                return value

            yield run_item

    return session


def _same(kind: str, ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[bool, float]:
    """(agree, |score difference|) of one job's two answers."""
    if kind == "translate":
        same = ours["translation"] == theirs["translation"] and ours["output_tokens"] == theirs["output_tokens"]
        return same, 0.0
    diff = abs(ours["score"] - theirs["score"])
    if kind == "classify":
        return ours["label"] == theirs["label"] and diff <= SCORE_TOLERANCE, diff
    return (ours["start"], ours["end"]) == (theirs["start"], theirs["end"]) and diff <= SCORE_TOLERANCE, diff


def agreement(jobs: Sequence[Job], ours: dict[int, Answer], theirs: dict[int, Answer]) -> list[str]:
    """One line per kind (agreeing / compared, the largest score difference), then the first mismatches."""
    counts: dict[str, list[int]] = {}
    worst: dict[str, float] = {}
    mismatches = []
    for index in sorted(ours.keys() & theirs.keys()):
        kind = jobs[index].kind
        a, b = ours[index].result(), theirs[index].result()
        same, diff = _same(kind, a, b)
        counts.setdefault(kind, [0, 0])[0] += same
        counts[kind][1] += 1
        worst[kind] = max(worst.get(kind, 0.0), diff)
        if not same:
            mismatches.append(f"{kind} job {index}: pagedq {_brief(kind, a)} / naive {_brief(kind, b)}")
    what = {
        "classify": "same label, scores within 1e-4",
        "translate": "same text and output token count",
        "qa": "same span, scores within 1e-4",
    }
    parts = [
        f"{kind} {same}/{total} ({what[kind]}"
        + (f"; max |score diff| {worst[kind]:.1e})" if kind != "translate" else ")")
        for kind, (same, total) in sorted(counts.items())
    ]
    lines = ["agreement, pagedq vs naive on the same mix jobs: " + ", ".join(parts)]
    return lines + [f"  MISMATCH {m}" for m in mismatches[:SHOWN_MISMATCHES]]


def _brief(kind: str, result: dict[str, Any]) -> str:
    if kind == "classify":
        return f"{result['label']} {result['score']:.6f}"
    if kind == "translate":
        return f"{result['output_tokens']} tokens {result['translation'][:40]!r}"
    return f"[{result['start']}:{result['end']}] {result['score']:.6f}"


def time_by_kind(system: str, inner: str, jobs: Sequence[Job], answers: dict[int, Answer]) -> str:
    """`system: median ms by kind (submit-to-result / <inner>): classify 12 / 8, ...` plus output tokens."""
    parts = []
    for kind in ("classify", "translate", "qa"):
        mine = [answer for index, answer in answers.items() if jobs[index].kind == kind]
        if not mine:
            continue
        inside = [s for s in (a.inner_s() for a in mine) if s is not None]
        inside_ms = f"{1000 * statistics.median(inside):.0f}" if inside else "-"
        parts.append(f"{kind} {1000 * statistics.median(a.seconds for a in mine):.0f} / {inside_ms}")
    return f"{system}: median ms by kind (submit-to-result / {inner}): " + ", ".join(parts)
