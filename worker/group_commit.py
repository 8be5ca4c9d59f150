"""Group commit: the Redis writes of many task threads in one round trip.

One engine step completes the requests of many tasks at once, each waited on by its own Celery task thread.
Written one by one, a step of 8 single-item tasks costs 8 `finalize` calls; through a `GroupCommit` the first
thread to arrive (the leader) writes its items and everything the others queued meanwhile in ONE call, and
the others (followers) wait for that call and take their own results from it::

    thread A  write([a]) ── leader: call([a])  ─────────► results ── A returns
    thread B     write([b]) ── queued, waits               ─► leader: call([b, c]) ─► B, C return
    thread C        write([c]) ── queued, waits

At most two calls' time per writer (the one in flight, then its own), and under load a call per step instead
of a call per task. The same scheme as a database's group commit of its log.

A failed call (Redis down) raises its exception in every writer whose items it carried; nothing else is
shared between writers, so `call` must not fail for one writer's items alone (the callers check their items
first).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Group(Generic[T, R]):
    __slots__ = ("items", "results", "error", "done")

    def __init__(self, items: Sequence[T]) -> None:
        self.items = items
        self.results: list[R] = []
        self.error: BaseException | None = None
        self.done = False


class GroupCommit(Generic[T, R]):
    """`commit(items) -> results` for any number of threads at once, through `call(all_items) -> results` (one
    result per item, in order) made by one thread at a time for everything queued (see the module docstring)."""

    def __init__(self, call: Callable[[list[T]], list[R]]) -> None:
        self._call = call
        self._cond = threading.Condition()
        self._queued: list[_Group[T, R]] = []
        self._calling = False
        self.calls = 0  # calls made (for tests and benchmarks: writes per call = items / calls)

    def commit(self, items: Sequence[T]) -> list[R]:
        if not items:
            return []
        mine: _Group[T, R] = _Group(items)
        with self._cond:
            self._queued.append(mine)
            while self._calling and not mine.done:
                self._cond.wait()
            if not mine.done:  # no call in flight: lead one for everything queued
                self._calling = True
                groups, self._queued = self._queued, []
        if not mine.done:
            self._lead(groups)
        if mine.error is not None:
            raise mine.error
        return mine.results

    def _lead(self, groups: list[_Group[T, R]]) -> None:
        error: BaseException | None = None
        results: list[R] = []
        try:
            results = self._call([item for group in groups for item in group.items])
            if len(results) != sum(len(g.items) for g in groups):
                raise RuntimeError(f"group commit: {len(results)} results for {sum(len(g.items) for g in groups)}")
        except BaseException as exc:  # noqa: BLE001 - raised in every writer whose items the call carried
            error = exc
        with self._cond:
            self.calls += 1
            start = 0
            for group in groups:
                group.results = results[start : start + len(group.items)] if error is None else []
                group.error = error
                group.done = True
                start += len(group.items)
            self._calling = False
            self._cond.notify_all()
