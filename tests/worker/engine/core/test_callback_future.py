"""`CallbackFuture`: the requests' future where nobody waits, only callbacks (worker tasks, engine core)."""

from __future__ import annotations

import threading
from concurrent.futures import InvalidStateError
from typing import Any

import pytest

from pagedq.shared.models import ClassifyRequest, TaskType
from pagedq.worker.engine.core.executor import CallbackFuture, EngineRequest


def test_the_first_completion_wins_and_each_callback_runs_once() -> None:
    future = CallbackFuture()
    seen: list[Any] = []
    future.add_done_callback(lambda f: seen.append(("early", f.result())))
    with pytest.raises(InvalidStateError):
        future.result()  # nobody waits: asking before it is done is a bug, not a block
    request = EngineRequest(id="r", task=TaskType.CLASSIFY, payload=ClassifyRequest(text="x"), model="m",
                            future=future)  # type: ignore[arg-type]
    assert request.finish("first") and not request.fail(RuntimeError("second"))
    future.add_done_callback(lambda f: seen.append(("late", f.result())))  # runs at once
    assert seen == [("early", "first"), ("late", "first")] and future.exception() is None


def test_threads_completing_at_once_complete_it_once() -> None:
    for _ in range(200):
        future = CallbackFuture()
        calls: list[int] = []
        future.add_done_callback(lambda f, c=calls: c.append(1))
        start = threading.Barrier(4)

        def complete(n: int, f: CallbackFuture = future, barrier: threading.Barrier = start) -> None:
            barrier.wait()
            try:
                f.set_result(n)
            except InvalidStateError:
                pass

        threads = [threading.Thread(target=complete, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls == [1] and future.result() in range(4)


def test_a_failing_callback_does_not_stop_the_others() -> None:
    future = CallbackFuture()
    seen = []
    future.add_done_callback(lambda f: 1 / 0)
    future.add_done_callback(lambda f: seen.append(f.exception()))
    error = ValueError("bad")
    future.set_exception(error)
    assert seen == [error]
    with pytest.raises(ValueError):
        future.result()
