"""The worker's engine threads: one per model (a lane), stepping side by side.

One engine thread stepping every model in turn leaves cores idle on a worker that serves several models at
once: while a step runs Python (transformers' modules, the executor's bookkeeping: one core, holding the GIL)
the other cores wait, and every model waits for the others' steps. With a thread per model, one model's
Python runs while another's matrix products run (torch releases the GIL in its kernels), and a slow step of
one model (a long translation batch) no longer delays the next step of another (a classifier's). Measured on
W5's realistic mix (2 vCPUs; classifier, extractive QA and translator busy at once), against one thread for
all: +10% tasks/s with each thread on torch's two intra-op threads, +12-15% with the threads sharing the
cores (`CoreShare`, below), the worker's CPU use 1.37 -> 1.55-1.63 cores; the whole W5 mix 4.96x -> 6.14x the
naive worker (README, W5).

Each lane is an `Engine` with a single model, so every per-engine guarantee holds per model (each request's
future completed once, one request cannot fail another, a dead thread restarted by `ensure_alive`); and one
model's fault or restart no longer stalls the others. The lanes share the cores (`CoreShare`): a lane with
work runs its steps on at most `cores // (lanes with work)` intra-op threads, so three busy models on two cores
step on one thread each instead of six OpenMP threads waiting for each other, and a model busy alone keeps
them all (a fixed `intra_op_threads` count in the registry is kept as set).

`per_model=False` (`PAGEDQ_ENGINE_THREADS=shared`) runs every model in one lane: the former behaviour, one step
per busy model in turn.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from pagedq.shared.errors import ModelNotFound, WorkerShuttingDown
from pagedq.worker.engine.core.executor import EngineRequest, ModelExecutor, ModelStats
from pagedq.worker.engine.service import STOP_GRACE_S, CoreShare, Engine, submit_one

#: engine counters that are not summed over the lanes
_FLAGS = ("alive",)


class EngineLanes:
    """`Engine`'s interface over one engine thread per model (or one for all: `per_model=False`)."""

    def __init__(self, executors: dict[str, ModelExecutor], per_model: bool = True) -> None:
        self.executors = executors
        # the constructing thread's count (the worker's main thread: one per core, or OMP_NUM_THREADS)
        self.share = CoreShare(torch.get_num_threads())
        groups = {name: {name: ex} for name, ex in executors.items()} if per_model else {"": dict(executors)}
        self.lanes = [Engine(group, self.share if per_model else None,
                             f"pagedq-engine:{key}" if key else "pagedq-engine")
                      for key, group in groups.items()]
        self._lane_of = {name: lane for lane in self.lanes for name in lane.executors}
        self._lock = threading.Lock()  # orders submissions against `stop`
        self._stopping = False

    def start(self) -> EngineLanes:
        for lane in self.lanes:
            lane.start()
        return self

    def stop(self, drain_s: float = 0.0) -> None:
        """`Engine.stop` for every lane at once: all refuse new requests first, then each drains for `drain_s`."""
        with self._lock:
            self._stopping = True
        for lane in self.lanes:
            lane.begin_stop(drain_s)
        deadline = time.monotonic() + max(drain_s, 0.0) + STOP_GRACE_S
        for lane in self.lanes:
            lane.finish_stop(deadline)

    @property
    def alive(self) -> bool:
        return all(lane.alive for lane in self.lanes)

    def ensure_alive(self) -> bool:
        return all([lane.ensure_alive() for lane in self.lanes])  # a list: every lane is checked

    def submit(self, request: EngineRequest) -> Future[Any]:
        return submit_one(self, request)

    def submit_many(self, requests: Sequence[EngineRequest]) -> None:
        """`Engine.submit_many` over the lanes: each lane's executors prepare their requests in the caller's
        thread, then every lane gets its share, or (WorkerShuttingDown, EngineError) none does."""
        by_lane: dict[Engine, list[EngineRequest]] = {}
        unknown = []
        for request in requests:
            lane = self._lane_of.get(request.model)
            if lane is None:
                unknown.append(request)
            else:
                by_lane.setdefault(lane, []).append(request)
        with self._lock:
            if self._stopping:
                raise WorkerShuttingDown("the worker is shutting down; the task goes back to its queue")
        for lane in by_lane:
            lane.check_open()
        for request in unknown:
            request.fail(ModelNotFound(f"model {request.model!r} is not loaded on this worker"))
        prepared = [(lane, lane.prepare(group)) for lane, group in by_lane.items()]
        with self._lock:  # `stop` refuses on every lane at once: all of them take their share, or none does
            if self._stopping:
                raise WorkerShuttingDown("the worker is shutting down; the task goes back to its queue")
            for lane, group in prepared:
                lane.enqueue(group)

    def cancel(self, request_id: str, error: BaseException | None = None) -> None:
        """Every lane is told (the one running the request drops it; to the others the id is unknown)."""
        for lane in self.lanes:
            lane.cancel(request_id, error)

    def stats(self) -> dict[str, Any]:
        engine: dict[str, Any] = {"alive": self.alive, "lanes": len(self.lanes)}
        models: dict[str, Any] = {}
        for lane in self.lanes:
            stats = lane.stats()
            for key, value in stats["engine"].items():
                if key not in _FLAGS:
                    engine[key] = engine.get(key, 0) + value
            models.update(stats["models"])
        return {"engine": engine, "models": models}

    def threads(self) -> dict[str, tuple[bool, int]]:
        """Each model's engine thread: (alive, restarts so far)."""
        return {name: (lane.alive, lane.restarts) for lane in self.lanes for name in lane.executors}

    def model_stats(self) -> dict[str, ModelStats]:
        return {name: stats for lane in self.lanes for name, stats in lane.model_stats().items()}
