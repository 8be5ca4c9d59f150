"""Token streaming: generated text reaches `GET /v1/tasks/{id}/stream` while the task runs.

The engine thread calls `on_token(attempt_id, token_id)` for every sampled token of a request that asked to
stream (`generation.stream`); that only appends to a queue. The streamer thread wakes every `FLUSH_S`,
detokenizes each task's tokens so far and appends the new text to a Redis stream, one pipeline per wake-up:

    pagedq:stream:<task id>    XADD  {"text": <delta>}   ...   {"reset": "1"}   ...   {"end": <final state>}

Text that could still become a stop string is held back until it cannot (the final answer never contains
the stop string, so the streamed text must not either); `end` is written before the task's final state, so
a reader that sees the final state finds the whole stream. A re-run of the request (the engine isolated a
poison request in its batch) starts over: `reset` tells readers to drop what they have.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from pagedq.shared.records import stream_key

log = logging.getLogger(__name__)

FLUSH_S = 0.02
#: Entries kept per stream (a generation of max_new_tokens produces at most that many deltas).
MAX_ENTRIES = 4096


@dataclass
class _TaskStream:
    tokenizer: Any
    stop: Sequence[str]
    attempt: str = ""
    token_ids: list[int] = field(default_factory=list)
    sent: str = ""

    def delta(self) -> str:
        """New text that cannot change any more: not a possible start of a stop string, not trailing
        whitespace (the final answer is stripped), not a half-decoded character."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        hold = max((len(s) - 1 for s in self.stop), default=0)
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                text, hold = text[:at], 0
        safe = text[: len(text) - hold].rstrip().rstrip("\ufffd")
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def rest(self, final_text: str) -> list[dict[str, str]]:
        """Entries that make the stream's text equal `final_text` (the task's result)."""
        if final_text.startswith(self.sent):
            return [{"text": final_text[len(self.sent):]}] if len(final_text) > len(self.sent) else []
        return [{"reset": "1"}, {"text": final_text}] if final_text else [{"reset": "1"}]


class TokenStreamer:
    """One per worker process; see the module docstring."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._events: queue.SimpleQueue[tuple[str, str, Any, threading.Event | None]] = queue.SimpleQueue()
        self._streams: dict[str, _TaskStream] = {}
        self._thread = threading.Thread(target=self._run, name="pagedq-streamer", daemon=True)
        self._stop = threading.Event()

    def start(self) -> TokenStreamer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def sink(self, task_id: str) -> StreamSink:
        """What a task's `EngineRequest.stream` holds: an executor that generates token by token opens it."""
        return StreamSink(self, task_id)

    def _open(self, task_id: str, tokenizer: Any, stop: Sequence[str]) -> Callable[[str, int], None]:
        self._events.put((task_id, "", (tokenizer, tuple(stop)), None))
        return lambda attempt, token: self._events.put((task_id, attempt, token, None))

    def close(self, task_id: str, final_state: str, final_text: str = "", timeout_s: float = 2.0) -> None:
        """Complete the task's text up to `final_text` (its result), then write the end marker; returns once
        they are in Redis."""
        done = threading.Event()
        self._events.put((task_id, final_state, final_text, done))
        if not done.wait(timeout_s):
            log.warning("stream of %s not flushed within %.1f s", task_id, timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_S):
            try:
                self._flush()
            except redis.RedisError as exc:
                log.warning("token streaming failed: %s", exc)

    def _flush(self) -> None:
        touched: dict[str, list[dict[str, str]]] = {}
        closed: list[threading.Event] = []
        while True:
            try:
                task_id, attempt_or_state, token, done = self._events.get_nowait()
            except queue.Empty:
                break
            if not attempt_or_state and done is None:  # open (again, for a re-run: its tokens then reset)
                self._streams.setdefault(task_id, _TaskStream(*token))
                continue
            stream = self._streams.get(task_id) or _TaskStream(None, ())  # closed without token streaming
            entries = touched.setdefault(task_id, [])
            if done is not None:  # close: the rest of the final text, then the end marker
                entries += stream.rest(str(token))
                entries.append({"end": attempt_or_state})
                closed.append(done)
                self._streams.pop(task_id, None)
                continue
            if attempt_or_state != stream.attempt:
                if stream.attempt:
                    entries.append({"reset": "1"})
                stream.attempt, stream.token_ids, stream.sent = attempt_or_state, [], ""
            stream.token_ids.append(int(token))
            if delta := stream.delta():
                entries.append({"text": delta})
        if touched:
            with self.redis.pipeline(transaction=False) as pipe:
                for task_id, entries in touched.items():
                    for entry in _merged(entries):
                        pipe.xadd(stream_key(task_id), entry, maxlen=MAX_ENTRIES, approximate=True)  # type: ignore[arg-type]
                    pipe.expire(stream_key(task_id), self.ttl_s)
                pipe.execute()
        for done in closed:
            done.set()


def _merged(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive text deltas of one flush as one entry (fewer, larger stream entries)."""
    out: list[dict[str, str]] = []
    for entry in entries:
        if "text" in entry and out and "text" in out[-1]:
            out[-1] = {"text": out[-1]["text"] + entry["text"]}
        else:
            out.append(entry)
    return out


@dataclass(frozen=True)
class StreamSink:
    """A task's end of the streamer, carried by its `EngineRequest` (see worker/engine/core/executor.py)."""

    streamer: TokenStreamer
    task_id: str

    def open(self, tokenizer: Any, stop: Sequence[str] = ()) -> Callable[[str, int], None]:
        """Start streaming tokens; returns the `on_token(attempt_id, token_id)` callback for the engine."""
        return self.streamer._open(self.task_id, tokenizer, stop)
