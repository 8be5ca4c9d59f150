"""Fewer Redis round trips per message in the worker's Celery consumer (kombu 5.7's Redis transport).

Through the queue, a worker's consumer thread was the single-item path's bottleneck: it handles every message
in turn, and kombu's Redis transport makes three round trips for each, waiting for every reply -- BRPOP (one
message), the unacked-index write (`QoS.append`: a MULTI of ZADD and HSET) and the ack (`QoS.ack`: a MULTI of
ZREM and HDEL) -- besides the events it flushes. py-spy (W5 single-item, 32 clients): the consumer thread was
never idle, two thirds of its time spent waiting for Redis replies (and for the GIL after each of them).

`install()` changes two things, on the worker's consumer only:

1. **Several messages per read.** When BRPOP hands over a message, the consumer pops up to `read_max - 1` more
   from the same queues in the same order (one Lua script, one `RPOP` at a time, highest priority first),
   bounded by the prefetch credit left (`QoS.can_consume_max_estimate`), stopping after a bulk's batch message
   (none after a batch message BRPOP handed over), and records all of them as unacked in one MULTI before the
   read returns (kombu records each on its own; the entry is the message's JSON as popped, not encoded
   again). Prefetch, priorities and the unacked bookkeeping keep their meaning; a message is recorded as
   unacked before anything can ack it (acks run on this same thread, after the read). What the read delivers
   while a task fails to start is still recorded, and if the extra pop fails (Redis going away), the BRPOP's
   message is still delivered. Measured (README, W5): the single-item loop 373 -> 513-547 tasks/s, the
   consumer thread idle half its time instead of never.
2. **Acks in one write per loop turn.** Celery runs every ack on the consumer's event loop thread (the pool
   threads schedule them there). An ack on that thread frees the prefetch slot at once (kombu's in-memory
   QoS) and queues the index removal; the loop's tick writes all queued removals in one MULTI before it
   polls again, and so does closing the channel. An ack from another thread, or with no event loop, is
   written at once as before.

Crash safety is what it was: between a pop and its unacked record, a worker death loses the message (kombu's
own window, now for a few messages at once), and pagedq's reconciler re-sends a task whose message is nowhere
(worker/reconciler.py, "lost messages"); an ack queued but not written when the worker dies leaves its entry in
the unacked hash, which the reconciler or the visibility timeout restores, and the redelivery finds the task
final (`TaskRecords.claim`) and only acks it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from pagedq.shared.celery_config import BATCH_TASK_SUFFIX

log = logging.getLogger(__name__)

_INSTALLED = "_pagedq_consumer_io"

# KEYS: the queues' Redis lists, in the order BRPOP was given them; ARGV[1]: most messages to pop; ARGV[2]: the
# suffix of a batch task's name. Pops one message at a time, highest priority first, and stops after a batch
# message: a read takes at most one (a bulk's messages spread over the workers as with kombu's BRPOP).
# Returns key, message, key, message, ...
_POP = """
local out, n = {}, tonumber(ARGV[1])
for _, key in ipairs(KEYS) do
  while n > 0 do
    local item = redis.call('RPOP', key)
    if not item then break end
    out[#out + 1] = key
    out[#out + 1] = item
    n = n - 1
    local ok, message = pcall(cjson.decode, item)
    local task = ok and type(message) == 'table' and type(message.headers) == 'table' and message.headers.task
    if type(task) == 'string' and string.sub(task, -#ARGV[2]) == ARGV[2] then return out end
  end
end
return out
"""


def install(read_max: int = 16) -> None:
    """Patch kombu's Redis `Channel` and `QoS` (idempotent); `read_max`: most messages one read takes (the
    BRPOP's and up to `read_max - 1` more; 1: one per BRPOP, as kombu does, acks still written per loop turn)."""
    channel_cls, qos_cls = kombu_redis.Channel, kombu_redis.QoS
    channel_cls._pagedq_extra = max(0, read_max - 1)  # type: ignore[attr-defined]
    if getattr(channel_cls, _INSTALLED, False):
        return
    original_append: Callable[..., Any] = qos_cls.append
    original_ack: Callable[..., Any] = qos_cls.ack
    original_close: Callable[..., Any] = channel_cls.close
    original_register: Callable[..., Any] = kombu_redis.Transport.register_with_event_loop

    def append(self: Any, message: Any, delivery_tag: Any) -> None:
        pending = self.__dict__.get("_pagedq_appends")
        if pending is None:
            original_append(self, message, delivery_tag)
            return
        delivery = message.delivery_info
        where = [delivery["exchange"], delivery["routing_key"]]
        # kombu's entry is dumps([message._raw, ex, rk]); the message as popped is that raw message (the
        # producer gave it its delivery tag), so its JSON goes in as it came instead of being encoded again
        raw = self.__dict__.get("_pagedq_raw")
        pending.append((delivery_tag, dumps([message._raw, *where]) if raw is None else f"[{raw}, {dumps(where)[1:]}"))
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self: Any, delivery_tag: Any) -> None:
        loop = getattr(self.channel.connection, "_pagedq_loop", None)
        if loop is None or getattr(loop, "_loop_thread", None) != threading.get_ident():
            original_ack(self, delivery_tag)
            return
        self.__dict__.setdefault("_pagedq_acks", []).append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def _brpop_read(self: Any, **options: Any) -> bool:
        try:
            try:
                dest_item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # as kombu: disconnect, so that the next iteration reconnects
                self.client.connection.disconnect()
                raise
            if not dest_item:
                raise Empty()
            dest, item = dest_item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()
        first = bytes_to_str(item)
        messages = [(dest, first, loads(first))]
        if not _is_batch(messages[0][2]):  # a read takes at most one batch message (see _POP)
            try:
                more = _pop_more(self)
            except self.connection_errors as exc:  # the BRPOP's message is delivered all the same
                log.warning("could not pop more messages after BRPOP's: %r", exc)
                more = []
            messages += [(queue, text, loads(text)) for queue, text in more]
        qos = self.qos
        qos._pagedq_appends = []
        failure: BaseException | None = None
        try:
            for queue, text, message in messages:
                qos._pagedq_raw = text  # the unacked entry's JSON (`append`)
                try:
                    self.connection._deliver(message, queue)
                except Exception as exc:  # noqa: BLE001 -- deliver the others, then raise the first
                    failure = failure or exc
        finally:
            appends, qos._pagedq_appends, qos._pagedq_raw = qos._pagedq_appends, None, None
            _write_appends(qos, appends)
        if failure is not None:
            raise failure
        return True

    def close(self: Any) -> None:
        flush_acks(self)
        original_close(self)

    def register_with_event_loop(self: Any, connection: Any, loop: Any) -> None:
        original_register(self, connection, loop)
        previous = self.__dict__.get("_pagedq_tick")
        if previous is not None:  # registered again after a reconnect
            loop.on_tick.discard(previous)
        self._pagedq_loop = loop

        def on_tick() -> None:
            for channel in list(self.cycle._channels):
                flush_acks(channel)

        self._pagedq_tick = on_tick
        loop.on_tick.add(on_tick)

    qos_cls.append = append  # type: ignore[method-assign]
    qos_cls.ack = ack  # type: ignore[method-assign]
    channel_cls._brpop_read = _brpop_read  # type: ignore[method-assign]
    channel_cls.close = close  # type: ignore[method-assign]
    kombu_redis.Transport.register_with_event_loop = register_with_event_loop  # type: ignore[method-assign]
    setattr(channel_cls, _INSTALLED, True)


def _pop_more(channel: Any) -> list[tuple[str, str]]:
    """Up to `extra` more messages (queue, JSON) from the queues BRPOP read, within the prefetch credit left."""
    room = channel.qos.can_consume_max_estimate()
    count = channel._pagedq_extra if room is None else min(channel._pagedq_extra, room - 1)
    if count <= 0 or channel.global_keyprefix or getattr(channel, "_closing", False):
        return []
    queues = channel._queue_cycle.consume(len(channel.active_queues))
    keys = [channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues]
    if not keys:
        return []
    with channel.conn_or_acquire() as client:
        script = channel.__dict__.get("_pagedq_pop")
        if script is None or script.registered_client is not client:
            script = channel.__dict__["_pagedq_pop"] = client.register_script(_POP)
        flat = script(keys=keys, args=[count, BATCH_TASK_SUFFIX])
    return [(bytes_to_str(flat[i]).rsplit(channel.sep, 1)[0], bytes_to_str(flat[i + 1]))
            for i in range(0, len(flat), 2)]


def _is_batch(message: Any) -> bool:
    headers = message.get("headers") if isinstance(message, dict) else None
    task = headers.get("task") if isinstance(headers, dict) else None
    return isinstance(task, str) and task.endswith(BATCH_TASK_SUFFIX)


def _write_appends(qos: Any, appends: list[tuple[Any, str]]) -> None:
    if not appends:
        return
    now = time.time()
    with qos.pipe_or_acquire() as pipe:
        pipe.zadd(qos.unacked_index_key, {tag: now for tag, _ in appends})
        pipe.hset(qos.unacked_key, mapping=dict(appends))
        pipe.execute()


def flush_acks(channel: Any) -> None:
    """Write the acks queued on `channel` (one MULTI); a connection error is logged, the entries stay behind
    (restored later, and found final)."""
    qos: Any = getattr(channel, "_qos", None)
    tags = qos.__dict__.get("_pagedq_acks") if qos is not None else None
    if not tags:
        return
    qos._pagedq_acks = []
    try:
        with qos.pipe_or_acquire() as pipe:
            pipe.zrem(qos.unacked_index_key, *tags)
            pipe.hdel(qos.unacked_key, *tags)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 -- as kombu's ack_log_error: log, the worker goes on
        log.warning("could not remove %d acked messages from the unacked index: %r", len(tags), exc)
