"""Token streaming (worker/streaming.py) into a real Redis stream; with a real executor and model in
tests/worker/engine/tasks/test_generative_executor.py, through the HTTP API in tests/worker/test_reliability.py.

The property users rely on: the streamed text, put together, is exactly the task's final text -- never the
stop string the final answer drops, never trailing whitespace it strips -- and a re-run starts over."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from pagedq.shared.records import stream_key
from pagedq.worker.streaming import TokenStreamer, _TaskStream


@pytest.fixture()
def streamer(redis_url: str) -> Iterator[TokenStreamer]:
    s = TokenStreamer(redis.Redis.from_url(redis_url, decode_responses=True), ttl_s=60).start()
    yield s
    s.stop()


def read_stream(r: redis.Redis, task_id: str) -> tuple[str, str | None]:
    """(text, end state) as a reader puts them together: `reset` drops the text so far."""
    text, end = "", None
    for _, entry in r.xrange(stream_key(task_id)):
        if "reset" in entry:
            text = ""
        text += entry.get("text", "")
        end = entry.get("end", end)
    return text, end


class Chars:
    """A tokenizer whose tokens are characters: exact control over what is decoded when."""

    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.text[i] for i in ids)


def test_stop_strings_and_trailing_space_are_held_back() -> None:
    full = " Ada wrote it  \nQuestion: more"
    stream = _TaskStream(Chars(full), ("\nQuestion:",))
    sent = ""
    for n in range(1, len(full) + 1):
        stream.token_ids = list(range(n))
        sent += stream.delta()
        assert "\n" not in sent and not sent.endswith(" ")
    assert sent == "Ada wrote it"


def test_a_rerun_resets_the_stream(streamer: TokenStreamer, redis_url: str) -> None:
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    on_token = streamer.sink("t").open(Chars("abcdef"), ())
    for i in range(3):
        on_token("t", i)
    streamer.close("t", "running", "")  # flushes (the end marker is checked below)
    on_token2 = streamer.sink("t2").open(Chars("abcdef"), ())
    for i in range(3):
        on_token2("t2", i)
    for i in range(3, 6):
        on_token2("t2@retry1", i)  # the engine re-ran it after isolating a poison request
    streamer.close("t2", "succeeded", "def")
    assert read_stream(r, "t2") == ("def", "succeeded")
