"""The worker's engine threads (worker/engine/lanes.py): one per model, side by side, sharing the cores.

Uses the in-test executors of test_engine_loop.py, so that each lane's guarantees are tested exactly: a slow
step of one model does not hold another's back, one model's dead thread does not stop the others, the lanes
split the intra-op threads while they are busy together, and `stop` refuses and drains on every lane at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from pagedq.shared.errors import ModelNotFound, TaskCancelled, WorkerShuttingDown
from pagedq.shared.settings import Settings
from pagedq.worker.engine.lanes import EngineLanes
from pagedq.worker.engine.service import CoreShare
from worker.engine.test_engine_loop import BatchingExecutor, ThreadsSeen, outcome, request, wait_until_dead

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Gate(BatchingExecutor):
    """A step that waits until `gate` is set (a long step: a big translation batch, say)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate = threading.Event()
        self.in_step = threading.Event()

    def step(self) -> None:
        self.in_step.set()
        self.gate.wait(10)
        super().step()


@contextmanager
def lanes(executors: dict, per_model: bool = True, threads: int | None = None) -> Iterator[EngineLanes]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # the default the lanes are built with (a worker's main thread: one per core)
    try:
        engine = EngineLanes(executors, per_model=per_model).start()
    finally:
        torch.set_num_threads(before)
    try:
        yield engine
    finally:
        for ex in executors.values():
            if isinstance(ex, Gate):
                ex.gate.set()
        engine.stop()


def test_a_long_step_of_one_model_does_not_hold_back_another_models_requests() -> None:
    slow, fast = Gate("slow"), BatchingExecutor("fast")
    with lanes({"slow": slow, "fast": fast}) as engine:
        held = engine.submit(request("s", model="slow"))
        assert slow.in_step.wait(5)
        assert engine.submit(request("f", model="fast")).result(timeout=5) == "done:f"  # while "slow" steps
        assert not held.done()
        slow.gate.set()
        assert held.result(timeout=5) == "done:s"
        assert sorted(lane._thread.name for lane in engine.lanes) == ["pagedq-engine:fast", "pagedq-engine:slow"]


def test_shared_runs_every_model_in_one_thread_in_turn() -> None:
    slow, fast = Gate("slow"), BatchingExecutor("fast")
    with lanes({"slow": slow, "fast": fast}, per_model=False) as engine:
        held = engine.submit(request("s", model="slow"))
        assert slow.in_step.wait(5)
        waiting = engine.submit(request("f", model="fast"))
        time.sleep(0.3)
        assert not waiting.done()  # behind the slow step: one thread steps the models in turn
        slow.gate.set()
        assert [held.result(timeout=5), waiting.result(timeout=5)] == ["done:s", "done:f"]
        assert engine.stats()["engine"]["lanes"] == 1


def test_a_dead_lane_does_not_stop_the_others_and_the_watchdog_restarts_it() -> None:
    doomed, other = BatchingExecutor("doomed"), BatchingExecutor("other")
    with lanes({"doomed": doomed, "other": other}) as engine:
        doomed.hold = True
        killed = [engine.submit(request(f"k{i}", model="doomed")) for i in range(2)]
        time.sleep(0.05)
        doomed.kill_next, doomed.hold = True, False
        wait_until_dead(engine)
        assert engine.submit(request("o", model="other")).result(timeout=5) == "done:o"  # no restart needed
        assert not any(f.done() for f in killed)
        assert engine.threads() == {"doomed": (False, 0), "other": (True, 0)}  # which model's thread is down
        assert engine.ensure_alive() and engine.alive
        assert engine.threads() == {"doomed": (True, 1), "other": (True, 0)}
        assert [f.result(timeout=5) for f in killed] == ["done:k0", "done:k1"]  # re-run by the restarted lane
        stats = engine.stats()["engine"]
        assert stats["restarts"] == 1 and stats["lanes"] == 2 and stats["alive"] is True


def test_lanes_busy_together_split_the_intra_op_threads_and_a_model_alone_has_them_all() -> None:
    slow, seen, pinned = Gate("slow"), ThreadsSeen("seen", None), ThreadsSeen("pinned", 3)
    with lanes({"slow": slow, "seen": seen, "pinned": pinned}, threads=4) as engine:
        engine.submit(request("a", model="seen")).result(timeout=5)
        assert seen.seen == [4]  # alone: the engine's default count
        held = engine.submit(request("s", model="slow"))
        assert slow.in_step.wait(5)
        engine.submit(request("b", model="seen")).result(timeout=5)
        assert seen.seen[-1] == 2  # two lanes busy: half of the 4 each
        engine.submit(request("p", model="pinned")).result(timeout=5)
        assert pinned.seen == [3]  # a fixed count from the registry is kept as set
        slow.gate.set()
        held.result(timeout=5)
        time.sleep(CoreShare.BUSY_WINDOW_S + 0.1)  # "slow" no longer counts as busy
        engine.submit(request("c", model="seen")).result(timeout=5)
        assert seen.seen[-1] == 4


def test_core_share_counts_engines_busy_within_its_window() -> None:
    share, a, b = CoreShare(4), object(), object()
    assert share.cap() == 4
    share.busy(a)
    share.busy(b)
    assert share.cap() == 2
    share.leave(b)
    assert share.cap() == 4
    assert CoreShare(1).cap() == 1 and CoreShare(2).cap() == 2
    share.busy(b)
    share.busy(object())
    share.busy(object())
    share.busy(object())
    assert share.cap() == 1  # never below one thread


def test_stop_refuses_on_every_lane_at_once_and_drains_them_together() -> None:
    one, two = BatchingExecutor("one"), BatchingExecutor("two")
    one.hold = two.hold = True
    with lanes({"one": one, "two": two}) as engine:
        futures = [engine.submit(request(f"{m}{i}", model=m)) for m in ("one", "two") for i in range(2)]

        def release() -> None:
            one.hold = two.hold = False

        threading.Timer(0.3, release).start()
        started = time.monotonic()
        engine.stop(drain_s=5)
        assert time.monotonic() - started < 3  # the lanes drained side by side, not one drain after another
        assert [f.result(timeout=0) for f in futures] == ["done:one0", "done:one1", "done:two0", "done:two1"]
        late = [request("late1", model="one"), request("late2", model="two")]
        with pytest.raises(WorkerShuttingDown):
            engine.submit_many(late)
        assert not any(r.future.done() for r in late)  # refused as a whole: nothing enqueued, nothing failed
        assert not engine.alive and not engine.ensure_alive()


def test_stop_hands_back_what_no_lane_finished() -> None:
    one, two = BatchingExecutor("one"), BatchingExecutor("two")
    one.hold = two.hold = True
    with lanes({"one": one, "two": two}) as engine:
        futures = [engine.submit(request(m, model=m)) for m in ("one", "two")]
        time.sleep(0.05)
        engine.stop()
        assert all(isinstance(outcome(f), WorkerShuttingDown) for f in futures)


def test_submit_many_routes_each_request_to_its_models_lane_and_fails_an_unknown_model_alone() -> None:
    one, two = BatchingExecutor("one"), BatchingExecutor("two")
    with lanes({"one": one, "two": two}) as engine:
        batch = [request("a", model="one"), request("b", model="two"), request("c", model="nowhere"),
                 request("d", model="one")]
        engine.submit_many(batch)
        results = [outcome(r.future) for r in batch]
        assert results[0] == "done:a" and results[1] == "done:b" and results[3] == "done:d"
        assert isinstance(results[2], ModelNotFound)
        assert sorted(i for b in one.batches for i in b) == ["a", "d"] and two.batches == [["b"]]
        with pytest.raises(ModelNotFound):
            engine.submit(request("e", model="nowhere"))


def test_cancel_reaches_the_lane_running_the_request() -> None:
    one, two = BatchingExecutor("one"), BatchingExecutor("two")
    one.hold = True
    with lanes({"one": one, "two": two}) as engine:
        future = engine.submit(request("x", model="one"))
        time.sleep(0.05)
        engine.cancel("x")
        assert isinstance(outcome(future), TaskCancelled)
        assert engine.submit(request("y", model="two")).result(timeout=5) == "done:y"


def test_stats_merge_every_lanes_models_and_sum_their_counters() -> None:
    one, two = BatchingExecutor("one"), BatchingExecutor("two")
    with lanes({"one": one, "two": two}) as engine:
        for m in ("one", "two", "one"):
            engine.submit(request(f"{m}{time.monotonic_ns()}", model=m)).result(timeout=5)
        deadline = time.monotonic() + 5
        while engine.stats()["engine"]["requests_finished"] < 3:  # counted by each lane's next iteration
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = engine.stats()
        assert stats["engine"]["alive"] is True and stats["engine"]["lanes"] == 2
        assert stats["engine"]["requests_submitted"] == 3
        assert set(stats["models"]) == {"one", "two"} == set(engine.model_stats())
        assert engine.model_stats()["one"].steps == 2 and engine.model_stats()["two"].steps == 1


def test_the_engine_threads_setting() -> None:
    assert Settings().engine_threads == "per-model"
    assert Settings(engine_threads="shared").engine_threads == "shared"
    with pytest.raises(ValueError):
        Settings(engine_threads="several")
