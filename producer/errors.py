"""Errors the producer adds to `pagedq.shared.errors`: they only arise on the producer side.

Every class derives from `PagedqError`, so the HTTP API maps each to its `http_status` with the same
`{"error": {"type", "message"}}` body as the shared errors.
"""

from __future__ import annotations

from pagedq.shared.errors import PagedqError
from pagedq.shared.models import TaskError, TaskState, TaskStatus


class Unauthorized(PagedqError):
    """No API key, a wrong one, or authentication enabled with no keys configured."""

    http_status = 401


class TaskAlreadyFinished(PagedqError):
    """A cancel asked for a task that already reached a final state."""

    http_status = 409


class TaskFailed(PagedqError):
    """A task ended in `failed`, `expired` or `cancelled`; raised by `TaskHandle.result()`.

    `status` is the task's final status and `error` its `TaskError` (type and message).
    """

    def __init__(self, status: TaskStatus) -> None:
        self.status = status
        self.error = status.error or TaskError(type="TaskFailed", message=f"task ended {status.state.value}")
        super().__init__(f"task {status.id} {status.state.value}: {self.error.type}: {self.error.message}")

    @property
    def state(self) -> TaskState:
        return self.status.state


class APIError(PagedqError):
    """The HTTP API answered with an error; raised by `HTTPClient`.

    `status_code` is the HTTP status, `type` and `message` come from the server's error body.
    """

    def __init__(self, status_code: int, type: str, message: str) -> None:
        self.status_code = status_code
        self.http_status = status_code
        self.type = type
        self.message = message
        super().__init__(f"HTTP {status_code} {type}: {message}")


class InvalidJSON(PagedqError):
    """An HTTP request body that is not JSON at all."""

    http_status = 400
