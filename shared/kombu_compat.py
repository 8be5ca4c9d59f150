"""Two changes to kombu's Redis transport (5.7): a worker survives a Redis restart, and a channel reuses one
Redis client instead of building one per command.

1. `install()` (the worker): a guard for a Redis restart.

When the broker connection drops, Celery closes the old channel and the transport lets go of the connection
(its `client` becomes None). Two things still use that channel afterwards: closing it restores the unacked
messages (`QoS.restore_unacked`), and a task that finishes then acks its message on it. Both build a Redis
client from the channel's connection and fail with an AttributeError ("'NoneType' object has no attribute
'hostname'" / "... 'client'"), which kombu and Celery do not expect: Celery stops the worker with
"Unrecoverable error". `bench/faults.py` saw it in every Redis restart by a worker holding messages.

The guard makes that case the connection error it is, which kombu and Celery already handle (the ack or the
restore is skipped and logged). The messages are not lost: they stay in kombu's unacked hash, pagedq's
reconciler puts back every unacked delivery no live worker holds (worker/reconciler.py, "orphaned
deliveries"), and the task records keep any of them from running twice.

2. `reuse_clients()` (producer and worker, from `pagedq.shared.celery_config.make_celery`): kombu's
`Channel.conn_or_acquire` builds a new `redis.Redis` for every publish, ack and unacked-index write, and
redis-py 8's constructor fills a dict of some 300 response callbacks each time: through the queue, 15% of a
worker's Python time went there (py-spy, W5 single-item). The patched channel keeps one client per
connection pool (a `redis.Redis` is thread-safe: each command takes a pooled connection), and builds a new
one when the pool changes (a reconnect), through the same `_create_client`, so the guard above still applies.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_GUARDED = "_pagedq_guarded"


_REUSES = "_pagedq_reuses_clients"


def reuse_clients() -> None:
    """Patch `kombu.transport.redis.Channel.conn_or_acquire` to reuse one client per pool (idempotent)."""
    original = kombu_redis.Channel.conn_or_acquire
    if getattr(original, _REUSES, False):
        return

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # through `_connparams` (the guard) when the channel must build a new pool
        cached = self.__dict__.get("_pagedq_client")
        if cached is None or cached[0] is not pool:
            cached = self.__dict__["_pagedq_client"] = (pool, self._create_client())
        yield cached[1]

    setattr(conn_or_acquire, _REUSES, True)
    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]


def install() -> None:
    """Wrap `kombu.transport.redis.Channel._connparams` (idempotent)."""
    original = kombu_redis.Channel._connparams
    if getattr(original, _GUARDED, False):
        return

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if getattr(getattr(self, "connection", None), "client", None) is None:
            raise redis.ConnectionError("the broker connection of this channel was closed (Redis restarted?)")
        return original(self, asynchronous=asynchronous)

    setattr(_connparams, _GUARDED, True)
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]
