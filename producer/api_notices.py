"""Completion notices for the HTTP API: ONE Redis pub/sub connection per API process, shared by every waiting
request.

A long poll, a batch status wait or the end of a stream waits for `pagedq:done:<id>` notices (what `finalize`
publishes, with the final fields). Each waiting request used to open a pub/sub connection of its own -- a TCP
connect and handshake per request (~9% of the API's CPU in W5's HTTP loop) and, with thousands of clients
waiting, thousands of Redis connections. Here one reader task owns one `PubSub` and hands each message to the
queues of the requests waiting on its channel; a channel is subscribed while at least one request waits on it:

    request  subscribe(ids) ─► channels not yet subscribed: SUBSCRIBE (one command), wait for Redis to confirm
             ...queue.get() ◄── reader task: message on `pagedq:done:<id>` ─► every queue waiting on that channel
             exit           ─► channels nobody waits on any more: UNSUBSCRIBE

Confirmation is counted per channel (SUBSCRIBE commands sent minus `subscribe` replies read), so a request reads
the records only once Redis delivers its channels' notices: nothing published after that read is missed. A
reconnect (Redis restarted) re-subscribes every channel (redis-py's `on_connect`); notices published while the
connection was down are lost, and the waiters' periodic record reads (`api_wait.FALLBACK_S`) find those tasks.

State is per event loop (uvicorn runs one; a test client may run its own): a `PubSub`'s connection belongs to
the loop that opened it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pagedq.shared.records import done_channel

log = logging.getLogger(__name__)

#: How long a request waits for Redis to confirm its subscriptions before it reads the records anyway (the
#: periodic reads then cover a notice it might miss).
CONFIRM_S = 1.0
#: How long the reader waits after a connection error before it reads (and so reconnects) again.
RETRY_S = 0.2

Notice = dict[str, Any]  # a redis-py pub/sub message: type, channel, data


class _LoopNotices:
    """The shared subscription of one event loop (see the module docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.loop = asyncio.get_running_loop()
        self.pubsub = client.pubsub(ignore_subscribe_messages=False)
        self.waiters: dict[str, set[asyncio.Queue[Notice]]] = {}
        self.unconfirmed: dict[str, int] = {}  # channel -> SUBSCRIBE commands sent and not yet confirmed
        self.confirmed = asyncio.Condition()
        self.commands = asyncio.Lock()  # one SUBSCRIBE / UNSUBSCRIBE on the connection at a time
        self.reader: asyncio.Task[None] | None = None

    async def add(self, channels: Sequence[str], queue: asyncio.Queue[Notice]) -> None:
        new = []
        for channel in channels:
            waiting = self.waiters.setdefault(channel, set())
            if not waiting:
                new.append(channel)
            waiting.add(queue)
        if new:
            async with self.commands:
                for channel in new:
                    self.unconfirmed[channel] = self.unconfirmed.get(channel, 0) + 1
                try:
                    await self.pubsub.subscribe(*new)
                except BaseException:  # not sent (Redis down): no reply will confirm these
                    for channel in new:
                        self._confirm(channel)
                    raise
            if self.reader is None or self.reader.done():
                self.reader = self.loop.create_task(self._read(), name="pagedq-done-notices")
        await self._until_confirmed(channels)

    async def remove(self, channels: Sequence[str], queue: asyncio.Queue[Notice]) -> None:
        idle = []
        for channel in channels:
            waiting = self.waiters.get(channel)
            if waiting is None:
                continue
            waiting.discard(queue)
            if not waiting:
                del self.waiters[channel]
                idle.append(channel)
        if idle:
            try:
                async with self.commands:
                    await self.pubsub.unsubscribe(*idle)
            except RedisError as exc:  # the connection is down: a reconnect re-subscribes them too (redis-py keeps
                # them until Redis confirms the unsubscribe); their notices then reach no queue and are dropped
                log.warning("unsubscribing %d notice channels failed: %r", len(idle), exc)

    def _confirm(self, channel: str) -> None:
        """One SUBSCRIBE of `channel` is settled (confirmed by Redis, or never sent)."""
        self.unconfirmed[channel] -= 1
        if not self.unconfirmed[channel]:
            del self.unconfirmed[channel]

    async def _until_confirmed(self, channels: Sequence[str]) -> None:
        async with self.confirmed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.confirmed.wait_for(lambda: not any(self.unconfirmed.get(c) for c in channels)), CONFIRM_S
                )

    async def _read(self) -> None:
        """The reader task: every message to the queues of its channel's waiters; `subscribe` replies confirm."""
        while self.waiters or self.unconfirmed:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except RedisError as exc:
                log.warning("the notice subscription lost its connection (%r); reconnecting", exc)
                await asyncio.sleep(RETRY_S)
                continue
            if message is None:
                continue
            channel = message.get("channel")
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            if message.get("type") == "message":
                for queue in self.waiters.get(channel, ()):
                    queue.put_nowait(message)
            elif message.get("type") == "subscribe" and self.unconfirmed.get(channel):
                self._confirm(channel)
                async with self.confirmed:
                    self.confirmed.notify_all()
        self.reader = None  # nobody waits: the next `add` starts a reader again

    async def aclose(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError):
                await self.reader
        with contextlib.suppress(RedisError):
            await self.pubsub.aclose()


class DoneNotices:
    """`async with notices.subscribe(ids) as queue:` -- the `pagedq:done:<id>` messages of `ids`, from the
    process's one shared subscription, confirmed by Redis before the block starts (see the module docstring)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._state: _LoopNotices | None = None

    def _current(self) -> _LoopNotices:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopNotices(self.client)  # another loop's connection cannot be used here
        return self._state

    @asynccontextmanager
    async def subscribe(self, task_ids: Sequence[str]) -> AsyncIterator[asyncio.Queue[Notice]]:
        state = self._current()
        channels = [done_channel(task_id) for task_id in task_ids]
        queue: asyncio.Queue[Notice] = asyncio.Queue()
        try:
            await state.add(channels, queue)
            yield queue
        finally:
            await state.remove(channels, queue)

    @property
    def channels(self) -> int:
        """Channels some request waits on now (tests read it)."""
        return len(self._state.waiters) if self._state is not None else 0

    async def aclose(self) -> None:
        if self._state is not None and self._state.loop is asyncio.get_running_loop():
            await self._state.aclose()
        self._state = None
