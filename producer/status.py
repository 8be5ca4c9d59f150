"""From a task record and the Celery result meta to the `TaskStatus` users see.

The record (`shared.records`) says what was submitted and whether a cancel was asked for; the result
backend says what a worker did. Celery states map onto task states like this:

    PENDING / RECEIVED / RETRY -> queued     (cancelled if a cancel was asked; expired past the deadline);
                                  running once the worker wrote `started_at` on the record (the backend
                                  never holds STARTED: it would overwrite a stored SUCCESS on redelivery)
    STARTED                    -> running
    SUCCESS                    -> succeeded  (`result` parsed into a TaskResult)
    FAILURE                    -> expired for DeadlineExceeded, cancelled for TaskCancelled, else failed
    REVOKED                    -> cancelled  (expired if nobody asked to cancel and the deadline passed)
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from shared.models import TaskError, TaskResult, TaskState, TaskStatus, TaskType

_RESULT = TypeAdapter(TaskResult)
_WAITING = {"PENDING", "RECEIVED", "RETRY"}
#: Error class names (stored by the worker as `exc_type`) that are not plain failures.
_STATE_OF_ERROR = {"DeadlineExceeded": TaskState.EXPIRED, "TaskCancelled": TaskState.CANCELLED}
_CANCELLED = TaskError(type="TaskCancelled", message="the task was cancelled")
_EXPIRED = TaskError(type="DeadlineExceeded", message="the deadline passed before a worker finished the task")

Outcome = tuple[TaskState, Any, TaskError | None]  # state, result, error


def task_status(task_id: str, record: Mapping[str, str], meta: Mapping[str, Any], now: datetime) -> TaskStatus:
    """The status of `task_id` from its record and its raw (JSON-decoded) result meta, as of `now` (UTC)."""
    deadline = _datetime(record.get("deadline"))
    past_deadline = deadline is not None and now >= deadline
    state, result, error = _outcome(meta, bool(record.get("cancel_requested")), past_deadline,
                                    started=bool(record.get("started_at")))
    return TaskStatus(
        id=task_id,
        type=TaskType(record["type"]),
        state=state,
        model=record.get("model") or None,
        priority=int(record.get("priority", 0)),
        created_at=datetime.fromisoformat(record["created_at"]),
        started_at=_datetime(record.get("started_at")),
        finished_at=_datetime(meta.get("date_done")) if state.is_final else None,
        deadline=deadline,
        result=result,
        error=error,
    )


def _outcome(meta: Mapping[str, Any], cancel_requested: bool, past_deadline: bool, started: bool = False) -> Outcome:
    celery_state = meta.get("status") or "PENDING"
    if celery_state in _WAITING:
        if started:  # a worker holds it; it reports the final state (cancelled, expired...) itself
            return TaskState.RUNNING, None, None
        if cancel_requested:
            return TaskState.CANCELLED, None, _CANCELLED
        if past_deadline:
            return TaskState.EXPIRED, None, _EXPIRED
        return TaskState.QUEUED, None, None
    if celery_state == "STARTED":
        return TaskState.RUNNING, None, None
    if celery_state == "SUCCESS":
        return _succeeded(meta.get("result"))
    if celery_state == "FAILURE":
        error = error_from_meta(meta.get("result"))
        return _STATE_OF_ERROR.get(error.type, TaskState.FAILED), None, error
    if celery_state == "REVOKED":
        if past_deadline and not cancel_requested:
            return TaskState.EXPIRED, None, _EXPIRED
        return TaskState.CANCELLED, None, _CANCELLED
    return TaskState.FAILED, None, TaskError(type=celery_state, message=f"Celery reported {celery_state}")


def _succeeded(raw: Any) -> Outcome:
    try:
        return TaskState.SUCCEEDED, _RESULT.validate_python(raw), None
    except ValidationError as exc:
        return TaskState.FAILED, None, TaskError(type="InvalidResult", message=f"the worker stored a bad result: {exc}")


def error_from_meta(raw: Any) -> TaskError:
    """`TaskError` from a stored exception: `{"exc_type", "exc_message", ...}` (or an exception object)."""
    if isinstance(raw, BaseException):
        return TaskError(type=type(raw).__name__, message=_join(raw.args))
    if isinstance(raw, Mapping):
        return TaskError(type=str(raw.get("exc_type") or "Error"), message=_join(raw.get("exc_message")))
    return TaskError(type="Error", message=_join(raw))


def _join(message: Any) -> str:
    if message is None:
        return ""
    if isinstance(message, list | tuple):
        return "; ".join(str(part) for part in message)
    return str(message)


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
