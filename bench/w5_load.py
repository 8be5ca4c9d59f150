"""W5 load drivers and counters: the closed loop, latency percentiles, Redis commands, engine batch sizes.

Closed loop: `clients` threads, each with its own connection (made before the clock starts), take the next
item, submit it and wait for its result, then take the next; the run ends when every item is done. The time
is from the moment all clients are connected to the last result.

A closed loop's rate is also measured in its steady state (`Outcome.steady`, `steady_window`): between the
`clients`-th and the (N - `clients`)-th of its N completions. Before, the clients start together (one burst of
`clients` submissions); after, the items have run out and fewer clients are busy at every completion. The
whole-run rate counts both transients, and in a short run they are most of it: rounds of 100 tasks with 32
clients read 0.54-0.90x for the same two systems.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

CONNECT_TIMEOUT_S = 120.0
_DONE = object()  # the end of a closed loop's items
INSPECT_TIMEOUT_S = 3.0

#: Opens one client's connection and yields the function that runs one item to its result.
Connect = Callable[[], AbstractContextManager[Callable[[Any], Any]]]


@dataclass
class Sample:
    """One item as its client saw it: submit-to-result seconds and what the call returned."""

    latency_s: float
    value: Any = None


@dataclass
class Outcome:
    seconds: float
    samples: list[Sample]
    failures: list[str] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)  # other seconds worth reporting, by name
    steady: tuple[int, float] | None = None  # a closed loop's (completions, seconds) with every client busy

    @property
    def latencies_s(self) -> list[float]:
        return [s.latency_s for s in self.samples]


def closed_loop(connect: Connect, items: Sequence[Any], clients: int) -> Outcome:
    """Run every item once through `clients` concurrent closed-loop clients (see the module docstring)."""
    pending = iter(items)
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)
    samples: list[Sample] = []
    failures: list[str] = []
    done: list[float] = []  # every completion's time (perf_counter), failures included

    def client() -> None:
        try:
            with connect() as run:
                ready.wait(CONNECT_TIMEOUT_S)
                while True:
                    with lock:
                        item = next(pending, _DONE)
                    if item is _DONE:
                        return
                    start = time.perf_counter()
                    try:
                        value = run(item)
                    except Exception as exc:  # noqa: BLE001 - a failed task is counted, the loop goes on
                        failures.append(f"{type(exc).__name__}: {exc}")
                        done.append(time.perf_counter())  # a failure frees its client too
                        continue
                    end = time.perf_counter()
                    samples.append(Sample(end - start, value))
                    done.append(end)
        except threading.BrokenBarrierError:
            return
        except BaseException:
            ready.abort()  # another client failed to connect: the run cannot start
            raise

    threads = [threading.Thread(target=client, name=f"w5-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait(CONNECT_TIMEOUT_S)
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return Outcome(time.perf_counter() - start, samples, failures, steady=steady_window(done, clients))


def steady_window(done: Sequence[float], clients: int) -> tuple[int, float] | None:
    """(completions, seconds) of a closed loop's steady state, from its completion times: the completions
    after the `clients`-th, up to the (N - `clients`)-th -- the last one at which a client took a new item, so
    every client was busy throughout. None when N < 3 x `clients` (no steady part to speak of)."""
    if clients < 1 or len(done) < 3 * clients:
        return None
    ordered = sorted(done)
    first, last = ordered[clients - 1], ordered[len(ordered) - clients - 1]
    return (len(ordered) - 2 * clients, last - first) if last > first else None


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def redis_commands(url: str) -> int:
    """Commands the Redis server at `url` has run since it started (INFO commandstats, all clients)."""
    with redis.Redis.from_url(url) as client:
        return sum(int(stat["calls"]) for stat in client.info("commandstats").values())


def redis_cpu_s(url: str) -> float:
    """CPU seconds (user + system) the Redis server at `url` has used since it started."""
    with redis.Redis.from_url(url) as client:
        cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process `pid` and its live child processes (a worker's
    engine-core process) so far, from /proc (Linux); NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(  # utime, stime (fields 14, 15)
        process_cpu_s(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def engine_model_stats(app: Celery, workers: int = 1) -> dict[str, dict[str, float]]:
    """Per model, every numeric counter of its executor summed over the `workers` that answer `inspect stats`:
    the pagedq EngineStep's `info()` (Engine.stats()). Empty when no worker reports them."""
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT_S, limit=workers).stats() or {}
    totals: dict[str, dict[str, float]] = {}
    for stats in replies.values():
        for model, counters in (stats.get("pagedq") or {}).get("models", {}).items():
            mine = totals.setdefault(model, {})
            for name, value in counters.items():
                if isinstance(value, int | float):
                    mine[name] = mine.get(name, 0.0) + value
    return totals


def engine_counters(app: Celery, workers: int = 1) -> dict[str, tuple[float, float]] | None:
    """Per model (steps, requests finished) (`engine_model_stats`). None when no worker reports them."""
    totals = {
        model: (counters["steps"], counters["num_requests_finished"])
        for model, counters in engine_model_stats(app, workers).items()
        if "steps" in counters and "num_requests_finished" in counters
    }
    return totals or None


def mean_batch(before: dict | None, after: dict | None, model: str) -> float | None:
    """Requests per step of `model` between two `engine_counters` snapshots."""
    if not before or not after or model not in after:
        return None
    steps0, finished0 = before.get(model, (0.0, 0.0))
    steps1, finished1 = after[model]
    return (finished1 - finished0) / (steps1 - steps0) if steps1 > steps0 else None


class Phases:
    """Wall time of each named phase of the run, in order."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        print(f"  {name} ...", flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"phases (s, total {total:.0f}): {parts}"
