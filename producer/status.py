"""From a task record (`pagedq.shared.records`) to the `TaskStatus` users see.

The record is the only source of truth; Celery's result backend is not used:

    final `state` written          -> that state, with `result` or `error` (never changes again)
    no final state, past deadline  -> expired  (the reader persists it with `finalize`: first write wins)
    no final state, a worker holds -> running
    otherwise                      -> queued   (also after a worker stop or death handed it back)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from pagedq.shared.models import TaskError, TaskResult, TaskState, TaskStatus, TaskType

_RESULT = TypeAdapter(TaskResult)
EXPIRED_ERROR = TaskError(type="DeadlineExceeded", message="the deadline passed before a worker finished the task")

Outcome = tuple[TaskState, Any, TaskError | None]  # state, result, error


def task_status(task_id: str, record: Mapping[str, str], now: datetime) -> TaskStatus:
    """The status of `task_id` from its record, as of `now` (UTC)."""
    deadline = _datetime(record.get("deadline"))
    state, result, error = _outcome(record, past_deadline=deadline is not None and now >= deadline)
    return TaskStatus(
        id=task_id,
        type=TaskType(record["type"]),
        state=state,
        model=record.get("model") or None,
        priority=int(record.get("priority", 0)),
        created_at=datetime.fromisoformat(record["created_at"]),
        started_at=_datetime(record.get("started_at")),
        finished_at=_datetime(record.get("finished_at")) if state.is_final else None,
        deadline=deadline,
        result=result,
        error=error,
    )


def status_from_notice(known: TaskStatus, notice: Mapping[str, str]) -> TaskStatus:
    """The final status announced on `pagedq:done:<id>` (the fields `finalize` writes, `state` among them:
    readers drop notices without one), completed with what an earlier read of the task said: the same status a
    fresh read would give, without that read -- a copy of `known` with the final fields (`known` is a valid
    status; the result is validated here from its JSON)."""
    state, result, error = _outcome(notice, past_deadline=False)
    return known.model_copy(update={
        "state": state, "result": result, "error": error, "finished_at": _datetime(notice.get("finished_at")),
        "started_at": _datetime(notice.get("started_at")) or known.started_at,
    })


def needs_expiry(status: TaskStatus, record: Mapping[str, str]) -> bool:
    """True if `status` says expired only because the deadline passed: the reader must persist it."""
    return status.state is TaskState.EXPIRED and "state" not in record


def _outcome(record: Mapping[str, str], past_deadline: bool) -> Outcome:
    final = record.get("state")
    if final:
        state = TaskState(final)
        if state is TaskState.SUCCEEDED:
            return _succeeded(record.get("result"))
        return state, None, _error(record.get("error"))
    if past_deadline:
        return TaskState.EXPIRED, None, EXPIRED_ERROR
    if record.get("worker"):
        return TaskState.RUNNING, None, None
    return TaskState.QUEUED, None, None


def _succeeded(raw: str | None) -> Outcome:
    try:
        return TaskState.SUCCEEDED, _RESULT.validate_json(raw or "null"), None
    except ValidationError as exc:
        return TaskState.FAILED, None, TaskError(type="InvalidResult", message=f"the worker stored a bad result: {exc}")


def _error(raw: str | None) -> TaskError:
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        data = {"message": raw}
    return TaskError(type=str(data.get("type") or "Error"), message=str(data.get("message") or ""))


def _datetime(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None
