"""Prometheus metrics of a worker, in the vocabulary operators already alert on (vLLM's names).

Histograms and outcome counters are observed by the task threads; engine gauges and counters are read
from `EngineLanes.stats()` at scrape time by a collector, so the engine's hot loop does no metrics work.
"""

from __future__ import annotations

import functools
import time
from collections import Counter as Counter_
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pagedq.worker.engine.lanes import EngineLanes
    from pagedq.worker.engine.process import EngineProcess

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

E2E_LATENCY = Histogram("pagedq_e2e_request_latency_seconds", "Submission to result, per task type and model.",
                        ["task", "model"], buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("pagedq_request_queue_time_seconds", "Submission to start on a worker.",
                       ["task", "model"], buckets=LATENCY_BUCKETS)
TASKS = Counter("pagedq_tasks", "Tasks finished on this worker: outcome succeeded, user_error (the request was "
                "at fault: invalid, unknown model, unsupported language pair), failed, expired or cancelled.",
                ["task", "model", "outcome"])
TASK_ERRORS = Counter("pagedq_task_errors", "Tasks that did not succeed, by the error's type.",
                      ["task", "model", "type"])
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10)
TTFT = Histogram("pagedq_time_to_first_token_seconds", "From the engine taking a generative task to its first "
                 "token (paged engines; the generate fallback produces all tokens at once and is not observed).",
                 ["task", "model"], buckets=LATENCY_BUCKETS)
TPOT = Histogram("pagedq_time_per_output_token_seconds", "Mean time per output token after the first, per "
                 "generative task of more than one token.", ["task", "model"], buckets=TOKEN_BUCKETS)
PROMPT_TOKENS = Counter("pagedq_prompt_tokens", "Input tokens the model read (after truncation), of succeeded "
                        "tasks.", ["task", "model"])
GENERATION_TOKENS = Counter("pagedq_generation_tokens", "Tokens generated for succeeded tasks (translation, "
                            "generative QA).", ["task", "model"])

#: error types of a failed task that say the request was at fault, not the service
USER_ERRORS = frozenset({"InvalidRequest", "ModelNotFound", "UnsupportedLanguagePair"})

#: `ModelStats` field -> (metric name, help, kind)
ENGINE_METRICS = {
    "num_requests_running": ("pagedq_num_requests_running", "Requests in the engine's running set.", "gauge"),
    "num_requests_waiting": ("pagedq_num_requests_waiting", "Requests waiting in the engine.", "gauge"),
    "kv_cache_usage_perc": ("pagedq_kv_cache_usage_perc", "Share of KV blocks in use (0..1).", "gauge"),
    "prefix_cache_queries": ("pagedq_prefix_cache_queries", "Tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hits": ("pagedq_prefix_cache_hits", "Tokens found in the prefix cache.", "counter"),
    "num_preemptions": ("pagedq_num_preemptions", "Requests preempted to free KV blocks.", "counter"),
    "steps": ("pagedq_engine_steps", "Batched model steps run.", "counter"),
}

#: each model's engine thread (`EngineLanes.threads()`): metric name and help
THREAD_METRICS = {
    "alive": ("pagedq_engine_thread_alive", "1 while the engine thread stepping the model runs (a dead one is "
              "restarted by the watchdog at the next heartbeat)."),
    "restarts": ("pagedq_engine_thread_restarts", "Times the watchdog restarted the engine thread stepping the model."),
}


@functools.cache
def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once (`labels()` takes a lock and checks its arguments each time:
    ~2.5 us, five times per task)."""
    return metric.labels(*labels)


class Finished(NamedTuple):
    """One task's end, as `tasks_finished` counts it: its final `state` (a failure the request caused counts
    as user_error), its error's type, a succeeded task's `result` (its tokens) and `timing` (monotonic
    seconds: taken by the engine, first token, finished: TTFT and TPOT)."""

    model: str
    message: dict[str, Any]
    state: str
    error_type: str | None = None
    result: dict[str, Any] | None = None
    timing: tuple[float, float | None, float | None] | None = None


def tasks_started(task: str, started: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Observe each task's queue time (submission to start on this worker): (model, message) pairs."""
    now = time.time()
    for model, message in started:
        submitted = message.get("submitted_at") if isinstance(message, dict) else None
        if isinstance(submitted, int | float):
            _child(QUEUE_TIME, task, model).observe(max(0.0, now - submitted))


def tasks_finished(task: str, finished: Iterable[Finished]) -> None:
    """Count the tasks' outcomes, errors and tokens -- one increment per series for all of them (a bulk's
    finalize ends tens of tasks at once: an increment takes a lock, ~0.5 us) -- and observe each one's
    end-to-end latency (and TTFT, TPOT)."""
    now = time.time()
    counts: Counter_[tuple[Any, ...]] = Counter_()
    for f in finished:
        if f.result and f.timing is not None:
            _observe_token_times(task, f.model, f.result, *f.timing)
        counts[(TASKS, task, f.model, "user_error" if f.error_type in USER_ERRORS else f.state)] += 1
        if f.result:
            if isinstance(tokens := f.result.get("input_tokens"), int) and tokens > 0:
                counts[(PROMPT_TOKENS, task, f.model)] += tokens
            if isinstance(tokens := f.result.get("output_tokens"), int) and tokens > 0:
                counts[(GENERATION_TOKENS, task, f.model)] += tokens
        if f.error_type is not None:
            counts[(TASK_ERRORS, task, f.model, f.error_type)] += 1
        submitted = f.message.get("submitted_at") if isinstance(f.message, dict) else None
        if isinstance(submitted, int | float):
            _child(E2E_LATENCY, task, f.model).observe(max(0.0, now - submitted))
    for (metric, *labels), amount in counts.items():
        _child(metric, *labels).inc(amount)


def _observe_token_times(task: str, model: str, result: dict[str, Any], arrival: float, first: float | None,
                         finished: float | None) -> None:
    if first is None:
        return
    _child(TTFT, task, model).observe(max(0.0, first - arrival))
    tokens = result.get("output_tokens")
    if finished is not None and isinstance(tokens, int) and tokens > 1:
        _child(TPOT, task, model).observe(max(0.0, finished - first) / (tokens - 1))


class EngineCollector(Collector):
    def __init__(self, engine: EngineLanes | EngineProcess) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        models = self.engine.model_stats()
        for key, (name, doc, kind) in ENGINE_METRICS.items():
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=["model"])
            for model, stats in models.items():
                if stats.path != "refused":  # a refused model has nothing to report
                    family.add_metric([model], float(getattr(stats, key)))
            yield family
        alive = GaugeMetricFamily(*THREAD_METRICS["alive"], labels=["model"])
        restarts = CounterMetricFamily(*THREAD_METRICS["restarts"], labels=["model"])
        for model, (running, count) in self.engine.threads().items():
            alive.add_metric([model], float(running))
            restarts.add_metric([model], float(count))
        yield alive
        yield restarts


def start_metrics(engine: EngineLanes | EngineProcess, port: int) -> EngineCollector:
    """Register the engine collector and serve /metrics on `port` (0: register only)."""
    collector = EngineCollector(engine)
    REGISTRY.register(collector)
    if port:
        start_http_server(port)
    return collector
