"""Completion notices for the tasks this producer submitted, on one subscription it keeps open.

A `TaskService` subscribes once to its own channel, `pagedq:reply:<uuid>`, before it submits anything, and
names that channel in the record of every task it creates (`notify`). `finalize` publishes the final fields of
such a task on it as well as on the task's own `pagedq:done:<id>`, one message per finalize call and channel
(a list: a bulk's worker finalizes many items at once). So waiting for a task this producer submitted costs
no SUBSCRIBE, no status read and no UNSUBSCRIBE (three Redis round trips per task, ~30% of a closed-loop
client's time in W5): the notice is already on its way, or already here.

No thread of its own: a waiting thread reads the subscription itself (one at a time; the others wait for
what it reads) and keeps each notice by task id until its waiter takes it (at most `max_kept`, oldest dropped
first: a task nobody waits for). A listener thread cost each task two thread switches, which with the GIL
shared by 32 client threads made a closed loop slower, not faster. Notices published while the subscription is down
(a Redis restart) are lost; the waiter's fallback read (`pagedq.producer.completion`) covers them, as for a
task waited on by id. Tasks submitted by another producer are waited on through their own channels.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import redis

from pagedq.shared.records import REPLY_CHANNEL_PREFIX

log = logging.getLogger(__name__)

#: Notices kept for tasks nobody has waited for yet (then the oldest are dropped; a wait reads the record).
MAX_KEPT = 100_000
SUBSCRIBE_TIMEOUT_S = 5.0


class Replies:
    """This producer's reply channel: subscribed on `start()`, read by whichever thread is waiting."""

    def __init__(self, client: redis.Redis, max_kept: int = MAX_KEPT) -> None:
        self.channel = f"{REPLY_CHANNEL_PREFIX}{uuid.uuid4().hex}"
        self._client = client
        self._max_kept = max_kept
        self._notices: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._arrived = threading.Condition()
        self._reading = threading.Lock()  # held by the one thread that reads the subscription
        self._lock = threading.Lock()
        self._pubsub: redis.client.PubSub | None = None

    def start(self) -> str:
        """Subscribe (once; the SUBSCRIBE is confirmed before this returns). Returns the channel to name in new
        records."""
        with self._lock:
            if self._pubsub is None:
                pubsub = self._client.pubsub()
                pubsub.subscribe(self.channel)  # redis-py subscribes again by itself after a reconnect
                confirmed = time.monotonic() + SUBSCRIBE_TIMEOUT_S
                while (message := pubsub.get_message(timeout=1.0)) is None or message["type"] != "subscribe":
                    if time.monotonic() > confirmed:  # no record names the channel before it is confirmed
                        pubsub.close()
                        raise redis.TimeoutError(f"SUBSCRIBE {self.channel} was not confirmed")
                self._pubsub = pubsub
        return self.channel

    def take(self, task_ids: Collection[str], timeout_s: float = 0.0) -> dict[str, dict[str, str]]:
        """The notices that arrived for `task_ids`, removed from the store; if there are none yet, wait up to
        `timeout_s` for more (reading the subscription, or waiting for the thread that reads it)."""
        with self._arrived:
            found = self._pop(task_ids)
        if found or timeout_s <= 0 or self._pubsub is None:
            return found
        if self._reading.acquire(blocking=False):
            try:
                self._read(timeout_s)
            finally:
                self._reading.release()
            with self._arrived:
                self._arrived.notify_all()  # another waiter may read now
                return self._pop(task_ids)
        with self._arrived:
            found = self._pop(task_ids)
            if not found:
                self._arrived.wait(timeout_s)  # woken by the reader's notices, or when it stops reading
                found = self._pop(task_ids)
            return found

    def close(self) -> None:
        with self._lock:
            if self._pubsub is not None:
                self._pubsub.close()
                self._pubsub = None

    def _read(self, timeout_s: float) -> None:
        """Read the subscription for up to `timeout_s` (then whatever is buffered), keeping the notices."""
        pubsub = self._pubsub
        assert pubsub is not None
        try:
            message = pubsub.get_message(timeout=timeout_s)
            while message is not None:
                if message.get("type") == "message":
                    self._keep(_parse(message.get("data")))
                message = pubsub.get_message(timeout=0)
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # redis-py re-subscribes on reconnect; the
            log.debug("reply channel %s: %r", self.channel, exc)  # waiters' fallback reads cover the gap
            time.sleep(min(timeout_s, 0.2))

    def _pop(self, task_ids: Collection[str]) -> dict[str, dict[str, str]]:
        if len(self._notices) < len(task_ids):  # look up the fewer: a bulk waits for thousands of ids
            ids = [t for t in self._notices if t in task_ids]
        else:
            ids = [t for t in task_ids if t in self._notices]
        return {t: self._notices.pop(t) for t in ids}

    def _keep(self, notices: list[dict[str, Any]]) -> None:
        if not notices:
            return
        with self._arrived:
            for notice in notices:
                task_id = notice.pop("id", None)
                if isinstance(task_id, str) and notice.get("state"):
                    self._notices[task_id] = {k: "" if v is None else str(v) for k, v in notice.items()}
            while len(self._notices) > self._max_kept:
                self._notices.popitem(last=False)
            self._arrived.notify_all()


def _parse(data: Any) -> list[dict[str, Any]]:
    try:
        notices = json.loads(data)
    except (TypeError, ValueError):
        return []
    return [n for n in notices if isinstance(n, dict)] if isinstance(notices, list) else []
