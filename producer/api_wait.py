"""The HTTP API's waiting routes, async so that a waiting client holds no thread:

    GET  /v1/tasks/{id}?wait=S          long poll: the status once final, or after S seconds as it is then
    POST /v1/statuses               many statuses in one call, `wait` and `until` ("all" | "any")
    GET  /v1/tasks/{id}/stream          Server-Sent Events: `token` {"text"} as generated, `reset` (start the
                                        text over), then `status` (the final TaskStatus); `Last-Event-ID` resumes

Waits subscribe to `pagedq:done:<id>` (what `finalize` publishes, with the final fields) through the process's
one shared subscription (`pagedq.producer.api_notices`) and read the records once Redis confirmed it, as
`pagedq.producer.completion` does for the Python client; a read every `FALLBACK_S` persists deadlines and
covers a notice lost while the subscription reconnected. Streams read `pagedq:stream:<id>` (worker/streaming.py)
with a blocking XREAD.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import ServerSentEvent

from pagedq.producer.api_notices import DoneNotices
from pagedq.producer.completion import parse_notice
from pagedq.producer.service import TaskService
from pagedq.producer.status import status_from_notice
from pagedq.shared.models import TaskStatus
from pagedq.shared.records import stream_key

#: A waiting request reads its tasks again this often (deadlines, missed notifications).
FALLBACK_S = 1.0
#: The worker writes a stream's end marker, then the task's final state: how long a reader waits between.
END_TO_FINAL_S = 10.0
#: Longest silence on a stream before a keep-alive comment (proxies close idle connections).
KEEPALIVE_S = 15.0


async def wait_statuses(service: TaskService, notices: DoneNotices, ids: Sequence[str], wait_s: float,
                        until_any: bool = False) -> list[TaskStatus]:
    """Statuses of `ids` (in order), once all (or, `until_any`, one) are final or `wait_s` passed."""
    statuses = {s.id: s for s in await run_in_threadpool(service.statuses, list(ids))}
    if wait_s <= 0 or _done(statuses.values(), until_any):
        return [statuses[i] for i in ids]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    async with notices.subscribe([i for i in statuses if not statuses[i].state.is_final]) as queue:
        statuses = {s.id: s for s in await run_in_threadpool(service.statuses, list(ids))}  # since subscribing
        next_read = loop.time() + FALLBACK_S
        pending = {i for i, s in statuses.items() if not s.state.is_final}  # O(1) per notice, not O(ids)
        while (pending if not until_any else len(pending) == len(statuses)) and loop.time() < deadline:
            timeout = max(0.0, min(deadline, next_read) - loop.time())
            try:
                message: dict[str, Any] | None = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                message = None
            if message is not None:
                task_id = _apply_notice(statuses, message)
                if task_id is not None and statuses[task_id].state.is_final:
                    pending.discard(task_id)
            elif loop.time() >= next_read:
                statuses.update({s.id: s for s in await run_in_threadpool(service.statuses, list(pending))})
                pending = {i for i in pending if not statuses[i].state.is_final}
                next_read = loop.time() + FALLBACK_S
    return [statuses[i] for i in ids]


def _done(statuses: Iterable[TaskStatus], until_any: bool) -> bool:
    finals = [s.state.is_final for s in statuses]
    return any(finals) if until_any else all(finals)


def _apply_notice(statuses: dict[str, TaskStatus], message: dict[str, Any]) -> str | None:
    """Apply a notice to `statuses`; the id it completed, if any."""
    task_id, notice = parse_notice(message)
    if task_id in statuses and notice is not None:
        statuses[task_id] = status_from_notice(statuses[task_id], notice)
        return task_id
    return None


async def stream_events(service: TaskService, client: aioredis.Redis, notices: DoneNotices, task_id: str,
                        last_event_id: str | None, is_disconnected: object, max_s: float,
                        ) -> AsyncIterator[ServerSentEvent]:
    """The SSE events of one task (see the module docstring). The task must exist (checked by the route)."""
    key, last, streamed = stream_key(task_id), last_event_id or "0-0", False
    loop = asyncio.get_running_loop()
    quiet_since, ends = loop.time(), loop.time() + max_s
    while True:
        if loop.time() >= ends:  # as long as a stream may last: the status as it is now
            status = await run_in_threadpool(service.status, task_id)
            yield ServerSentEvent(event="status", data=status.model_dump(mode="json"))
            return
        block_ms = max(1, int(min(1.0, ends - loop.time()) * 1000))
        replies: list[Any] = await client.xread({key: last}, count=256, block=block_ms)  # type: ignore[assignment]
        for _, entries in replies:
            for entry_id, fields in entries:
                last, quiet_since = entry_id, loop.time()
                if "reset" in fields:
                    yield ServerSentEvent(event="reset", data={}, id=entry_id)
                if fields.get("text"):
                    streamed = True
                    yield ServerSentEvent(event="token", data={"text": fields["text"]}, id=entry_id)
                if "end" in fields:  # written just before the final state: wait the moment for it
                    [status] = await wait_statuses(service, notices, [task_id], END_TO_FINAL_S)
                    yield ServerSentEvent(event="status", data=status.model_dump(mode="json"), id=entry_id)
                    return
        if replies:
            continue
        status = await run_in_threadpool(service.status, task_id)
        if status.state.is_final:  # a task that did not ask to stream: its text in one piece, then the status
            text = _text_of(status)
            if text and not streamed:
                yield ServerSentEvent(event="token", data={"text": text})
            yield ServerSentEvent(event="status", data=status.model_dump(mode="json"))
            return
        if await is_disconnected():  # type: ignore[operator]
            return
        if loop.time() - quiet_since >= KEEPALIVE_S:
            quiet_since = loop.time()
            yield ServerSentEvent(comment="keep-alive")


def _text_of(status: TaskStatus) -> str:
    result = status.result
    return str(getattr(result, "answer", None) or getattr(result, "translation", None) or "")
