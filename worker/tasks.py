"""The Celery tasks: thin. Validate, submit to the engine, wait on the future, return the result as JSON.

Message body (written by the producer): `{"request": <request JSON>, "model": <registry name>,
"deadline": <epoch s>, "submitted_at": <epoch s>}`. Errors are raised as `shared.errors` classes, so the
result backend stores a stable `exc_type` that the producer maps to `failed`, `expired` or `cancelled`.
"""

from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from celery import Celery, Task, states
from celery.worker import state as worker_state
from pydantic import ValidationError

from shared.celery_config import TASK_NAMES
from shared.errors import DeadlineExceeded, InvalidRequest, TaskCancelled
from shared.models import REQUEST_MODELS, TaskType
from shared.records import now
from shared.registry import ModelSpec
from worker import metrics
from worker.engine.executor import EngineRequest
from worker.runtime import WorkerRuntime, current_runtime

POLL_S = 0.2  # how often a waiting task thread looks for a revoke from the Celery side


def register_tasks(app: Celery) -> None:
    for task_type in TaskType:
        _register(app, task_type)


def _register(app: Celery, task_type: TaskType) -> None:
    @app.task(name=TASK_NAMES[task_type], bind=True)
    def run(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        with metrics.observe_task(task_type.value, message) as outcome:
            result = run_task(self, current_runtime(self.app), task_type, message)
            outcome.succeeded()
            return result


def run_task(task: Task, rt: WorkerRuntime, task_type: TaskType, message: dict[str, Any]) -> dict[str, Any]:
    task_id: str = task.request.id
    stored = task.backend.get_task_meta(task_id)
    if stored.get("status") == states.SUCCESS:  # redelivered after it already ran: never run twice
        return stored["result"]  # type: ignore[no-any-return]
    try:
        payload = REQUEST_MODELS[task_type].model_validate(message["request"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise InvalidRequest(f"invalid {task_type.value} message: {exc}") from None
    deadline = message.get("deadline")
    if rt.records.cancel_requested(task_id):
        raise TaskCancelled("cancelled before it started")
    if deadline is not None and time.time() >= deadline:
        raise DeadlineExceeded("deadline passed while the task was queued")
    spec = _model_for(rt, task_type, message, payload)
    rt.records.mark(task_id, started_at=now().isoformat(), worker=str(task.request.hostname or ""))
    request = EngineRequest(id=task_id, task=task_type, payload=payload, model=spec.name,
                            priority=payload.priority, deadline=deadline)
    rt.engine.submit(request)
    return _wait(rt, request).model_dump(mode="json")  # type: ignore[no-any-return]


def _model_for(rt: WorkerRuntime, task_type: TaskType, message: dict[str, Any], payload: Any) -> ModelSpec:
    """The registry entry named by the producer, else the registry's choice for this request."""
    name = message.get("model")
    spec = rt.registry.models.get(name) if isinstance(name, str) else None
    if spec is not None and spec.task is task_type:
        return spec
    return rt.registry.select(task_type, payload)


def _wait(rt: WorkerRuntime, request: EngineRequest) -> Any:
    """Block this task thread until the engine completes the request; forward revokes to the engine."""
    cancel_sent = False
    while True:
        try:
            return request.future.result(timeout=POLL_S)
        except FutureTimeout:
            if not cancel_sent and request.id in worker_state.revoked:
                rt.engine.cancel(request.id, TaskCancelled("cancelled while running"))
                cancel_sent = True
