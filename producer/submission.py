"""One submission: a validated request with its id, model and deadline, and the message the worker gets.

The message is the wire contract with the worker (`worker.tasks`):
`{"request": <request JSON>, "model": <registry name>, "deadline": <epoch s>, "submitted_at": <epoch s>}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.models import SubmitResponse, TaskRequest, TaskType


def task_location(task_id: str) -> str:
    """Where the HTTP API serves a task's status."""
    return f"/v1/tasks/{task_id}"


@dataclass(frozen=True)
class Submission:
    """One validated request, ready to be recorded and sent."""

    id: str
    task_type: TaskType
    request: TaskRequest
    model: str
    submitted_at: float  # epoch seconds
    deadline: float  # epoch seconds

    @property
    def message(self) -> dict[str, Any]:
        return {
            "request": self.request.model_dump(mode="json"),
            "model": self.model,
            "deadline": self.deadline,
            "submitted_at": self.submitted_at,
        }

    @property
    def summary(self) -> str:
        return f"<{self.task_type.value} request for model {self.model!r}, priority {self.request.priority}>"

    @property
    def response(self) -> SubmitResponse:
        return SubmitResponse(id=self.id, type=self.task_type, location=task_location(self.id))
