"""The worker's Celery app: `celery -A pagedq.worker.app worker -P threads -c 64 -Q pagedq.classify,...`.

Threads pool only: prefork + CUDA fails ("Cannot re-initialize CUDA in forked subprocess") and solo
blocks heartbeats and `inspect`. `EngineStep` loads the models, starts the engine and takes the worker's
lease before the consumer starts (Celery starts the Consumer step last), so no message is taken before
the models are ready.

Warm shutdown (SIGTERM), in Celery's reverse start order: the consumer stops taking messages; then
`EngineStep.stop` lets in-flight requests finish for up to `PAGEDQ_DRAIN_TIMEOUT_S` and hands the rest
back to their queues (never stored as failed); then the pool joins the task threads and the process exits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from celery import bootsteps

from pagedq.shared import kombu_compat
from pagedq.shared.celery_config import make_celery
from pagedq.shared.settings import get_settings
from pagedq.worker import consumer_io
from pagedq.worker.metrics import start_metrics
from pagedq.worker.runtime import WorkerRuntime, freeze_startup_heap
from pagedq.worker.tasks import register_tasks

log = logging.getLogger(__name__)


class EngineStep(bootsteps.StartStopStep):
    """Starts the pagedq engine with the worker; its `info()` shows up in Flower and `inspect stats`."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        settings = get_settings()
        if worker.pool_cls.__module__.split(".")[-1] != "thread":
            log.warning("pagedq expects the threads pool (-P threads); got %s", worker.pool_cls.__module__)
        runtime = WorkerRuntime.start(settings)
        runtime.start_lease(worker.app, worker.hostname, lambda: _held_tags(worker))
        worker.app.pagedq_runtime = runtime
        start_metrics(runtime.engine, settings.metrics_port)
        freeze_startup_heap()
        log.info("pagedq engine ready: models %s, metrics on :%s", sorted(runtime.registry.models),
                 settings.metrics_port)

    def stop(self, worker: Any) -> None:
        runtime = getattr(worker.app, "pagedq_runtime", None)
        if runtime is not None:
            drain_s = get_settings().drain_timeout_s
            log.info("pagedq: draining in-flight requests for up to %.1f s", drain_s)
            runtime.stop(drain_s=drain_s)

    def info(self, worker: Any) -> dict[str, Any]:
        runtime = getattr(worker.app, "pagedq_runtime", None)
        if runtime is None:
            return {"pagedq": {"ready": False}}
        # "models" (from the engine stats): each model's executor stats; "model_states": each registry model,
        # `loaded: <source>` or `refused: <reason>`
        stats = runtime.engine.stats()
        raw = {"ready": runtime.engine.alive, "worker_id": runtime.worker_id,
               "model_states": runtime.model_states(), **stats}
        # Flower's worker page lists every key here as a row of its "Other" tab: one readable line for the
        # engine and one per model, beside the raw dict that tools (`celery inspect stats`) read
        rows = {"pagedq engine": _engine_line(raw), **{
            f"pagedq model {name}": _model_line(state, stats["models"].get(name, {}))
            for name, state in raw["model_states"].items()}}
        return {"pagedq": raw, **rows}


def _engine_line(raw: dict[str, Any]) -> str:
    engine = raw.get("engine", {})
    state = "running" if raw["ready"] else "NOT running"
    threads = engine.get("lanes", 1)
    return (f"{state} ({threads} engine thread{'s' if threads != 1 else ''}); "
            f"{engine.get('requests_submitted', 0):,} requests submitted, "
            f"{engine.get('requests_finished', 0):,} finished, {engine.get('steps', 0):,} steps, "
            f"{engine.get('step_errors', 0)} step errors, {engine.get('isolated_requests', 0)} requests isolated, "
            f"{engine.get('restarts', 0)} thread restarts; worker id {raw['worker_id']}")


def _model_line(state: str, stats: dict[str, Any]) -> str:
    """`loaded: <source>` or `refused: <reason>`, then what the model's executor is doing."""
    if state.startswith("refused"):
        return state
    parts = [state]
    if stats.get("path"):
        why = f" ({stats['path_reason']})" if stats.get("path_reason") else ""
        parts.append(f"path {stats['path']}{why}")
    parts.append(f"{stats.get('num_requests_running', 0):g} running, {stats.get('num_requests_waiting', 0):g} waiting")
    for key, label in (("num_requests_finished", "finished"), ("steps", "steps"),
                       ("generated_tokens", "tokens generated"), ("num_preemptions", "preemptions")):
        if stats.get(key):
            parts.append(f"{stats[key]:,.0f} {label}")
    if stats.get("path") == "paged":
        kv = f" ({stats['kv_cache_dtype']})" if stats.get("kv_cache_dtype") else ""
        parts.append(f"KV cache{kv} {100 * float(stats['kv_cache_usage_perc']):.0f}% used")
    if stats.get("intra_op_threads"):
        auto = " (auto)" if stats.get("intra_op_auto") is not None else ""
        parts.append(f"intra-op threads {stats['intra_op_threads']}{auto}")
    return "; ".join(parts)


def _held_tags(worker: Any) -> Iterator[str]:
    """Delivery tags of the messages this worker holds unacked (kombu's virtual QoS bookkeeping)."""
    consumer = getattr(worker, "consumer", None)
    task_consumer = getattr(consumer, "task_consumer", None)
    qos = getattr(getattr(task_consumer, "channel", None), "qos", None)
    delivered = getattr(qos, "_delivered", None)
    if not delivered:
        return iter(())
    for _ in range(3):  # the consumer thread may change the dict while we copy it
        try:
            dirty = set(getattr(qos, "_dirty", ()) or ())
            return iter([str(tag) for tag in list(delivered) if tag not in dirty])
        except RuntimeError:
            continue
    return iter(())


kombu_compat.install()  # a Redis restart must not stop the worker (see the module)
consumer_io.install(get_settings().consumer_read_max)  # fewer Redis round trips per message (see the module)
app = make_celery(main="pagedq-worker")
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = get_settings().worker_concurrency
app.steps["worker"].add(EngineStep)
register_tasks(app)
