"""W5 on pagedq: its clients under load (Python client and HTTP API), one bulk submission, one task at a time on
an idle stack, and the engine's ceiling (the classifier's executor in this process, no queue).

Every pagedq task is run as `TaskHandle.result()` runs it -- `wait()` then `result_of(status)` -- so that the
final status's timestamps show where the time went (`stages`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from w5_load import Outcome, Sample
from w5_workload import Job

from pagedq.producer.base import BaseClient
from pagedq.producer.client import Client, HTTPClient
from pagedq.producer.handle import result_of
from pagedq.shared.models import ClassifyRequest, TaskStatus, TaskType
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings
from pagedq.worker.engine.core.executor import EngineRequest, ModelExecutor
from pagedq.worker.engine.service import make_executor
from pagedq.worker.engine.threads import StepThreads
from pagedq.worker.registry import load_model
from pagedq.worker.runtime import engine_config, model_config


@dataclass
class Trace:
    """One task as its client saw it (wall clock, epoch s) and its final status."""

    submit_s: float  # the submit call started
    sent_s: float  # the submit call returned (validated, recorded, enqueued)
    done_s: float  # the final status reached the client
    status: TaskStatus

    def stages(self) -> dict[str, float]:
        """Seconds in each stage: submit call, until a worker claimed it, in the worker, back to the client."""
        started, finished = self.status.started_at, self.status.finished_at
        if started is None or finished is None:
            return {}
        return {
            "submit": self.sent_s - self.submit_s,
            "to worker": started.timestamp() - self.sent_s,
            "in worker": (finished - started).total_seconds(),
            "back": self.done_s - finished.timestamp(),
        }


def run_job(client: BaseClient, job: Job, timeout_s: float) -> Trace:
    """Submit one job and wait for its result (TaskFailed / TimeoutError if it has none)."""
    submit = time.time()
    handle = getattr(client, job.kind)(**job.fields)  # client.classify(text=...), .translate(...), .qa(...)
    sent = time.time()
    status = handle.wait(timeout_s)
    result_of(status)
    return Trace(submit, sent, time.time(), status)


@contextmanager
def client_session(settings: Settings, timeout_s: float) -> Iterator[Callable[[Job], Trace]]:
    with Client(settings=settings) as client:
        yield lambda job: run_job(client, job, timeout_s)


@contextmanager
def http_session(url: str, api_key: str, timeout_s: float) -> Iterator[Callable[[Job], Trace]]:
    with HTTPClient(url, api_key=api_key) as api:
        yield lambda job: run_job(api, job, timeout_s)


def one_at_a_time(settings: Settings, jobs: Sequence[Job], timeout_s: float, pause_s: float = 0.05) -> Outcome:
    """Each job alone on the stack: submit, wait for its result, pause `pause_s` (not timed), next."""
    samples = []
    with client_session(settings, timeout_s) as run:
        for job in jobs:
            start = time.perf_counter()
            trace = run(job)
            samples.append(Sample(time.perf_counter() - start, trace))
            time.sleep(pause_s)
    return Outcome(sum(s.latency_s for s in samples), samples)


def bulk(settings: Settings, texts: Sequence[str], timeout_s: float) -> Outcome:
    """One `bulk_classify` of every text, then `wait_all`. Latency of a task: from the bulk call to its
    `finished_at` (the worker's clock). `extra["bulk call"]`: how long the bulk call itself took."""
    with Client(settings=settings) as client:
        start, wall = time.perf_counter(), time.time()
        handles = client.bulk_classify(texts)
        submitted = time.perf_counter() - start
        statuses = client.wait_all([h.id for h in handles], timeout=timeout_s)
        seconds = time.perf_counter() - start
    samples, failures = [], []
    for status in statuses:
        try:
            result_of(status)
        except Exception as exc:  # noqa: BLE001 - counted
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        assert status.finished_at is not None
        samples.append(Sample(status.finished_at.timestamp() - wall, status))
    return Outcome(seconds, samples, failures, {"bulk call": submitted})


class InProcess:
    """The default classifier loaded as the worker loads it, with the worker's engine settings and its registry
    entry's (`model_config`: its intra-op threads among them, chosen per step as the engine thread chooses them:
    `StepThreads`), in this process: `run(texts)` adds every text to its executor at once, then `step()`s until
    done, and returns the outcome and the run's mean requests per step. Latency: from the first add to each
    request's result."""

    def __init__(self, registry_path: Path, settings: Settings, warmup_texts: Sequence[str]) -> None:
        registry = Registry.load(registry_path)
        spec = registry.models[registry.defaults[TaskType.CLASSIFY]]
        config = model_config(spec, engine_config(settings))
        self.model = spec.name
        self.threads = StepThreads(config.intra_op_threads, torch.get_num_threads())  # as the engine's
        self.executor = make_executor(load_model(spec, registry, settings.device), config)
        _drive(self.executor, self.model, warmup_texts, self._step)

    def _step(self) -> None:
        self.threads.step(self.executor.step, self.executor.work_done, self.executor.saturated,
                          planned=self.executor.planned_tokens())

    def run(self, texts: Sequence[str]) -> tuple[Outcome, float]:
        before, threads = self.executor.stats(), torch.get_num_threads()
        try:
            outcome = _drive(self.executor, self.model, texts, self._step)
        finally:
            torch.set_num_threads(threads)
        after = self.executor.stats()
        finished = after.num_requests_finished - before.num_requests_finished
        return outcome, finished / max(after.steps - before.steps, 1)


def _drive(executor: ModelExecutor, model: str, texts: Sequence[str], step: Callable[[], None]) -> Outcome:
    requests = [
        EngineRequest(id=f"w5-{i}", task=TaskType.CLASSIFY, payload=ClassifyRequest(text=t), model=model)
        for i, t in enumerate(texts)
    ]
    finished: dict[str, float] = {}
    for request in requests:
        request.future.add_done_callback(lambda _f, rid=request.id: finished.__setitem__(rid, time.perf_counter()))
    start = time.perf_counter()
    for request in requests:
        executor.add(request)
    while executor.has_work():
        step()
    seconds = time.perf_counter() - start
    failures = [repr(r.future.exception()) for r in requests if r.future.exception() is not None]
    samples = [Sample(finished[r.id] - start) for r in requests if r.future.exception() is None]
    return Outcome(seconds, samples, failures)


def stage_medians(samples: Sequence[Sample]) -> dict[str, float]:
    """Median seconds per stage over the samples whose value is a `Trace`."""
    stages = [s.value.stages() for s in samples if isinstance(s.value, Trace)]
    stages = [s for s in stages if s]
    if not stages:
        return {}
    return {name: statistics.median(s[name] for s in stages) for name in stages[0]}
