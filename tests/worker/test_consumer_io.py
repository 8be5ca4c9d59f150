"""The worker consumer's Redis I/O (worker/consumer_io.py), on a real Redis with kombu's own consumer and event
loop: several messages per read within the prefetch credit, highest priority first, at most one bulk batch
message per read, every message recorded as unacked before the read returns; acks written once per loop turn."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.asynchronous import Hub

from pagedq.shared.celery_config import PRIORITY_STEPS
from pagedq.worker import consumer_io

UNACKED, UNACKED_INDEX = "unacked", "unacked_index"


@pytest.fixture()
def queue_name() -> str:
    return f"test-consumer-io-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def connection(redis_url: str) -> Iterator[Connection]:
    consumer_io.install(read_max=16)
    conn = Connection(redis_url, transport_options={"priority_steps": PRIORITY_STEPS,
                                                    "queue_order_strategy": "priority"})
    try:
        yield conn
    finally:
        conn.release()


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def publish(conn: Connection, queue: Queue, bodies: list[str], task: str = "pagedq.classify",
            priority: int = 0) -> None:
    with conn.channel() as channel:
        producer = Producer(channel)
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                             headers={"task": task}, priority=priority, serializer="json")


def make_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def consume(conn: Connection, queue: Queue, prefetch: int, got: list[Any], ack: bool = False) -> Consumer:
    def on_message(body: Any, message: Any) -> None:
        got.append((body, message))
        if ack:
            message.ack()

    consumer = Consumer(conn.default_channel, [queue], callbacks=[on_message], accept=["json"])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return consumer


def test_one_read_takes_several_messages_within_the_prefetch_credit(connection: Connection, client: redis.Redis,
                                                                    queue_name: str) -> None:
    queue = make_queue(queue_name)
    publish(connection, queue, [f"m{i}" for i in range(10)])
    got: list[Any] = []
    consume(connection, queue, prefetch=4, got=got)
    connection.drain_events(timeout=2)  # one read
    assert [body for body, _ in got] == ["m0", "m1", "m2", "m3"]  # the BRPOP's and 3 more: the credit is 4
    assert client.llen(queue_name) == 6
    # each one recorded as unacked (kombu's restore and pagedq's reconciler read these) before the read returned
    tags = {m.delivery_tag for _, m in got}
    assert set(client.hkeys(UNACKED)) >= tags and set(client.zrange(UNACKED_INDEX, 0, -1)) >= tags
    with pytest.raises(TimeoutError):
        connection.drain_events(timeout=0.3)  # no credit left: nothing more is taken
    for _, message in got:
        message.ack()
    connection.drain_events(timeout=2)
    assert len(got) == 8 and client.llen(queue_name) == 2
    assert not set(client.hkeys(UNACKED)) & tags  # acked off the event loop: removed at once


def test_a_read_takes_higher_priorities_first(connection: Connection, queue_name: str) -> None:
    queue = make_queue(queue_name)
    publish(connection, queue, ["low1", "low2"], priority=9)
    publish(connection, queue, ["high1", "high2"], priority=0)
    got: list[Any] = []
    consume(connection, queue, prefetch=16, got=got)
    connection.drain_events(timeout=2)
    assert [body for body, _ in got] == ["high1", "high2", "low1", "low2"]


def test_a_read_takes_at_most_one_bulk_batch_message(connection: Connection, queue_name: str) -> None:
    """A bulk's batch messages spread over the workers as with kombu's one-message BRPOP: a read stops after
    the first batch message it pops, and takes no more after a batch message BRPOP handed over."""
    queue = make_queue(queue_name)
    publish(connection, queue, ["single1"])
    publish(connection, queue, ["batch1", "batch2"], task="pagedq.classify.batch")
    publish(connection, queue, ["single2"])
    got: list[Any] = []
    consume(connection, queue, prefetch=16, got=got)
    connection.drain_events(timeout=2)
    assert [body for body, _ in got] == ["single1", "batch1"]
    connection.drain_events(timeout=2)
    assert [body for body, _ in got][2:] == ["batch2"]  # BRPOP handed over a batch message: nothing more
    connection.drain_events(timeout=2)
    assert [body for body, _ in got][3:] == ["single2"]


def test_acks_on_the_event_loop_are_written_once_per_loop_turn(connection: Connection, client: redis.Redis,
                                                               queue_name: str) -> None:
    queue = make_queue(queue_name)
    publish(connection, queue, [f"m{i}" for i in range(5)])
    got: list[Any] = []
    hub = Hub()
    connection.transport.register_with_event_loop(connection.connection, hub)
    consume(connection, queue, prefetch=16, got=got, ack=True)  # acked in the callback, on the loop's thread
    loop = hub.create_loop()
    zrem_before = _calls(client, "zrem")
    for _ in range(50):
        next(loop)
        if len(got) == 5:
            break
    assert len(got) == 5
    tags = {m.delivery_tag for _, m in got}
    assert set(client.hkeys(UNACKED)) >= tags  # acked, not yet written: the loop's next tick writes them
    next(loop)
    assert not set(client.hkeys(UNACKED)) & tags and not set(client.zrange(UNACKED_INDEX, 0, -1)) & tags
    assert _calls(client, "zrem") - zrem_before == 1  # five acks, one write
    hub.close()


def test_an_ack_from_another_thread_is_written_at_once(connection: Connection, client: redis.Redis,
                                                       queue_name: str) -> None:
    queue = make_queue(queue_name)
    publish(connection, queue, ["m0"])
    got: list[Any] = []
    hub = Hub()
    connection.transport.register_with_event_loop(connection.connection, hub)
    consume(connection, queue, prefetch=16, got=got)
    loop = hub.create_loop()
    for _ in range(50):
        next(loop)
        if got:
            break
    [(_, message)] = got
    worker = threading.Thread(target=message.ack)
    worker.start()
    worker.join()
    assert message.delivery_tag not in client.hkeys(UNACKED)
    hub.close()


def test_closing_the_channel_writes_the_queued_acks(connection: Connection, client: redis.Redis,
                                                    queue_name: str) -> None:
    queue = make_queue(queue_name)
    publish(connection, queue, ["m0", "m1"])
    got: list[Any] = []
    hub = Hub()
    connection.transport.register_with_event_loop(connection.connection, hub)
    consume(connection, queue, prefetch=16, got=got, ack=True)
    loop = hub.create_loop()
    for _ in range(50):
        next(loop)
        if len(got) == 2:
            break
    tags = {m.delivery_tag for _, m in got}
    assert set(client.hkeys(UNACKED)) >= tags  # queued
    connection.default_channel.close()
    assert not set(client.hkeys(UNACKED)) & tags
    assert client.llen(queue_name) == 0  # nothing restored: both were acked
    hub.close()


def _calls(client: redis.Redis, command: str) -> int:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_the_worker_reads_as_many_messages_as_its_setting_allows(tmp_path: Any) -> None:
    """`PAGEDQ_CONSUMER_READ_MAX` reaches the worker's consumer (importing the worker app installs it)."""
    import os
    import subprocess
    import sys

    code = ("from kombu.transport import redis as r; import pagedq.worker.app; "
            "print(r.Channel._pagedq_extra, r.Channel._brpop_read.__module__)")
    env = {**os.environ, "PAGEDQ_CONSUMER_READ_MAX": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out == ["2", "pagedq.worker.consumer_io"]  # the BRPOP's message and up to 2 more


def test_an_unacked_entry_is_kombus_and_restores_the_message(connection: Connection, client: redis.Redis,
                                                              queue_name: str) -> None:
    """The unacked entry holds the message as popped (not encoded again): what kombu writes, so that kombu's
    restore (a worker stopping with messages it did not ack) and pagedq's reconciler read it as before."""
    import json

    queue = make_queue(queue_name)
    publish(connection, queue, ["m0", "m1"])
    got: list[Any] = []
    consume(connection, queue, prefetch=16, got=got)
    connection.drain_events(timeout=2)
    assert len(got) == 2
    for _, message in got:
        entry = json.loads(client.hget(UNACKED, message.delivery_tag) or "null")
        delivery = message.delivery_info
        assert entry == [message._raw, delivery["exchange"], delivery["routing_key"]]
    connection.default_channel.close()  # not acked: kombu restores both to the queue
    assert client.llen(queue_name) == 2 and not client.hlen(UNACKED)
    again: list[Any] = []
    with Connection(connection.as_uri(include_password=True),
                    transport_options=connection.transport_options) as other:
        consume(other, queue, prefetch=16, got=again)
        other.drain_events(timeout=2)
        assert sorted(body for body, _ in again) == ["m0", "m1"]
        assert all(m.delivery_info.get("redelivered") for _, m in again)


def test_a_failed_extra_pop_still_delivers_the_brpop_message(connection: Connection, client: redis.Redis,
                                                             queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BRPOP took the message off the queue: if popping more fails (Redis going away), that one is still
    delivered and recorded as unacked, not dropped."""
    def broken(_channel: Any) -> list[Any]:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(consumer_io, "_pop_more", broken)
    queue = make_queue(queue_name)
    publish(connection, queue, ["m0", "m1"])
    got: list[Any] = []
    consume(connection, queue, prefetch=16, got=got)
    connection.drain_events(timeout=2)
    assert [body for body, _ in got] == ["m0"]
    assert got[0][1].delivery_tag in client.hkeys(UNACKED)
    assert client.llen(queue_name) == 1
