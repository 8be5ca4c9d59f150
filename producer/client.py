"""The Python client apps use: submit straight onto the Redis queues; results are pushed back by id.

    from pagedq.producer.client import Client
    client = Client("redis://localhost:6379/0")
    handle = client.classify("I loved it", top_k=2)
    print(handle.result(timeout=30).label)

`HTTPClient` (re-exported here) offers the same methods over the HTTP API.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedq.producer.base import BaseClient
from pagedq.producer.errors import APIError, TaskAlreadyFinished, TaskFailed
from pagedq.producer.handle import TaskHandle
from pagedq.producer.http_client import HTTPClient
from pagedq.producer.parsing import RequestInput
from pagedq.producer.service import ProgressCallback, TaskService
from pagedq.shared.models import SubmitResponse, TaskStatus, TaskType
from pagedq.shared.registry import Registry
from pagedq.shared.settings import Settings, get_settings

__all__ = ["APIError", "Client", "HTTPClient", "TaskAlreadyFinished", "TaskFailed", "TaskHandle"]


class Client(BaseClient):
    """Submits to Redis directly (no API server needed). Settings default to the `PAGEDQ_` environment.

    `redis_url` overrides `settings.redis_url`. With a registry (given, or `settings.registry_path`) the
    model and language pair are checked before sending; errors: pydantic.ValidationError for bad input,
    shared.errors.ModelNotFound / UnsupportedLanguagePair / TaskNotFound, producer.errors.TaskFailed.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        settings: Settings | None = None,
        *,
        registry: Registry | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        """`poll_interval`: the first fallback read while waiting (results are pushed; reads only cover a missed
        notification or a passed deadline), doubling up to 5 s."""
        settings = settings or get_settings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.service = TaskService(settings, registry, listen=True)
        self.poll_interval = poll_interval

    def _submit(self, task_type: TaskType, request: RequestInput) -> SubmitResponse:
        return self.service.submit(task_type, request)

    def _submit_bulk(
        self, task_type: TaskType, requests: Sequence[RequestInput], on_progress: ProgressCallback | None
    ) -> list[SubmitResponse]:
        return self.service.submit_bulk(task_type, requests, on_progress)

    def status(self, task_id: str) -> TaskStatus:
        return self.service.status(task_id)

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        return self.service.statuses(task_ids)

    def cancel(self, task_id: str) -> TaskStatus:
        return self.service.cancel(task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """The final status as soon as a worker writes it (a Redis notification; see producer.completion)."""
        return self.service.wait(task_id, timeout, self.poll_interval)

    def wait_all(
        self, task_ids: Sequence[str], timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> list[TaskStatus]:
        return self.service.wait_all(task_ids, timeout, on_progress, self.poll_interval)

    def close(self) -> None:
        self.service.close()
