"""The guard that keeps a worker up across a Redis restart (worker/kombu_compat.py); the restart itself runs
on real processes in tests/test_reliability.py and bench/faults.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import redis
from kombu.transport import redis as kombu_redis

from worker import kombu_compat


def test_a_channel_whose_connection_is_gone_raises_a_connection_error_kombu_handles() -> None:
    kombu_compat.install()
    kombu_compat.install()  # idempotent: wrapped once
    closed = SimpleNamespace(connection=SimpleNamespace(client=None))
    with pytest.raises(redis.ConnectionError):
        kombu_redis.Channel._connparams(closed)
    # what kombu's Redis transport treats as a connection error (ack_log_error, maybe_close_channel catch it)
    connection_errors, _ = kombu_redis.get_redis_error_classes()
    assert issubclass(redis.ConnectionError, connection_errors)
