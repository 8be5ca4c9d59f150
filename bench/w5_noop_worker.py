"""W5 baseline: Celery's own ceiling. A task that returns its argument, with pagedq's Celery settings.

    PAGEDQ_REDIS_URL=redis://... celery -A bench.w5_noop_worker worker -P threads -c 64

Same settings as pagedq (`pagedq.shared.celery_config.celery_config`: JSON, late acks, prefetch 1, events on, the
same queues) except `task_ignore_result=False`: a plain Celery client needs the result backend to wait.

Celery's consumer as it ships, unless `W5_NOOP_CONSUMER_READ_MAX` is set: then with pagedq worker's consumer I/O
(`pagedq.worker.consumer_io`: several messages per Redis read, acks written once per loop turn), a second
no-op row that shows what that change gives Celery itself.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from pagedq.shared.celery_config import celery_config
from pagedq.shared.settings import Settings, get_settings

NOOP_TASK = "w5.noop"


def make_app(settings: Settings | None = None, main: str = "w5-noop") -> Celery:
    """A Celery app with pagedq's settings and results stored (the worker's and the clients' alike)."""
    app = Celery(main)
    app.conf.update(celery_config(settings or get_settings()))
    app.conf.task_ignore_result = False
    return app


if os.environ.get("W5_NOOP_CONSUMER_READ_MAX"):
    from pagedq.worker import consumer_io

    consumer_io.install(int(os.environ["W5_NOOP_CONSUMER_READ_MAX"]))
app = make_app()


@app.task(name=NOOP_TASK)
def noop(payload: Any) -> Any:
    return payload
