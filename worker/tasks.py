"""The Celery tasks: thin. Claim the task, validate, submit to the engine, wait, write the final state once.

Message body (written by the producer): `{"request": <request JSON>, "model": <registry name>,
"deadline": <epoch s>, "submitted_at": <epoch s>}`.

One delivery of a task goes through `TaskRecords.claim` first, which decides atomically in Redis:

    run        -> this worker owns it now: run it, then `finalize` (the first final state written wins)
    final      -> it finished already (a redelivery): skip
    owned      -> a live worker runs it (a redelivery while it runs): skip, no second run, no error
    cancelled / expired -> finalized by the claim itself

A worker stop hands unfinished work back: the engine fails it with `WorkerShuttingDown`, the record is
released (queued again) and the message is rejected with requeue, so another worker runs it. Nothing is
stored in Celery's result backend; the task record is the result.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state as worker_state
from pydantic import ValidationError

from shared.celery_config import TASK_NAMES
from shared.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    PagedqError,
    TaskCancelled,
    WorkerShuttingDown,
)
from shared.models import REQUEST_MODELS, TaskState, TaskType
from shared.records import Claim
from shared.registry import ModelSpec
from worker import metrics
from worker.engine.executor import EngineRequest
from worker.runtime import WorkerRuntime, current_runtime

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting task thread looks for a revoke from the Celery side

#: Error classes that are not plain failures, and the final state each one means.
_STATE_OF_ERROR: dict[type[BaseException], TaskState] = {
    DeadlineExceeded: TaskState.EXPIRED,
    TaskCancelled: TaskState.CANCELLED,
}


def register_tasks(app: Celery) -> None:
    for task_type in TaskType:
        _register(app, task_type)


def _register(app: Celery, task_type: TaskType) -> None:
    # throws: a user-level failure is logged on one line, without a traceback
    @app.task(name=TASK_NAMES[task_type], bind=True, ignore_result=True, throws=(PagedqError,))
    def run(self: Task, message: dict[str, Any]) -> str:
        with metrics.observe_task(task_type.value, message) as outcome:
            state = run_task(self, current_runtime(self.app), task_type, message)
            outcome.succeeded()
            return state


def run_task(task: Task, rt: WorkerRuntime, task_type: TaskType, message: dict[str, Any]) -> str:
    """Run one delivery; returns the final state's name, raises the stored error of a failed task."""
    task_id: str = task.request.id
    tag = str((task.request.delivery_info or {}).get("delivery_tag") or "")
    claim = rt.records.claim(task_id, rt.worker_id, tag, rt.lease_prefix)
    if claim is not Claim.RUN:
        log.info("task %s: %s, not run by this delivery", task_id, claim.value)
        return claim.value
    try:
        result = _execute(rt, task_type, task_id, message)
    except WorkerShuttingDown:
        rt.records.release(task_id, rt.worker_id)
        raise Reject("the worker is shutting down: handed back to the queue", requeue=True) from None
    except PagedqError as exc:
        state = _STATE_OF_ERROR.get(type(exc), TaskState.FAILED)
        rt.records.finalize(task_id, state, error={"type": type(exc).__name__, "message": str(exc)})
        raise
    except Exception as exc:  # noqa: BLE001 - a bug in our code: the task fails, the worker stays up
        log.exception("task %s failed", task_id)
        error = EngineError(f"{type(exc).__name__}: {exc}")
        rt.records.finalize(task_id, TaskState.FAILED, error={"type": "EngineError", "message": str(error)})
        raise error from exc
    final = rt.records.finalize(task_id, TaskState.SUCCEEDED, result=result)
    return (final or TaskState.SUCCEEDED).value  # expired, if a reader saw the deadline pass first


def _execute(rt: WorkerRuntime, task_type: TaskType, task_id: str, message: dict[str, Any]) -> dict[str, Any]:
    try:
        payload = REQUEST_MODELS[task_type].model_validate(message["request"])
    except (KeyError, TypeError, ValidationError) as exc:
        raise InvalidRequest(f"invalid {task_type.value} message: {exc}") from None
    deadline = message.get("deadline")
    if deadline is not None and time.time() >= deadline:
        raise DeadlineExceeded("deadline passed while the task was queued")
    spec = _model_for(rt, task_type, message, payload)
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
