"""A guard for kombu's Redis transport (5.7): a worker must survive a Redis restart.

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
"""

from __future__ import annotations

import functools
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

_GUARDED = "_pagedq_guarded"


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
    kombu_redis.Channel._connparams = _connparams
