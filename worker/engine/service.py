"""An engine thread that micro-batches every in-flight request of its models through each model's executor
(the worker runs one per model, side by side: `lanes.EngineLanes`).

```
 Celery task threads                      engine thread (this module)
 ───────────────────                      ─────────────────────────────────────────────
 submit_many(reqs) ─► prepare (tokenize)
                    ─► inbox ─────────────► drain inbox: executor.add(attempt) / executor.abort(id)
 cancel(id)  ──► inbox                     expire requests past their deadline
 future.result(timeout) ◄── completed ──── executor.step() for every model with work (round-robin)
 ensure_alive() (watchdog, periodic) ────► restarts the thread if it died
 stop(drain_s) ──────────────────────────► steps until nothing is in flight or drain_s passed, then
                                           fails the rest with WorkerShuttingDown (handed back)
```

Invariants:
- executors are touched only by the engine thread (a restarted thread takes over from a dead one), but
  `prepare`, which `submit_many` calls in the submitting thread and which touches no executor state;
- every submitted request's future is completed exactly once: its result, DeadlineExceeded, TaskCancelled,
  an error its executor chose (e.g. InvalidRequest), ModelError when it alone breaks its model, EngineError
  when its executor loses it, or WorkerShuttingDown when the worker stops first;
- one request cannot fail another: an exception from `add` fails that request only; when `step()` raises,
  the executor's requests are evicted and bisected (`isolation.py`) until the guilty one fails alone;
- the loop never dies of an Exception; if a BaseException ends the thread, `ensure_alive` starts a new
  one, which re-runs every in-flight request (those of the model it died in are bisected).

Each model's steps run with its own number of torch intra-op threads (`EngineConfig.intra_op_threads`, from
its registry entry or PAGEDQ_INTRA_OP_THREADS, "auto" by default: torch's count -- one per core or
OMP_NUM_THREADS, read when the engine is built -- unless the model's steps run at their cap, then measured
per step size, `threads.StepThreads`; None: torch's count always): the
engine thread sets them before a step whenever it runs with another count (0.1 us). They are set in the
engine thread itself because OpenMP's thread count is per thread: `torch.set_num_threads` in another thread
does not reach the engine's matrix products.
"""

from __future__ import annotations

import functools
import heapq
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import torch

from pagedq.shared.errors import DeadlineExceeded, EngineError, ModelNotFound, TaskCancelled, WorkerShuttingDown
from pagedq.worker.engine.core.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor, ModelStats
from pagedq.worker.engine.isolation import Flight, Isolator
from pagedq.worker.engine.threads import StepThreads

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the loop pauses after an iteration failed
#: how long the loop blocks on the inbox when no executor has work (anything for it -- requests, cancels,
#: `stop` -- wakes it at once; idle threads of `EngineLanes` should not wake the busy worker's GIL 20x a second)
IDLE_BLOCK_S = 1.0
STATS_INTERVAL_S = 0.05  # how often the loop refreshes the executors' stats snapshot (`stats()` reads it)
STOP_GRACE_S = 10.0  # how long `stop` waits past the drain for a step in progress to return


def make_executor(loaded: LoadedModel, config: EngineConfig) -> ModelExecutor:
    """The executor class for a model's architecture (imported lazily: each pulls its own deps)."""
    arch = loaded.spec.architecture
    if arch == "sequence-classification":
        from pagedq.worker.engine.tasks.classify import ClassificationExecutor

        return ClassificationExecutor(loaded, config)
    if arch == "question-answering":
        from pagedq.worker.engine.tasks.extractive_qa import ExtractiveQAExecutor

        return ExtractiveQAExecutor(loaded, config)
    if arch == "seq2seq":
        from pagedq.worker.engine.tasks.translate import Seq2SeqExecutor

        return Seq2SeqExecutor(loaded, config)
    if arch == "causal-lm":
        from pagedq.worker.engine.tasks.generative import GenerativeExecutor

        return GenerativeExecutor(loaded, config)
    raise ValueError(f"no executor for architecture {arch!r}")


def _append_id(ids: deque[str], request_id: str, _future: Future[Any]) -> None:
    ids.append(request_id)


def _shutting_down() -> WorkerShuttingDown:
    return WorkerShuttingDown("the worker stopped before this request finished; it goes back to its queue")


def submit_one(engine: Engine | Any, request: EngineRequest) -> Future[Any]:
    """`engine.submit(request)` (an `Engine` or `EngineLanes`): ModelNotFound is raised, not set on the future."""
    if request.model not in engine.executors:
        raise ModelNotFound(f"model {request.model!r} is not loaded on this worker")
    engine.submit_many([request])
    return request.future


class CoreShare:
    """The cores that engine threads stepping side by side split (`EngineLanes`): a thread runs its steps on
    at most `cores // (threads busy lately)` intra-op threads (one at least) -- busy lately: with work within
    the last `BUSY_WINDOW_S`, so that a model between two bursts of requests still counts, and a busy model's
    count does not flip at each of their gaps (a step that changes the count wakes OpenMP threads: slow) --
    so that models stepping side by side do not oversubscribe the cores with OpenMP threads waiting for
    each other."""

    BUSY_WINDOW_S = 0.2

    def __init__(self, cores: int) -> None:
        self.cores = max(cores, 1)
        self._busy_at: dict[int, float] = {}  # id() of an engine -> time.monotonic() it last had work

    def busy(self, engine: object) -> None:
        """`engine` has work now."""
        self._busy_at[id(engine)] = time.monotonic()

    def leave(self, engine: object) -> None:
        """`engine` stopped: it no longer counts."""
        self._busy_at.pop(id(engine), None)

    def cap(self) -> int:
        since = time.monotonic() - self.BUSY_WINDOW_S
        busy = sum(1 for at in list(self._busy_at.values()) if at >= since)
        return max(1, self.cores // max(busy, 1))


class Engine:
    """One engine thread and the models it steps (`EngineLanes` runs one per model). Thread-safe
    `submit`/`cancel`/`stats`/`ensure_alive`/`stop`; everything else runs on the engine thread."""

    def __init__(self, executors: dict[str, ModelExecutor], share: CoreShare | None = None,
                 thread_name: str = "pagedq-engine") -> None:
        self.executors = executors
        self._share, self._thread_name = share, thread_name
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._flights: dict[str, Flight] = {}  # by request id, in arrival order
        # What each iteration looks at, so that it costs O(what changed), not O(flights): a bulk of thousands
        # is in flight at once. Completed request ids (a done-callback appends), and deadlines in a heap.
        self._completed: deque[str] = deque()
        self._deadlines: list[tuple[float, int, Flight]] = []
        self._arrivals = 0
        self._lock = threading.Lock()  # orders start / submit / stop / restarts
        self._started = self._stopping = False
        self._drain_until = math.inf  # time.monotonic() after which `stop` fails what is left
        self._death: BaseException | None = None  # what ended the previous thread
        self._thread = self._new_thread(recover=False)
        self._stats: dict[str, ModelStats] = {}
        self._stats_at = -math.inf  # time.monotonic() of the last snapshot
        self._stepped_at = 0.0  # time.monotonic() of the latest step (after the first snapshot's -inf: one is due)
        self._counters = dict.fromkeys(
            ("steps", "requests_submitted", "requests_finished", "step_errors", "isolated_requests", "restarts",
             "loop_errors"), 0)  # fmt: skip
        self._isolator = Isolator(self._flights, self._counters)
        #: intra-op threads of a model that sets none: the constructing thread's (the worker's main thread: one
        #: per core, or OMP_NUM_THREADS); read here, as another engine thread's `set_num_threads` moves torch's
        #: global count that a new thread would read
        self._default_threads = torch.get_num_threads()
        self._step_threads = {name: StepThreads(ex.config.intra_op_threads, self._default_threads)
                              for name, ex in executors.items()}

    # ---- called from any thread -------------------------------------------------------------
    def start(self) -> Engine:
        with self._lock:
            self._started = True
            self._thread.start()
        return self

    def stop(self, drain_s: float = 0.0) -> None:
        """Refuse new requests (`submit` raises WorkerShuttingDown); let the in-flight ones run for up to
        `drain_s` seconds; fail what is left with WorkerShuttingDown; return when the thread has ended (or
        `STOP_GRACE_S` after the drain if a step hangs: its requests then fail when it returns)."""
        self.begin_stop(drain_s)
        self.finish_stop(time.monotonic() + max(drain_s, 0.0) + STOP_GRACE_S)

    def begin_stop(self, drain_s: float = 0.0) -> None:
        """`stop`'s first half: refuse new requests, and give the in-flight ones `drain_s` seconds."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._drain_until = time.monotonic() + max(drain_s, 0.0)
        self._inbox.put(("wake", None))

    def finish_stop(self, deadline: float) -> None:
        """`stop`'s second half: wait for the thread until `deadline` (time.monotonic()), then fail what is left."""
        with self._lock:
            thread = self._thread if self._started else None
        if thread is not None:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if thread is None or not thread.is_alive():
            self._shut_down()  # nothing left unless the thread had died, or never started
        else:
            log.error("the engine thread is still in a step %.0f s after the drain ended", STOP_GRACE_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def restarts(self) -> int:
        """How often `ensure_alive` restarted the thread."""
        return self._counters["restarts"]

    def ensure_alive(self) -> bool:
        """Watchdog: restart the engine thread if it died while the engine was not stopping.

        Returns whether a thread is running now. The new thread first re-runs every in-flight request: the
        requests of the model the old thread died in are bisected like those of a failed step."""
        with self._lock:
            if self._thread.is_alive():
                return True
            if self._stopping or not self._started:
                return False
            self._counters["restarts"] += 1
            log.error("the engine thread died (%r); restarting it", self._death)
            self._thread = self._new_thread(recover=True)
            self._thread.start()
            return True

    def submit(self, request: EngineRequest) -> Future[Any]:
        return submit_one(self, request)

    def submit_many(self, requests: Sequence[EngineRequest]) -> None:
        """Submit requests in one hand-off to the engine thread, after each model's executor prepared its
        requests here, in the caller's thread (`ModelExecutor.prepare`: the classifier tokenizes, and the Rust
        tokenizer runs outside the GIL). A request for a model not loaded here fails alone (ModelNotFound, on
        its future); WorkerShuttingDown or EngineError (the engine does not run) concern them all and are
        raised, with nothing submitted."""
        self.check_open()
        self.enqueue(self.prepare(requests))

    def check_open(self) -> None:
        """Raise WorkerShuttingDown once stopping, EngineError before `start`."""
        with self._lock:
            if self._stopping:
                raise WorkerShuttingDown("the worker is shutting down; the task goes back to its queue")
            if not self._started:
                raise EngineError("the engine thread is not running")

    def prepare(self, requests: Sequence[EngineRequest]) -> list[EngineRequest]:
        """`submit_many`'s work in the caller's thread: each executor prepares its requests; a request for a
        model not loaded here fails (ModelNotFound). Returns the others, for `enqueue`."""
        by_model: dict[str, list[EngineRequest]] = {}
        for request in requests:
            if request.model in self.executors:
                by_model.setdefault(request.model, []).append(request)
            else:
                request.fail(ModelNotFound(f"model {request.model!r} is not loaded on this worker"))
        for model, group in by_model.items():
            try:
                self.executors[model].prepare(group)
            except Exception as exc:  # noqa: BLE001 - an optimisation only: the executor computes it in `step`
                # (a broken input, say: the step then fails it alone by bisection)
                log.warning("preparing %d requests of %s failed (%r); the engine thread will", len(group), model, exc)
                for request in group:
                    request.prepared = None
        return [r for group in by_model.values() for r in group]

    def enqueue(self, requests: list[EngineRequest]) -> None:
        """Hand prepared requests to the engine thread (raises WorkerShuttingDown once stopping)."""
        with self._lock:
            if self._stopping:
                raise WorkerShuttingDown("the worker is shutting down; the task goes back to its queue")
            self._inbox.put(("add", requests))
        self.ensure_alive()

    def cancel(self, request_id: str, error: BaseException | None = None) -> None:
        """Ask the engine to drop a request; its blocks are freed by the next loop iteration."""
        self._inbox.put(("abort", (request_id, error or TaskCancelled("cancelled by the user"))))

    def stats(self) -> dict[str, Any]:
        """A snapshot: engine counters, `alive`, and each model's executor stats (refreshed by the loop every
        `STATS_INTERVAL_S`)."""
        engine: dict[str, Any] = {**self._counters, "alive": self.alive}
        return {"engine": engine, "models": {k: v.as_dict() for k, v in self._stats.items()}}

    def model_stats(self) -> dict[str, ModelStats]:
        """Each model's executor stats as of the last loop iteration."""
        return dict(self._stats)

    # ---- engine thread: the loop -----------------------------------------------------------------
    def _new_thread(self, recover: bool) -> threading.Thread:
        return threading.Thread(target=self._run, args=(recover,), name=self._thread_name, daemon=True)

    def _run(self, recover: bool) -> None:
        try:
            log.info("engine thread started with models %s", sorted(self.executors))
            if recover:
                self._isolator.recover(self.executors.values(), self._death or EngineError("the thread died"))
            while not self._drained():
                self._iteration()
            self._shut_down()
        except BaseException as exc:  # noqa: BLE001 - the thread ends here; `ensure_alive` restarts it
            self._death = exc
            log.critical("the engine thread died", exc_info=exc)

    def _drained(self) -> bool:
        """Stopping, and nothing left to run (or the drain time is over)."""
        if not self._stopping:
            return False
        return (not self._flights and self._inbox.empty()) or time.monotonic() >= self._drain_until

    def _iteration(self) -> None:
        try:
            busy = [name for name, ex in self.executors.items() if self._isolator.has_work(ex)]
            if not busy and self._stats_at < self._stepped_at:
                self._snapshot()  # the last steps' stats, before the loop blocks (a snapshot is never older)
            self._drain_inbox(block=not busy)
            self._expire()
            busy = busy or [name for name, ex in self.executors.items() if self._isolator.has_work(ex)]
            if busy and self._share is not None:
                self._share.busy(self)
            for name in busy:
                self._step(name)
            self._reap()
        except Exception:  # noqa: BLE001 - a bug in one iteration must not end the loop
            self._counters["loop_errors"] += 1
            log.exception("an engine loop iteration failed")
            time.sleep(IDLE_WAIT_S)  # never spin on a fault that repeats every iteration

    def _step(self, name: str) -> None:
        """One step of a model, with the intra-op threads its `StepThreads` chooses (and tells how it went)."""
        executor = self.executors[name]
        self._stepped_at = time.monotonic()
        cap = self._share.cap() if self._share is not None else None
        self._step_threads[name].step(lambda: self._isolator.step(executor), executor.work_done, executor.saturated,
                                      cap, executor.planned_tokens())

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_BLOCK_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                for request in payload:
                    self._add(request)
            elif kind == "abort":
                self._abort(*payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, request: EngineRequest) -> None:
        self._counters["requests_submitted"] += 1
        if request.future.done():
            return
        flight = self._flights[request.id] = Flight(request, self.executors[request.model])
        request.future.add_done_callback(functools.partial(_append_id, self._completed, request.id))
        if request.deadline is not None:
            self._arrivals += 1
            heapq.heappush(self._deadlines, (request.deadline, self._arrivals, flight))
        self._isolator.add(flight)

    def _abort(self, request_id: str, error: BaseException) -> None:
        flight = self._flights.pop(request_id, None)
        if flight is not None:
            flight.abort(error)

    def _expire(self) -> None:
        now = time.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, flight = heapq.heappop(self._deadlines)
            request_id = flight.request.id
            if self._flights.get(request_id) is flight and not flight.done:
                self._abort(request_id, DeadlineExceeded(f"deadline passed before task {request_id} finished"))

    def _reap(self) -> None:
        while self._completed:
            request_id = self._completed.popleft()
            flight = self._flights.get(request_id)
            if flight is not None and flight.done:  # not a newer flight that reuses the id (a redelivery)
                del self._flights[request_id]
                self._counters["requests_finished"] += 1
        if len(self._deadlines) > 2 * len(self._flights) + 1024:  # finished flights' entries: drop them
            self._deadlines = [entry for entry in self._deadlines if not entry[2].done]
            heapq.heapify(self._deadlines)
        if time.monotonic() - self._stats_at >= STATS_INTERVAL_S:  # for other threads, not every iteration's work
            self._snapshot()

    def _snapshot(self) -> None:
        self._stats_at = time.monotonic()
        for name, executor in self.executors.items():
            threads = self._step_threads[name]
            self._stats[name] = replace(executor.stats(), intra_op_threads=threads.last or threads.options[-1],
                                        intra_op_auto=threads.table() if threads.auto else None)

    # ---- engine thread: shutdown ---------------------------------------------------------------------
    def _shut_down(self) -> None:
        """Fail every request still in flight or in the inbox with WorkerShuttingDown (it is handed back to
        its queue, not stored as a failure)."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                for request in payload:
                    request.fail(_shutting_down())
        for request_id in list(self._flights):
            self._abort(request_id, _shutting_down())
        self._isolator.quarantines.clear()
        if self._share is not None:
            self._share.leave(self)
