"""`HTTPClient`: the `Client` methods over the pagedq HTTP API (for apps that cannot reach Redis)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import httpx

from producer.base import BaseClient
from producer.errors import APIError
from producer.parsing import RequestInput, parse_request, parse_requests
from producer.service import ProgressCallback
from shared.models import BulkSubmitResponse, SubmitResponse, TaskStatus, TaskType
from shared.settings import Limits

#: Requests are validated here for shape (types, empty text, unknown fields); sizes are the server's to
#: check, since only the server knows its limits.
SERVER_CHECKS_SIZES = Limits(
    max_text_chars=sys.maxsize,
    max_context_chars=sys.maxsize,
    max_new_tokens=sys.maxsize,
    max_beams=sys.maxsize,
    max_timeout_s=float("inf"),
    max_bulk=sys.maxsize,
)


class HTTPClient(BaseClient):
    """Talks to `producer.api`. Errors from the server raise APIError(status_code, type, message).

    `http` lets a caller pass its own httpx.Client (tests pass FastAPI's TestClient).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        poll_interval: float = 0.2,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.http.headers.update(headers)
        self.poll_interval = poll_interval

    def _submit(self, task_type: TaskType, request: RequestInput) -> SubmitResponse:
        body = parse_request(task_type, request, SERVER_CHECKS_SIZES).model_dump(mode="json", exclude_unset=True)
        return SubmitResponse.model_validate(self._call("POST", f"/v1/{task_type.value}", json=body))

    def _submit_bulk(
        self, task_type: TaskType, requests: Sequence[RequestInput], on_progress: ProgressCallback | None
    ) -> list[SubmitResponse]:
        parsed = parse_requests(task_type, requests, SERVER_CHECKS_SIZES)
        body = {"requests": [r.model_dump(mode="json", exclude_unset=True) for r in parsed]}
        tasks = BulkSubmitResponse.model_validate(self._call("POST", f"/v1/{task_type.value}/bulk", json=body)).tasks
        if on_progress is not None:
            on_progress(len(tasks), len(tasks))
        return tasks

    def status(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(self._call("GET", f"/v1/tasks/{task_id}"))

    def cancel(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(self._call("DELETE", f"/v1/tasks/{task_id}"))

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        response = self.http.request(method, path, json=json)
        if response.is_success:
            return response.json()
        raise _api_error(response)

    def close(self) -> None:
        if self._owns_http:
            self.http.close()


def _api_error(response: httpx.Response) -> APIError:
    try:
        error = response.json()["error"]
        return APIError(response.status_code, str(error["type"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        return APIError(response.status_code, response.reason_phrase or "HTTPError", response.text[:500])
