"""The worker's engine: one thread that micro-batches every in-flight request through its model's executor.

```
 Celery task threads                      engine thread (this module)
 ───────────────────                      ─────────────────────────────────────────────
 submit(req) ──► inbox ──────────────────► drain inbox: executor.add(req) / executor.abort(id)
 cancel(id)  ──► inbox                     expire requests past their deadline
 future.result(timeout) ◄── completed ──── executor.step() for every model with work (round-robin)
```

Invariants: executors are touched only by the engine thread; every submitted request's future is completed
exactly once (result, DeadlineExceeded, TaskCancelled or EngineError); an executor whose `step()` raises
fails only its own requests, and the loop keeps running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from shared.errors import DeadlineExceeded, EngineError, ModelNotFound, TaskCancelled
from worker.engine.executor import EngineConfig, EngineRequest, LoadedModel, ModelExecutor

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the loop blocks on the inbox when no executor has work


def make_executor(loaded: LoadedModel, config: EngineConfig) -> ModelExecutor:
    """The executor class for a model's architecture (imported lazily: each pulls its own deps)."""
    arch = loaded.spec.architecture
    if arch == "sequence-classification":
        from worker.engine.classify import ClassificationExecutor

        return ClassificationExecutor(loaded, config)
    if arch == "question-answering":
        from worker.engine.extractive_qa import ExtractiveQAExecutor

        return ExtractiveQAExecutor(loaded, config)
    if arch == "seq2seq":
        from worker.engine.translate import Seq2SeqExecutor

        return Seq2SeqExecutor(loaded, config)
    if arch == "causal-lm":
        from worker.engine.generative import GenerativeExecutor

        return GenerativeExecutor(loaded, config)
    raise ValueError(f"no executor for architecture {arch!r}")


class Engine:
    """One per worker process. Thread-safe `submit`/`cancel`/`stats`; everything else runs on its thread."""

    def __init__(self, executors: dict[str, ModelExecutor]) -> None:
        self.executors = executors
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._inflight: dict[str, tuple[EngineRequest, ModelExecutor]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedq-engine", daemon=True)
        self._stats: dict[str, dict[str, float]] = {}
        self._counters = {"steps": 0, "requests_submitted": 0, "requests_finished": 0, "step_errors": 0}

    # ---- called from any thread -------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: EngineRequest) -> Future[Any]:
        if request.model not in self.executors:
            raise ModelNotFound(f"model {request.model!r} is not loaded on this worker")
        if not self.alive:
            raise EngineError("the engine thread is not running")
        self._inbox.put(("add", request))
        return request.future

    def cancel(self, request_id: str, error: BaseException | None = None) -> None:
        """Ask the engine to drop a request; its blocks are freed by the next loop iteration."""
        self._inbox.put(("abort", (request_id, error or TaskCancelled("cancelled by the user"))))

    def stats(self) -> dict[str, Any]:
        """A snapshot: engine counters plus each model's executor stats (refreshed every loop)."""
        return {"engine": dict(self._counters), "models": {k: dict(v) for k, v in self._stats.items()}}

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        log.info("engine thread started with models %s", sorted(self.executors))
        while not self._stop.is_set():
            busy = [ex for ex in self.executors.values() if ex.has_work()]
            self._drain_inbox(block=not busy)
            self._expire()
            for executor in busy or [ex for ex in self.executors.values() if ex.has_work()]:
                self._step(executor)
            self._reap()
        for request_id in list(self._inflight):
            self._abort(request_id, EngineError("the worker is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._add(payload)
            elif kind == "abort":
                self._abort(*payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, request: EngineRequest) -> None:
        executor = self.executors[request.model]
        self._counters["requests_submitted"] += 1
        if request.future.done():
            return
        self._inflight[request.id] = (request, executor)
        executor.add(request)

    def _abort(self, request_id: str, error: BaseException) -> None:
        entry = self._inflight.pop(request_id, None)
        if entry is None:
            return
        request, executor = entry
        if not executor.abort(request_id, error):
            request.fail(error)

    def _expire(self) -> None:
        now = time.time()
        for request_id, (request, _) in list(self._inflight.items()):
            if request.expired(now):
                self._abort(request_id, DeadlineExceeded(f"deadline passed before task {request_id} finished"))

    def _step(self, executor: ModelExecutor) -> None:
        try:
            executor.step()
            self._counters["steps"] += 1
        except Exception as exc:  # noqa: BLE001 - one model's failure must not stop the engine
            self._counters["step_errors"] += 1
            log.exception("executor %s failed a step", executor.loaded.spec.name)
            for request_id, (_, owner) in list(self._inflight.items()):
                if owner is executor:
                    self._abort(request_id, EngineError(f"{type(exc).__name__}: {exc}"))

    def _reap(self) -> None:
        done = [rid for rid, (req, _) in self._inflight.items() if req.future.done()]
        for request_id in done:
            del self._inflight[request_id]
        self._counters["requests_finished"] += len(done)
        for name, executor in self.executors.items():
            self._stats[name] = executor.stats()
