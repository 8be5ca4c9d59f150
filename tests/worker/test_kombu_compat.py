"""The guard that keeps a worker up across a Redis restart (shared/kombu_compat.py); the restart itself runs
on real processes in tests/worker/test_reliability.py and bench/faults.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from kombu.transport import redis as kombu_redis

from pagedq.shared import kombu_compat


def test_a_channel_whose_connection_is_gone_raises_a_connection_error_kombu_handles() -> None:
    kombu_compat.install()
    kombu_compat.install()  # idempotent: wrapped once
    closed = SimpleNamespace(connection=SimpleNamespace(client=None))
    with pytest.raises(redis.ConnectionError):
        kombu_redis.Channel._connparams(closed)
    # what kombu's Redis transport treats as a connection error (ack_log_error, maybe_close_channel catch it)
    connection_errors, _ = kombu_redis.get_redis_error_classes()
    assert issubclass(redis.ConnectionError, connection_errors)


def test_a_channel_reuses_one_redis_client_per_connection_pool() -> None:
    kombu_compat.reuse_clients()
    kombu_compat.reuse_clients()  # idempotent
    made = []
    channel = SimpleNamespace(pool=object(), _create_client=lambda: made.append(object()) or made[-1])
    acquire = kombu_redis.Channel.conn_or_acquire
    with acquire(channel) as first, acquire(channel) as second:
        assert first is second and len(made) == 1
    given = object()
    with acquire(channel, given) as client:
        assert client is given  # a client passed in is used as is
    channel.pool = object()  # a reconnect made a new pool: a new client on it
    with acquire(channel) as third:
        assert third is not first and len(made) == 2
