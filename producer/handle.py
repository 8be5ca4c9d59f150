"""`TaskHandle`: what a submission returns to an app: the id, plus status, result and cancel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from pagedq.producer.errors import TaskFailed
from pagedq.shared.models import TaskState, TaskStatus, TaskType

R = TypeVar("R")


class TaskControl(Protocol):
    """What a handle needs from its client (`Client` or `HTTPClient`)."""

    def status(self, task_id: str) -> TaskStatus: ...

    def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus: ...

    def cancel(self, task_id: str) -> TaskStatus: ...


def result_of(status: TaskStatus) -> Any:
    """The typed result of a succeeded task; TaskFailed (carrying the TaskError) for any other final state."""
    if status.state is TaskState.SUCCEEDED and status.result is not None:
        return status.result
    raise TaskFailed(status)


@dataclass(frozen=True)
class TaskHandle(Generic[R]):
    """A submitted task. `R` is its result type (ClassifyResult, TranslateResult or QAResult)."""

    id: str
    type: TaskType
    client: TaskControl = field(repr=False, compare=False)

    def status(self) -> TaskStatus:
        return self.client.status(self.id)

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """The final status; TimeoutError if the task is not final after `timeout` seconds."""
        return self.client.wait(self.id, timeout)

    def result(self, timeout: float | None = None) -> R:
        """Wait for the result. TaskFailed if the task failed, expired or was cancelled; TimeoutError."""
        return cast(R, result_of(self.wait(timeout)))

    def cancel(self) -> TaskStatus:
        """Cancel the task; TaskAlreadyFinished (HTTP: APIError 409) if it is already final."""
        return self.client.cancel(self.id)
