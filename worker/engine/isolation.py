"""Isolation of requests that break their model: the engine's eviction and bisection bookkeeping.

A request inside the engine is a `Flight`: the caller's `EngineRequest` (its future is what the task thread
waits on) and the *attempt* its executor holds now -- a copy with its own future, whose outcome is forwarded
to the caller's. That split lets the engine take a request out of its executor without completing it
(`evict`: the attempt fails with the private `_Evicted`, which is never forwarded) and run it again later as
a fresh attempt under a fresh id. A generative request restarts from scratch (recompute), which gives the
same tokens for greedy and seeded sampling.

When `executor.step()` raises, the engine cannot tell which request broke it, so it evicts every request the
executor holds and bisects them (`Quarantine`), one group at a time, while that model's new arrivals wait::

    suspects [a b c d e f]     the step raised: all six evicted
    run [a b c]   ok           a, b, c finish normally
    run [d e f]   raised       split
    run [d]       ok
    run [e f]     raised       split
    run [e]       ok
    run [f]       raised       f alone fails with ModelError; the held arrivals are admitted

Other models keep stepping meanwhile. A poison costs about 2 * log2(suspects) failed steps.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

from pagedq.shared.errors import EngineError, ModelError, PagedqError
from pagedq.worker.engine.core.executor import CallbackFuture, EngineRequest, ModelExecutor

log = logging.getLogger(__name__)

#: joins a request id and its attempt number into the id of a re-run attempt: "task-id@retry2"
RETRY_ID_FORMAT = "{id}@retry{attempt}"


class _Evicted(Exception):
    """Completes an evicted attempt's future; never forwarded to the caller."""


def model_error(exc: BaseException) -> PagedqError:
    """What a request that alone breaks its model fails with: pagedq's own errors as they are (e.g.
    InvalidRequest for a too-long input), anything else as ModelError naming the exception."""
    if isinstance(exc, PagedqError):
        return exc
    return ModelError(f"{type(exc).__name__}: {exc}")


@dataclass(eq=False)
class Flight:
    """One submitted request inside the engine.

    Invariants: `request.future` completes exactly once (forwarded from an attempt, or failed by the engine);
    while `attempt` is set, `executor` holds that attempt and no other of this flight; an evicted attempt's
    future is done, so executors that look at `future.done()` drop any trace of it."""

    request: EngineRequest
    executor: ModelExecutor
    attempt: EngineRequest | None = None
    attempts: int = 0

    @property
    def done(self) -> bool:
        return self.request.future.done()

    def new_attempt(self) -> EngineRequest:
        """A fresh copy of the request for the executor: the original id first, then `RETRY_ID_FORMAT` (an
        executor may still report an evicted attempt's id once)."""
        n, rid = self.attempts, self.request.id
        rid = RETRY_ID_FORMAT.format(id=rid, attempt=n) if n else rid
        self.attempts += 1
        # `dataclasses.replace(request, id=rid, future=...)` without its per-field Python: 1 us, not 3
        attempt = object.__new__(EngineRequest)
        attempt.__dict__.update(self.request.__dict__)
        attempt.id = rid
        future = CallbackFuture()  # nobody waits on an attempt: it is forwarded to the caller's future
        future.add_done_callback(self._forward)
        attempt.future = cast("Future[Any]", future)
        self.attempt = attempt
        return attempt

    def evict(self) -> None:
        """Take the attempt out of the executor (freeing what it holds) without completing the caller's future."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            self._take_out(attempt, _Evicted())

    def abort(self, error: BaseException) -> None:
        """Drop the request wherever it is (its blocks freed on return) and fail it with `error`."""
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            self._take_out(attempt, error)  # the executor fails the attempt: forwarded
        self.request.fail(error)  # a no-op if forwarded

    def _take_out(self, attempt: EngineRequest, error: BaseException) -> None:
        try:
            self.executor.abort(attempt.id, error)
        except Exception:  # noqa: BLE001 - the executor may be in a broken state after a failed step
            log.exception("taking %s out of model %s failed", attempt.id, self.executor.loaded.spec.name)
        attempt.fail(_Evicted())  # a no-op if `abort` completed it; executors drop an attempt that is done

    def _forward(self, future: Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if isinstance(error, _Evicted):
            return
        if error is not None:
            self.request.fail(error)
        else:
            if self.attempt is not None:  # timings the executor noted on the attempt (TTFT)
                self.request.first_token_at = self.attempt.first_token_at
            self.request.finish(future.result())


def unfinished(flights: Iterable[Flight]) -> list[Flight]:
    return [flight for flight in flights if not flight.done]


@dataclass
class Quarantine:
    """Bisection state of one executor after a failed step (module docstring).

    Invariants: the executor holds attempts of `running` only; every other unfinished flight of that model is
    in one `pending` group or in `held` (arrivals, admitted when no group is left), none with an attempt."""

    running: list[Flight] = field(default_factory=list)
    pending: deque[list[Flight]] = field(default_factory=deque)
    held: list[Flight] = field(default_factory=list)

    def next_group(self) -> list[Flight] | None:
        """The next group with something left to run, or None when the bisection is over."""
        while self.pending:
            group = unfinished(self.pending.popleft())
            if group:
                return group
        return None

    def split(self, suspects: list[Flight]) -> None:
        """Queue both halves of a group that raised, ahead of every other group, the earlier half first."""
        half = (len(suspects) + 1) // 2
        self.pending.extendleft([suspects[half:], suspects[:half]])


class _Inside:
    """`Isolator._inside`: a class, not a generator context manager -- it wraps every request's `add` (a
    generator-based one cost ~1.5 us a request, a bulk's every item)."""

    __slots__ = ("isolator", "executor")

    def __init__(self, isolator: Isolator, executor: ModelExecutor) -> None:
        self.isolator, self.executor = isolator, executor

    def __enter__(self) -> None:
        self.isolator.calling = self.executor

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if kind is None or issubclass(kind, Exception):  # a BaseException leaves the mark for `recover`
            self.isolator.calling = None


class Isolator:
    """The engine's calls into `add` and `step`, with isolation (module docstring). Engine thread only.

    `flights` and `counters` are the engine's own (shared, not copied); `calling` names the executor inside
    a call, so that a restarted thread knows where the old one died."""

    def __init__(self, flights: dict[str, Flight], counters: dict[str, int]) -> None:
        self.flights = flights
        self.counters = counters
        self.quarantines: dict[ModelExecutor, Quarantine] = {}
        self.calling: ModelExecutor | None = None

    def has_work(self, executor: ModelExecutor) -> bool:
        return executor in self.quarantines or executor.has_work()

    def add(self, flight: Flight) -> None:
        """A new arrival: to its executor, or held while its model is being bisected."""
        quarantine = self.quarantines.get(flight.executor)
        if quarantine is not None:
            quarantine.held.append(flight)
        else:
            self._admit(flight)

    def step(self, executor: ModelExecutor) -> None:
        """One step of `executor` (of the current group, while it is quarantined); bisect if it raises."""
        quarantine = self.quarantines.get(executor)
        if quarantine is not None and not self._advance(executor, quarantine):
            return
        try:
            with self._inside(executor):
                executor.step()
            self.counters["steps"] += 1
        except Exception as exc:  # noqa: BLE001 - one request's failure must not fail its batch
            self._isolate(executor, exc)

    def recover(self, executors: Iterable[ModelExecutor], death: BaseException) -> None:
        """On a restarted thread, where no executor's state is trusted: bisect the requests of the executor
        the old thread died in; evict and re-run every other in-flight request."""
        blamed, self.calling = self.calling, None
        for executor in executors:
            if executor is blamed:
                self._isolate(executor, death)
                continue
            flights = self._held_by(executor)
            for flight in flights:
                flight.evict()
            quarantine = self.quarantines.get(executor)
            if quarantine is None:
                for flight in unfinished(flights):
                    self._admit(flight)
            elif unfinished(flights):
                quarantine.running = []
                quarantine.pending.appendleft(unfinished(flights))

    def _inside(self, executor: ModelExecutor) -> _Inside:
        """Marks a call into `executor`; a BaseException leaves the mark for `recover`."""
        return _Inside(self, executor)

    def _admit(self, flight: Flight) -> None:
        """Hand a fresh attempt to the executor; an exception from `add` fails this request alone."""
        attempt = flight.new_attempt()
        try:
            with self._inside(flight.executor):
                flight.executor.add(attempt)
        except Exception as exc:  # noqa: BLE001 - e.g. a tokenizer that cannot encode this text
            flight.evict()
            self._fail_alone(flight, exc)

    def _held_by(self, executor: ModelExecutor) -> list[Flight]:
        """The flights whose attempts `executor` holds, in arrival order."""
        return [f for f in self.flights.values() if f.executor is executor and f.attempt is not None]

    def _isolate(self, executor: ModelExecutor, exc: BaseException) -> None:
        """`executor` failed a step: evict everything it holds and bisect it; a single suspect is guilty."""
        self.counters["step_errors"] += 1
        first = executor not in self.quarantines  # later failures are the bisection's, logged without a trace
        log.error("model %s failed a step: %r; isolating its requests", executor.loaded.spec.name, exc,
                  exc_info=exc if first else None)  # fmt: skip
        suspects = self._held_by(executor)
        for flight in suspects:
            flight.evict()
        suspects = unfinished(suspects)
        quarantine = self.quarantines.setdefault(executor, Quarantine())
        quarantine.running = []
        if len(suspects) == 1:
            self._fail_alone(suspects[0], exc)
        elif suspects:
            quarantine.split(suspects)

    def _advance(self, executor: ModelExecutor, quarantine: Quarantine) -> bool:
        """Before a quarantined executor's step: run the current group until it is done, then admit the next;
        when none is left, admit the held arrivals and end the quarantine. Returns whether there is work."""
        quarantine.running = unfinished(quarantine.running)
        if quarantine.running and not executor.has_work():
            for flight in quarantine.running:  # let go of without completing: an executor bug, not a poison
                flight.abort(EngineError("the executor dropped this request"))
            quarantine.running = []
        if not quarantine.running:
            group = quarantine.next_group()
            if group is None:
                del self.quarantines[executor]
                group = unfinished(quarantine.held)
            else:
                quarantine.running = group
            for flight in group:
                self._admit(flight)
        return executor.has_work()

    def _fail_alone(self, flight: Flight, exc: BaseException) -> None:
        self.counters["isolated_requests"] += 1
        log.warning("request %s alone fails model %s: %r", flight.request.id, flight.executor.loaded.spec.name, exc)
        flight.request.fail(model_error(exc))
