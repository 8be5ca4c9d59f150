"""Waiting for tasks by notification: `finalize` publishes each final state on `pagedq:done:<id>`.

    subscribe to every id's channel  ->  read the statuses once (tasks that finished before we subscribed)
    -> each notification carries the final fields: the status is complete without another read
    -> after `fallback` seconds without a notice (and at least every `MAX_FALLBACK_S`), read all pending ones

The fallback read is what makes a missed notification harmless (a reconnect, a Redis restart) and what
expires a queued task whose deadline passed (reading it persists `expired`, see `TaskService.statuses`).
Its quiet period starts at `FALLBACK_S` and backs off to `MAX_FALLBACK_S` for long waits. While notices keep
arriving, the pending tasks are not read again: a bulk wait of N tasks re-read every pending task every
half second before, O(N^2 / rate) reads for nothing (60% of a 4,000-task `wait_all`'s time in the client).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from pagedq.producer.replies import Replies
from pagedq.producer.status import status_from_notice
from pagedq.shared.models import TaskStatus
from pagedq.shared.records import DONE_CHANNEL_PREFIX, done_channel

FALLBACK_S = 0.5
MAX_FALLBACK_S = 5.0
#: Channels per SUBSCRIBE command (a bulk wait subscribes to thousands).
SUBSCRIBE_CHUNK = 1000


def wait_pushed(
    pubsub: redis.client.PubSub,
    get_statuses: Callable[[Sequence[str]], list[TaskStatus]],
    task_ids: Sequence[str],
    timeout_s: float | None,
    on_progress: Callable[[int, int], None] | None = None,
    fallback_s: float = FALLBACK_S,
    settled: Callable[[Sequence[str]], list[str]] | None = None,
) -> list[TaskStatus]:
    """Statuses of `task_ids` (in order) once all are final; TimeoutError after `timeout_s` (None: never).

    `pubsub` (made with `ignore_subscribe_messages=True`) is reused across waits: it is left unsubscribed.
    `settled(ids)`, when given, narrows a fallback read to the ids whose status can have become final (one
    command, no record read); without it the fallback reads every pending id."""
    ids = list(dict.fromkeys(task_ids))
    try:
        for start in range(0, len(ids), SUBSCRIBE_CHUNK):
            pubsub.subscribe(*[done_channel(t) for t in ids[start : start + SUBSCRIBE_CHUNK]])
        return _wait(lambda _pending, wait_s: _notified(pubsub, wait_s), get_statuses, task_ids, {}, timeout_s,
                     on_progress, fallback_s, settled)
    finally:
        try:
            pubsub.unsubscribe()
        except redis.RedisError:
            pubsub.reset()  # a broken connection: the next wait connects again


def wait_replied(
    replies: Replies,
    known: dict[str, TaskStatus],
    get_statuses: Callable[[Sequence[str]], list[TaskStatus]],
    task_ids: Sequence[str],
    timeout_s: float | None,
    on_progress: Callable[[int, int], None] | None = None,
    fallback_s: float = FALLBACK_S,
    settled: Callable[[Sequence[str]], list[str]] | None = None,
) -> list[TaskStatus]:
    """`wait_pushed` for tasks whose records name `replies`' channel, all of them in `known` (their status as
    submitted): no subscription, no first read; the notices come on the reply channel (producer/replies.py)."""
    return _wait(lambda pending, wait_s: dict(replies.take(pending, wait_s)), get_statuses, task_ids, known,
                 timeout_s, on_progress, fallback_s, settled)


Notices = Callable[[set[str], float], dict[str, dict[str, str] | None]]


def _wait(
    notices: Notices,
    get_statuses: Callable[[Sequence[str]], list[TaskStatus]],
    task_ids: Sequence[str],
    known: dict[str, TaskStatus],
    timeout_s: float | None,
    on_progress: Callable[[int, int], None] | None,
    fallback_s: float,
    settled: Callable[[Sequence[str]], list[str]] | None,
) -> list[TaskStatus]:
    """The loop of both waits. `notices(pending, wait_s)`: the final fields announced for pending ids within
    `wait_s` (None: a notice that cannot be read). Ids not in `known` are read once first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ids = list(dict.fromkeys(task_ids))
    total = len(ids)
    final: dict[str, TaskStatus] = {}
    known = dict(known)
    pending = {t for t in ids if t in known}
    pending.update(_read(get_statuses, [t for t in ids if t not in known], final, known))
    interval, next_fallback = fallback_s, time.monotonic() + fallback_s
    latest_read = time.monotonic() + MAX_FALLBACK_S  # a full read is never further away than this
    while True:
        if on_progress is not None:
            on_progress(total - len(pending), total)
        if not pending:
            return [final[t] for t in task_ids]
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError(f"{len(pending)} of {total} tasks not finished after {timeout_s} s")
        unread = set()
        arrived = notices(pending, min(next_fallback, deadline or next_fallback) - now)
        if arrived:  # the notices flow: the fallback waits for the next quiet period
            next_fallback = min(time.monotonic() + interval, latest_read)
        for task_id, notice in arrived.items():
            if task_id not in pending:
                continue
            if task_id in known and notice is not None:
                final[task_id] = status_from_notice(known[task_id], notice)
                pending.discard(task_id)
            else:
                unread.add(task_id)  # a notice we cannot read: read the record
        if time.monotonic() >= next_fallback:
            unread = set(pending) if settled is None else set(settled(list(pending)))
            interval = min(interval * 2, MAX_FALLBACK_S)
            next_fallback = time.monotonic() + interval
            latest_read = time.monotonic() + MAX_FALLBACK_S
        if unread:
            pending -= unread
            pending.update(_read(get_statuses, [t for t in ids if t in unread], final, known))


def _notified(pubsub: redis.client.PubSub, timeout_s: float) -> dict[str, dict[str, str] | None]:
    """Final fields announced within `timeout_s` (then everything already buffered, without waiting), by id;
    None for a notice that cannot be read (the id is then read from its record)."""
    ids: dict[str, dict[str, str] | None] = {}
    try:
        message = pubsub.get_message(timeout=max(0.0, timeout_s))
    except (redis.ConnectionError, redis.TimeoutError):  # Redis restarting: the fallback read takes over
        time.sleep(max(0.0, min(timeout_s, FALLBACK_S)))
        return ids
    while message is not None:
        if message.get("type") == "message":
            task_id, notice = parse_notice(message)
            ids[task_id] = notice
        message = pubsub.get_message(timeout=0)
    return ids


def parse_notice(message: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """(task id, final fields) of a `pagedq:done:<id>` pub/sub message; None for fields it cannot read."""
    channel = message["channel"]
    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
    try:
        notice = json.loads(message.get("data"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        notice = None
    return channel[len(DONE_CHANNEL_PREFIX):], notice if isinstance(notice, dict) and notice.get("state") else None


def _read(get_statuses: Callable[[Sequence[str]], list[TaskStatus]], ids: list[str],
          final: dict[str, TaskStatus], known: dict[str, TaskStatus]) -> list[str]:
    """Read `ids`' statuses, keep the final ones in `final` (and all in `known`); returns those still pending."""
    if not ids:
        return []
    still = []
    for status in get_statuses(ids):
        known[status.id] = status
        if status.state.is_final:
            final[status.id] = status
        else:
            still.append(status.id)
    return still
