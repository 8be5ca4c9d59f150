"""The worker's Celery app: `celery -A worker.app worker -P threads -c 64 -Q pagedq.classify,...`.

Threads pool only: prefork + CUDA fails ("Cannot re-initialize CUDA in forked subprocess") and solo
blocks heartbeats and `inspect`. `EngineStep` loads the models and starts the engine before the consumer
starts (Celery starts the Consumer step last), so no message is taken before the models are ready.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from shared.celery_config import make_celery
from shared.settings import get_settings
from worker.metrics import start_metrics
from worker.runtime import WorkerRuntime
from worker.tasks import register_tasks

log = logging.getLogger(__name__)


class EngineStep(bootsteps.StartStopStep):
    """Starts the pagedq engine with the worker; its `info()` shows up in Flower and `inspect stats`."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        settings = get_settings()
        if worker.pool_cls.__module__.split(".")[-1] != "thread":
            log.warning("pagedq expects the threads pool (-P threads); got %s", worker.pool_cls.__module__)
        runtime = WorkerRuntime.start(settings)
        worker.app.pagedq_runtime = runtime
        start_metrics(runtime.engine, settings.metrics_port)
        log.info("pagedq engine ready: models %s, metrics on :%s", sorted(runtime.registry.models),
                 settings.metrics_port)

    def stop(self, worker: Any) -> None:
        runtime = getattr(worker.app, "pagedq_runtime", None)
        if runtime is not None:
            runtime.stop()

    def info(self, worker: Any) -> dict[str, Any]:
        runtime = getattr(worker.app, "pagedq_runtime", None)
        if runtime is None:
            return {"pagedq": {"ready": False}}
        return {"pagedq": {"ready": runtime.engine.alive, "models": sorted(runtime.registry.models),
                           **runtime.engine.stats()}}


app = make_celery(main="pagedq-worker")
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = get_settings().worker_concurrency
app.steps["worker"].add(EngineStep)
register_tasks(app)
