"""`HTTPClient`: the `Client` methods over the pagedq HTTP API (for apps that cannot reach Redis)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from pagedq.producer.base import BaseClient
from pagedq.producer.errors import APIError
from pagedq.producer.parsing import RequestInput, parse_request, parse_requests
from pagedq.producer.service import ProgressCallback
from pagedq.shared.models import BulkSubmitResponse, StatusList, SubmitResponse, TaskStatus, TaskType
from pagedq.shared.settings import Limits

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


#: Longest single long poll (the server's limit is 60 s).
LONG_POLL_S = 30.0
#: Ids per `POST /v1/statuses` call.
STATUS_CHUNK = 1000


@dataclass(frozen=True)
class StreamEvent:
    """One Server-Sent Event of a task stream: `token` (text), `reset`, or `status` (the final status)."""

    event: str
    text: str = ""
    status: TaskStatus | None = None
    id: str | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[StreamEvent]:
    """StreamEvents from the lines of a `text/event-stream` body (comments and keep-alives skipped)."""
    event, event_id = "message", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                payload = json.loads("\n".join(data))
                if event == "status":
                    yield StreamEvent("status", status=TaskStatus.model_validate(payload), id=event_id)
                else:
                    yield StreamEvent(event, text=str(payload.get("text", "")), id=event_id)
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value


class HTTPClient(BaseClient):
    """Talks to `pagedq.producer.api`. Errors from the server raise APIError(status_code, type, message).

    `http` lets a caller pass its own httpx.Client (tests pass FastAPI's TestClient).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)
        self.http.headers.update(headers)

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

    def statuses(self, task_ids: Sequence[str]) -> list[TaskStatus]:
        """Many statuses, `STATUS_CHUNK` per call of `POST /v1/statuses`."""
        return self._statuses(task_ids, wait=0.0, until="all")

    def wait(self, task_id: str, timeout: float | None = None) -> TaskStatus:
        """The final status, as soon as the server learns of it (long polls of `GET /v1/tasks/{id}?wait=`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
            status = TaskStatus.model_validate(self._call("GET", f"/v1/tasks/{task_id}", params={"wait": wait}))
            if status.state.is_final:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"task {task_id} not finished after {timeout} s")

    def wait_all(
        self, task_ids: Sequence[str], timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> list[TaskStatus]:
        """Final statuses in `task_ids` order: long polls of `POST /v1/statuses` over the unfinished ids,
        each returning as soon as one of them finishes (so `on_progress` follows along)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        final: dict[str, TaskStatus] = {}
        pending = list(dict.fromkeys(task_ids))
        total = len(pending)
        while True:
            if on_progress is not None:
                on_progress(total - len(pending), total)
            if not pending:
                return [final[t] for t in task_ids]
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{len(pending)} of {total} tasks not finished after {timeout} s")
            wait = LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
            for status in self._statuses(pending[:STATUS_CHUNK], wait=wait, until="any"):
                if status.state.is_final:
                    final[status.id] = status
            pending = [t for t in pending if t not in final]

    def stream(self, task_id: str, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The task's Server-Sent Events (`GET /v1/tasks/{id}/stream`): `token` events with generated text,
        `reset` (drop the text so far: the engine re-ran the request), then one `status` with the final
        TaskStatus. Submit with `generation={"stream": True}` to get the text token by token."""
        with self.http.stream("GET", f"/v1/tasks/{task_id}/stream", timeout=timeout) as response:
            if not response.is_success:
                response.read()
                raise _api_error(response)
            yield from parse_sse(response.iter_lines())

    def _statuses(self, task_ids: Sequence[str], wait: float, until: str) -> list[TaskStatus]:
        found = []
        for start in range(0, len(task_ids), STATUS_CHUNK):
            body = {"ids": list(task_ids[start : start + STATUS_CHUNK]), "wait": wait, "until": until}
            found += StatusList.model_validate(self._call("POST", "/v1/statuses", json=body)).tasks
        return found

    def cancel(self, task_id: str) -> TaskStatus:
        return TaskStatus.model_validate(self._call("DELETE", f"/v1/tasks/{task_id}"))

    def _call(self, method: str, path: str, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        limits = self.http.timeout
        read = limits.read
        if params and params.get("wait") and read is not None:  # a long poll may take `wait` seconds
            read = read + float(params["wait"])
        # a (connect, read, write, pool) tuple, not an httpx.Timeout: an injected client may be another httpx
        # line (Starlette's TestClient is an httpx2.Client, whose 2.17 refuses httpx's Timeout objects)
        response = self.http.request(method, path, json=json, params=params,
                                     timeout=(limits.connect, read, limits.write, limits.pool))
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
